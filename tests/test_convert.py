"""python -m avmt.convert official: the authors' checkpoint layout (from the fixture) into an avmt checkpoint folder."""

from __future__ import annotations

import pickle

import pytest
import torch
from bad_input import error_line, snapshot
from official_layout import HEAD_KEYS, official_state_dict, save_official

from avmt.checkpoint import CheckpointError, load_checkpoint, load_model
from avmt.convert import LAYER, MAPS, ConvertError, convert_official, main, official_rotation

REBASED = ("factor_key.orthogonal_ms1", "factor_ffn.orthogonal_ms2", "factor_dense.orthogonal_ms0")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(source tensors, checkpoint file, converted folder, conversion report) at the paper config; three
    orthogonal modules carry a non-identity ``base`` (as after the dynamic mode's rebasing)."""
    root = tmp_path_factory.mktemp("official")
    sd = official_state_dict(seed=0, rebased=REBASED)
    src = save_official(root / "checkpoint.pyth", sd)
    conv = convert_official(src, root / "converted")
    return sd, src, root / "converted", conv


def test_the_converted_checkpoint_loads_strictly_with_the_official_facts(official):
    sd, _, out, _ = official
    model, cfg = load_model(out)
    assert not model.training and cfg.model.sharing == "lowrank" and cfg.model.fusion == "mid"
    assert cfg.model.max_clips == 21 and cfg.model.lowrank_eps == 1e-12 and cfg.model.dim == 768 and cfg.model.rank == 128
    state = load_checkpoint(out)
    assert state["converted_from"]["format"] == "official" and len(state["converted_from"]["sha256"]) == 64
    got = model.state_dict()
    assert torch.equal(got["visual_bos"], sd["summary_encoding.bos_embeddings.weight"][0])
    assert torch.equal(got["audio_bos"], sd["summary_encoding.bos_embeddings.weight"][1])
    assert torch.equal(got["embeddings.multimodal.types.weight"], sd["multi_embeddings.token_type_embeddings.weight"])
    assert torch.equal(got["visual_cnn.stem.0.0.weight"], sd["visual_conv.s1.pathway0_stem.conv.weight"])
    assert torch.equal(got["audio_cnn.stages.0.0.branch.6.0.weight"], sd["audio_conv.s2.res0.branch2.c.weight"])  # separable
    assert torch.equal(got["audio_cnn.stages.3.0.branch.4.0.weight"], sd["audio_conv.s5.res0.branch2.c.weight"])  # plain
    assert torch.equal(got["layers.0.attn_norm.weight"], sd[f"transformer.{LAYER}attention.LayerNorm.weight"])


def test_every_copied_tensor_equals_its_source_and_v_is_the_transpose(official):
    sd, _, out, conv = official
    model, _ = load_model(out)
    got = model.state_dict()
    assert len(conv.copied) > 700
    for dst, src in conv.copied.items():
        assert torch.equal(got[dst], sd[src]), dst
    for off, avmt in MAPS.items():
        v = got[f"layers.0.{avmt}.V"]
        for g in range(3):
            assert torch.equal(v[g], sd[f"transformer.{LAYER}{off}.ms{g}_linear.weight"].T), (avmt, g)


@pytest.mark.parametrize("off", list(MAPS))
def test_each_rotation_is_the_transpose_of_the_official_one(official, off):
    """R_g = matrix_exp(A_g - A_gᵀ) of the converted map equals B_gᵀ, B_g = base_g · expm(triu(A,1) - triu(A,1)ᵀ) from
    the official values, for the static (identity base) and the rebased (random rotation base) groups alike."""
    sd, _, out, conv = official
    model, _ = load_model(out)
    a = model.state_dict()[f"layers.0.{MAPS[off]}.A"].double()
    for g in range(3):
        prefix = f"transformer.{LAYER}{off}.orthogonal_ms{g}_linear."
        b = official_rotation(sd[prefix + "A"], sd[prefix + "base"])
        r = torch.matrix_exp(a[g] - a[g].T)
        torch.testing.assert_close(r, b.T, atol=1e-5, rtol=0)
        assert not torch.allclose(b, torch.eye(128, dtype=torch.float64), atol=1e-3)  # a real rotation was checked
        if any(x in prefix for x in REBASED):
            assert not torch.equal(sd[prefix + "base"], torch.eye(128))
    assert conv.rotation_error < 1e-5


def test_every_official_key_is_accounted_for_once(official):
    sd, _, _, conv = official
    sources = set(conv.copied.values()) | {s for v in conv.derived.values() for s in v}
    assert set(conv.duplicates) & sources == set() and set(conv.caches) & sources == set()
    assert {f"{k} (top level)" for k in ("epoch", "optimizer", "cfg")} | set(HEAD_KEYS) == set(conv.unused)
    assert sources | set(conv.duplicates) | set(conv.caches) | (set(conv.unused) & set(HEAD_KEYS)) == set(sd) | set(HEAD_KEYS)
    assert len(conv.duplicates) == 3 * sum(k.startswith("transformer.") for k in sd)  # 3 extra prefixes (with _B)
    assert len(conv.caches) == 18  # one _B per orthogonal module (6 maps x 3 groups)


def test_the_cli_reports_and_refuses_to_overwrite(official, tmp_path, capsys):
    _, src, _, _ = official
    assert main(["official", str(src), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "copied" in printed and "cpp_head.fc.weight" in printed  # the left-out head keys are named
    assert main(["official", str(src), str(tmp_path / "out")]) == 1
    assert "exists" in capsys.readouterr().err


class Payload:
    """What a malicious checkpoint pickles: unpickling it would run ``touch``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_foreign_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    sd = {"visual_fc.weight": torch.zeros(2, 2)}
    torch.save({"state_dict": {"avbert." + k: v for k, v in sd.items()}, "hook": Payload(marker)}, tmp_path / "evil.pyth")
    with pytest.raises(ConvertError, match=r"pickled (posix|os)\.system.*refused"):
        convert_official(tmp_path / "evil.pyth", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"state_dict": {}}, f, protocol=2)
    with pytest.raises(ConvertError, match="no state_dict key starts with 'avbert.'|not a readable torch checkpoint"):
        convert_official(tmp_path / "plain.pkl", tmp_path / "out")


def _broken(tmp_path, change):
    sd = official_state_dict(seed=1)
    change(sd)
    return save_official(tmp_path / "broken.pyth", sd)


def test_a_shape_mismatch_is_an_error_naming_the_key(tmp_path):
    src = _broken(tmp_path, lambda sd: sd.__setitem__("audio_fc.weight", torch.zeros(768, 512)))
    with pytest.raises(ConvertError, match=r"audio_fc\.weight has shape \(768, 512\).*audio_proj\.linear\.weight"):
        convert_official(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unequal_shared_copies_and_missing_tensors_are_errors(tmp_path):
    key = f"multi_transformer.{LAYER}factor_ffn.s_linear.bias"
    src = _broken(tmp_path, lambda sd: sd[key].add_(1))
    with pytest.raises(ConvertError, match="multi_transformer.*differs from transformer"):
        convert_official(src, tmp_path / "out")
    src = _broken(tmp_path, lambda sd: sd.pop("multi_embeddings.token_type_embeddings.weight"))
    with pytest.raises(ConvertError, match="no source in the checkpoint, e.g. embeddings.multimodal.types.weight"):
        convert_official(src, tmp_path / "out")


def test_a_reflection_base_is_refused(tmp_path):
    key = f"transformer.{LAYER}factor_ffn.orthogonal_ms1_linear.base"

    def reflect(sd):
        sd[key] = torch.diag(torch.tensor([-1.0] + [1.0] * 127))
        for p in ("single_visual_transformer.", "single_audio_transformer.", "multi_transformer."):
            sd[p + key[len("transformer.") :]] = sd[key].clone()

    with pytest.raises(ConvertError, match="orthogonal_ms1_linear.A: base has determinant -1"):
        convert_official(_broken(tmp_path, reflect), tmp_path / "out")


def test_load_model_reads_training_checkpoints_too(tmp_path):
    from avmt.checkpoint import save_checkpoint
    from avmt.config import load_config
    from avmt.models import AVBert
    from avmt.objectives import Pretraining

    cfg = load_config("tiny")
    pre = Pretraining(AVBert(cfg.model), cfg.objective)
    folder = save_checkpoint(tmp_path, 7, pre, {"step": 7, "config": cfg.to_dict()})  # what a training run writes
    model, got_cfg = load_model(tmp_path)  # the run folder: its newest checkpoint
    assert got_cfg == cfg and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pre.model.state_dict().values()))
    with pytest.raises(CheckpointError, match="holds no usable checkpoint"):
        load_model(tmp_path / "checkpoints")
    assert folder.exists()


@pytest.fixture(scope="module")
def plain_sd():
    """Official tensors with identity bases (the fast exact path), for the damaged variants of the bad-input table."""
    return official_state_dict(seed=1)


def _shared(sd, key, value):
    """``sd`` with ``key`` (a ``transformer.`` key) set to ``value`` under all four shared prefixes, as a real
    checkpoint of the one shared layer would hold it."""
    sd = dict(sd)
    for p in ("transformer.", "single_visual_transformer.", "single_audio_transformer.", "multi_transformer."):
        sd[p + key[len("transformer.") :]] = value
    return sd


SIZES = {  # the four tensors official_config reads its sizes from, at tiny sizes
    "visual_fc.weight": torch.zeros(8, 4),
    f"transformer.{LAYER}factor_ffn.s_linear.weight": torch.zeros(16, 4),
    f"transformer.{LAYER}attention.factor_query.ms0_linear.weight": torch.zeros(4, 8),
    "single_visual_embeddings.position_embeddings.weight": torch.zeros(22, 8),
}
V1 = f"transformer.{LAYER}attention.factor_key.ms1_linear.weight"
BASE2 = f"transformer.{LAYER}factor_ffn.orthogonal_ms2_linear.base"

# name: (how the input is made, argv after "official", what the one line says). Every case exits 1 and changes
# nothing in the test's folder (a foreign OUT, OUT.tmp or OUT.old included).
BAD_CONVERT = {
    "overwrite a foreign folder": ("foreign", ["{src}", "{tmp}/out", "--overwrite"], "it holds 'notes.txt', which avmt does not write"),
    "overwrite a file": ("file_out", ["{src}", "{tmp}/out", "--overwrite"], "is not a checkpoint folder avmt wrote (it is a file"),
    "overwrite a link": ("link_out", ["{src}", "{tmp}/out", "--overwrite"], "(it is a symbolic link)"),
    "overwrite a folder holding a sub-folder": ("nested", ["{src}", "{tmp}/out", "--overwrite"], "it holds 'step_000001'"),
    "overwrite the current folder": ("chdir", ["{src}", ".", "--overwrite"], "is the current folder or holds it"),
    "overwrite a folder holding the current one": ("chdir", ["{src}", "..", "--overwrite"], "is the current folder or holds it"),
    "a foreign OUT.tmp": ("foreign_tmp", ["{src}", "{tmp}/out"], "out.tmp exists and is not a checkpoint folder avmt wrote"),
    "a foreign OUT.old": ("foreign_old", ["{src}", "{tmp}/out", "--overwrite"], "out.old exists and is not a checkpoint folder avmt wrote"),
    "OUT exists": ("foreign", ["{src}", "{tmp}/out"], "out exists; choose another folder or overwrite it explicitly"),
    "no such checkpoint": (None, ["{tmp}/nope.pyth", "{tmp}/out"], "nope.pyth is not a file"),
    "a folder as checkpoint": (None, ["{tmp}", "{tmp}/out"], "is not a file"),
    "empty file": ("empty", ["{tmp}/bad.pyth", "{tmp}/out"], "bad.pyth is not a readable torch checkpoint: EOFError"),
    "junk file": ("junk", ["{tmp}/bad.pyth", "{tmp}/out"], "bad.pyth is not a readable torch checkpoint"),
    "a pickled list": ("list", ["{tmp}/bad.pyth", "{tmp}/out"], "has no 'state_dict' dict (it holds: list)"),
    "code in the pickle": ("payload", ["{tmp}/bad.pyth", "{tmp}/out"], "refused, since unpickling it could run arbitrary code"),
    "non-string keys": ("int_keys", ["{tmp}/bad.pyth", "{tmp}/out"], "key 3 (int) is not a string"),
    "no model keys": ("no_prefix", ["{tmp}/bad.pyth", "{tmp}/out"], "no state_dict key starts with 'avbert.'"),
    "0-d size tensor": ("scalar", ["{tmp}/bad.pyth", "{tmp}/out"], "visual_fc.weight has shape (): a matrix is needed"),
    "a size tensor missing": ("no_rank", ["{tmp}/bad.pyth", "{tmp}/out"], "the checkpoint lacks transformer."),
    "unknown override": ("sizes", ["{tmp}/bad.pyth", "{tmp}/out", "model.dimm=3"], "unknown config key 'model.dimm'"),
    "unknown preset": ("sizes", ["{tmp}/bad.pyth", "{tmp}/out", "--preset", "huge"], "preset='huge' is invalid"),
    "non-square rotation base": ("base", ["{tmp}/bad.pyth", "{tmp}/out"], "A has shape (128, 128) and base (128, 64)"),
    "wrongly shaped low-rank V": (
        "v",
        ["{tmp}/bad.pyth", "{tmp}/out"],
        "ms1_linear.weight has shape (128, 700), but avmt's layers.0.key.V",
    ),
    "a NaN tensor": ("nan", ["{tmp}/bad.pyth", "{tmp}/out"], "visual_fc.bias holds NaN or infinite values"),
}


@pytest.mark.parametrize("case", list(BAD_CONVERT))
def test_bad_input_is_a_one_line_error_that_changes_nothing(official, plain_sd, tmp_path, monkeypatch, capsys, case):
    how, argv, message = BAD_CONVERT[case]
    _, src, _, _ = official
    bad = tmp_path / "bad.pyth"
    if how in ("foreign", "nested", "foreign_old"):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "state.pt").write_text("mine too")
        if how == "foreign":
            (tmp_path / "out" / "notes.txt").write_text("mine")
        elif how == "nested":
            (tmp_path / "out" / "step_000001").mkdir()
        else:  # OUT itself could be avmt's: the foreign sibling is what is refused
            (tmp_path / "out.old").mkdir()
            (tmp_path / "out.old" / "thesis.tex").write_text("mine")
    elif how == "foreign_tmp":
        (tmp_path / "out.tmp").mkdir()
        (tmp_path / "out.tmp" / "data.csv").write_text("mine")
    elif how == "file_out":
        (tmp_path / "out").write_text("mine")
    elif how == "link_out":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "out").symlink_to(tmp_path / "elsewhere")
    elif how == "chdir":
        (tmp_path / "work" / "sub").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / "work" / "sub")
    elif how == "empty":
        bad.write_bytes(b"")
    elif how == "junk":
        bad.write_bytes(b"junk" * 100)
    elif how == "list":
        torch.save([1, 2], bad)
    elif how == "payload":
        torch.save({"state_dict": {"avbert.x": torch.zeros(1)}, "hook": Payload(tmp_path / "ran")}, bad)
    elif how == "int_keys":
        torch.save({"state_dict": {"avbert.visual_fc.weight": torch.zeros(2, 2), 3: torch.zeros(1)}}, bad)
    elif how == "no_prefix":
        torch.save({"state_dict": {"visual_fc.weight": torch.zeros(2, 2)}}, bad)
    elif how in ("scalar", "no_rank", "sizes"):
        sd = dict(SIZES)
        if how == "scalar":
            sd["visual_fc.weight"] = torch.tensor(3.0)
        if how == "no_rank":
            sd.pop(f"transformer.{LAYER}attention.factor_query.ms0_linear.weight")
        torch.save({"state_dict": {"avbert." + k: v for k, v in sd.items()}}, bad)
    elif how == "base":
        save_official(bad, _shared(plain_sd, BASE2, torch.eye(128)[:, :64].contiguous()))
    elif how == "v":
        save_official(bad, _shared(plain_sd, V1, torch.zeros(128, 700)))
    elif how == "nan":
        save_official(bad, dict(plain_sd) | {"visual_fc.bias": torch.full((768,), float("nan"))})
    before = snapshot(tmp_path)
    assert main(["official", *[a.format(src=src, tmp=tmp_path) for a in argv]]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith("avmt.convert: error: ") and message in line, line
    assert snapshot(tmp_path) == before and not (tmp_path / "ran").exists()


def test_overwrite_replaces_a_checkpoint_folder_avmt_wrote(official, tmp_path):
    _, src, _, _ = official
    assert main(["official", str(src), str(tmp_path / "out")]) == 0
    (tmp_path / "out" / "state.pt").write_bytes(b"damaged")  # still avmt's own folder: replaced, not refused
    assert main(["official", str(src), str(tmp_path / "out"), "--overwrite"]) == 0
    assert load_checkpoint(tmp_path / "out")["converted_from"]["format"] == "official"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp or .old left behind
