"""python -m avmt.evaluate --protocol finetune: training the whole model + heads, scoring, the CLI and its errors."""

import json
import os

import pytest
import torch
from bad_input import error_line, refused, snapshot

import avmt.evaluate
from avmt.config import load_config
from avmt.data.loader import loader_status
from avmt.data.manifest import load_manifest
from avmt.evaluate import EvaluationError, FinetuneSettings, finetune, labelled_split, main, pair_accuracy, score_classifiers
from avmt.models import AVBert, EncoderOutput
from avmt.objectives import Pretraining, swap_permutation
from avmt.train import TrainingError, synthetic_manifest, train

# Few steps, no dropout and no warm-up, so that a handful of steps measurably lowers the loss.
QUICK = FinetuneSettings(epochs=3, batch_size=2, lr=1e-3, dropout=0.0, warmup_fraction=0.0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    os.environ["AVMT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return synthetic_manifest(load_config("tiny").data, count=12, progress=False)


@pytest.fixture(scope="module")
def run_dir(manifest, tmp_path_factory):
    """A one-step pretraining run on the tiny dataset: a real checkpoint for the command line."""
    run = tmp_path_factory.mktemp("run")
    train(
        load_config(
            "tiny",
            overrides=[
                f"data.manifest={manifest}",
                "data.num_workers=0",
                f"train.run_dir={run}",
                "train.batch_size=4",
                "train.max_steps=1",
                "train.warmup_steps=1",
            ],
        ),
        progress=False,
    )
    return run


def test_finetune_trains_every_part_lowers_the_loss_and_scores_both_splits(manifest):
    cfg = load_config("tiny", overrides=[f"data.manifest={manifest}", "data.num_workers=0"])
    records = load_manifest(manifest)
    labels, is_test, classes = labelled_split(records, 0.3)
    train_records = [r for r, t in zip(records, is_test.tolist()) if not t]
    torch.manual_seed(0)
    model = AVBert(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clfs, history = finetune(model, cfg, train_records, classes, ["audiovisual"], QUICK, torch.device("cpu"), progress=False)

    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model is untouched
    tuned = clfs["audiovisual"].model.state_dict()
    for part in ("visual_cnn.", "audio_cnn.", "visual_proj.", "audio_proj.", "layers."):  # CNNs, projections, Transformers
        changed = [k for k in before if k.startswith(part) and before[k].is_floating_point() and not torch.equal(before[k], tuned[k])]
        assert changed, f"fine-tuning left every {part}* tensor unchanged"
    assert len(history["audiovisual"]) == QUICK.epochs and history["audiovisual"][-1] < history["audiovisual"][0], history

    scores = score_classifiers(clfs, cfg, records, 2, labels, is_test, torch.device("cpu"), progress=False)
    s = scores["audiovisual"]
    assert set(s) == {"train_top1", "train_top5", "test_top1", "test_top5"}
    assert all(0 <= v <= 100 for v in s.values()) and s["train_top5"] >= s["train_top1"] and s["test_top5"] >= s["test_top1"]


def test_finetune_is_deterministic_given_a_seed(manifest):
    cfg = load_config("tiny", overrides=[f"data.manifest={manifest}", "data.num_workers=0"])
    records = load_manifest(manifest)[:4]
    settings = FinetuneSettings(epochs=1, batch_size=2, seed=7)

    def head_after() -> torch.Tensor:
        torch.manual_seed(0)
        clfs, history = finetune(AVBert(cfg.model), cfg, records, 6, ["audio"], settings, torch.device("cpu"), progress=False)
        return clfs["audio"].fc.weight.detach(), history["audio"]

    (w1, h1), (w2, h2) = head_after(), head_after()
    assert torch.equal(w1, w2) and h1 == h2


@pytest.mark.parametrize("code", ["video", "class"])
def test_pair_accuracy_pairs_each_video_with_its_own_and_a_swapped_audio(manifest, monkeypatch, code):
    """An oracle CPP head that sees which video (or only which class) the clips came from (the most common code
    of each stream, so that one masked clip per stream does not fool it): the video oracle is right on every
    pair; the class oracle misses exactly the swaps within a class. Masked input really is masked."""
    cfg = load_config("tiny", overrides=[f"data.manifest={manifest}"])
    records = load_manifest(manifest)
    labels, _, _ = labelled_split(records, 0.3)
    n, views, t = len(records), 2, cfg.data.num_clips
    ids = (torch.arange(n) if code == "video" else labels).float()
    tokens = ids[None, :, None, None].expand(views, n, t, cfg.model.dim)  # [V, N, T, D]: every token carries its code
    monkeypatch.setattr(avmt.evaluate, "over_views", lambda fn, cfg, records, views, *a, **k: {"visual": tokens, "audio": tokens})
    pre = Pretraining(AVBert(cfg.model), cfg.objective)
    altered = []  # per encode call: how many tokens are not a code (the mask embedding)

    def encode(vis, aud):
        altered.append(int((vis[..., 0] != vis[..., 0].round()).sum() + (aud[..., 0] != aud[..., 0].round()).sum()))
        return EncoderOutput(None, None, torch.cat([vis, aud], 1))

    pre.model.encode = encode
    pre.cpp_logits = lambda enc: torch.where(enc.multimodal[:, :t, 0].mode(1).values == enc.multimodal[:, t:, 0].mode(1).values, 1.0, -1.0)
    result = pair_accuracy(pre, cfg, records, labels, views, seed=3, progress=False)

    perm = swap_permutation(n, 1.0, torch.Generator().manual_seed(3))
    share = float((labels[perm] == labels).float().mean())
    assert set(result) == {"masked", "unmasked"} and 0 < share < 1
    for r in result.values():
        assert r["pairs"] == 2 * n * views and r["same_class_share"] == pytest.approx(share)
        assert r["matched"] == 1.0 and r["swapped_other_class"] == 1.0
        assert r["swapped_same_class"] == (1.0 if code == "video" else 0.0)
        assert r["accuracy"] == pytest.approx(1.0 if code == "video" else 1 - share / 2)
    c = 2 * -(-n // 8)  # encode calls per view and kind (matched + swapped, batches of 8): masked first, then unmasked
    assert len(altered) == 2 * views * c
    for v in range(views):
        masked, unmasked = altered[2 * v * c : (2 * v + 1) * c], altered[(2 * v + 1) * c : (2 * v + 2) * c]
        assert sum(masked) > 0 and sum(unmasked) == 0


def test_cli_finetune_compares_pretrained_and_random_init(run_dir, manifest, capsys):
    rc = main(
        [
            "--checkpoint",
            str(run_dir),
            "--protocol",
            "finetune",
            "--heads",
            "audio",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--compare-random",
            "--json",
            "--quiet",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["protocol"] == "finetune" and out["manifest"] == str(manifest) and out["heads"] == ["audio"]
    assert out["settings"]["epochs"] == 1 and out["settings"]["batch_size"] == 2 and out["videos"] == 12
    for name in ("pretrained", "random_init"):
        s = out[name]["audio"]
        assert set(s) == {"train_top1", "train_top5", "test_top1", "test_top5", "train_loss"} and len(s["train_loss"]) == 1
        assert all(0 <= s[k] <= 100 for k in s if k != "train_loss")
    assert out["pretrained"]["audio"]["train_loss"] != out["random_init"]["audio"]["train_loss"]  # two different models


def test_bad_input_fails_clearly_before_any_work(run_dir, manifest, tmp_path, capsys):
    def fails(args, code, message):
        if code == 2:  # argument errors: argparse's usage + message
            with pytest.raises(SystemExit) as e:
                main(["--checkpoint", str(run_dir), *args] if "--checkpoint" not in args else args)
            assert e.value.code == 2
        else:
            assert main(["--checkpoint", str(run_dir), *args]) == code
        err = capsys.readouterr().err
        assert message in err, err

    fails(["--checkpoint", str(tmp_path / "nope")], 2, "nope does not exist")
    fails(["--checkpoint", str(tmp_path)], 2, "holds no checkpoint")
    fails(["--protocol", "finetune", "--epochs", "0"], 2, "epochs=0 is out of range")
    fails(["--heads", "visual,smell"], 2, "--heads 'visual,smell' is invalid")
    fails(["--manifest", str(tmp_path / "missing.jsonl")], 2, "missing.jsonl does not exist")
    rows = load_manifest(manifest)
    one_class = tmp_path / "one_class.jsonl"
    one_class.write_text("".join(json.dumps(dict(r, label_index=0)) + "\n" for r in rows))
    fails(["--manifest", str(one_class), "--protocol", "finetune"], 1, "a single class")
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "label_index"}) + "\n" for r in rows))
    fails(["--manifest", str(unlabelled)], 1, "unlabelled.jsonl, line 1: field 'label_index' is missing")
    dali_ok, why = loader_status("cpu")["dali"]  # DALI's CPU pipeline cannot read the synthetic H.264 videos
    fails(["--loader", "dali", "--device", "cpu"], 1, "reads only vp9, mjpeg: 12 of 12 videos are h264" if dali_ok else why)
    with pytest.raises(EvaluationError, match="fewer than one batch of 8"):
        cfg = load_config("tiny", overrides=[f"data.manifest={manifest}", "data.num_workers=0"])
        finetune(AVBert(cfg.model), cfg, rows[:3], 6, ["audio"], FinetuneSettings(), torch.device("cpu"), progress=False)


def _as_converted(run_dir, out):
    """The run's model weights as ``python -m avmt.convert`` writes them: a checkpoint folder with ``model.*`` only
    and a ``converted_from`` record (a tiny stand-in for the converted official checkpoint, which is paper-sized)."""
    from safetensors.torch import load_file

    from avmt.checkpoint import export_checkpoint, find_checkpoint, load_checkpoint

    src = find_checkpoint(run_dir).path
    weights = {k: v for k, v in load_file(src / "model.safetensors").items() if k.startswith("model.")}
    state = {"step": 0, "config": load_checkpoint(src)["config"], "converted_from": {"format": "official", "path": "x", "sha256": "0"}}
    return export_checkpoint(out, weights, state)


def test_a_converted_checkpoint_evaluates_without_pretraining_heads(run_dir, manifest, tmp_path, capsys):
    out = _as_converted(run_dir, tmp_path / "converted")
    assert main(["--checkpoint", str(out), "--manifest", str(manifest), "--heads", "visual", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert "pretrained_cpp" not in res and res["converted_from"]["format"] == "official"
    assert set(res["pretrained"]) == {"visual"}


def test_init_from_starts_a_run_from_the_weights_and_fresh_heads(run_dir, manifest, tmp_path, capsys):
    from avmt.checkpoint import load_model

    out = _as_converted(run_dir, tmp_path / "converted")
    source, _ = load_model(out)
    base = [f"data.manifest={manifest}", "data.num_workers=0", "train.batch_size=4", "train.warmup_steps=1", "train.lr=1e-12"]
    cfg = load_config("tiny", overrides=[*base, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=1", f"train.init_from={out}"])
    train(cfg, progress=False)
    assert f"initialised the model from {out}" in capsys.readouterr().err
    started, _ = load_model(tmp_path / "run")
    for (k, a), b in zip(source.state_dict().items(), started.state_dict().values()):
        if "running" not in k and "num_batches" not in k:  # BatchNorm statistics move in a train-mode step; weights barely (lr 1e-12)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    # the run resumes with its own init_from (not read again: it has its own weights); another one is refused, not
    # silently ignored; a missing init_from is a one-line error
    nowhere = f"train.init_from={tmp_path}/nowhere"
    with pytest.raises(TrainingError, match="train.init_from=.*nowhere is not used: .* already holds this run's weights"):
        train(load_config("tiny", overrides=[*base, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2", nowhere]), progress=False)
    train(
        load_config("tiny", overrides=[*base, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2", f"train.init_from={out}"]),
        progress=False,
    )
    cfg = load_config("tiny", overrides=[*base, f"train.run_dir={tmp_path / 'other'}", "train.max_steps=1", nowhere])
    with pytest.raises(TrainingError, match="train.init_from: .*nowhere does not exist"):
        train(cfg, progress=False)


class _Payload:
    """What a malicious state.pt pickles: unpickling it would run ``touch``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tampered(run_dir, folder, how):
    """A copy of the run's checkpoint folder changed as ``how`` says, its manifest rewritten to match (so that only
    the content, not a checksum, is wrong)."""
    import hashlib
    import shutil

    from avmt.checkpoint import find_checkpoint

    shutil.copytree(find_checkpoint(run_dir).path, folder)
    state = torch.load(folder / "state.pt", weights_only=True)
    if how == "no config":
        torch.save({k: v for k, v in state.items() if k != "config"}, folder / "state.pt")
    elif how == "invalid config":
        state["config"]["model"]["dim"] = -8
        torch.save(state, folder / "state.pt")
    elif how == "code in state.pt":
        torch.save(state | {"config": _Payload(folder.parent / "ran")}, folder / "state.pt")
    elif how == "junk state.pt":
        (folder / "state.pt").write_bytes(b"junk" * 64)
    elif how == "a list as state.pt":
        torch.save([1, 2, 3], folder / "state.pt")
    elif how == "junk weights":
        (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00junkjunk")
    elif how == "foreign weights":
        from safetensors.torch import save_file

        save_file({"model.other": torch.zeros(3)}, folder / "model.safetensors")
    files = {
        f: {"bytes": (folder / f).stat().st_size, "sha256": hashlib.sha256((folder / f).read_bytes()).hexdigest()}
        for f in ("model.safetensors", "state.pt")
    }
    (folder / "manifest.json").write_text(json.dumps({"step": 1, "files": files}))
    return folder


# name: (argv after --checkpoint CHECKPOINT, exit code, what the one line says). "{ckpt}" is a tampered copy of the run's
# checkpoint (the case name says how), "{tmp}" the test's folder. Exit 2: argparse's usage block, then the line.
BAD_EVALUATE = {
    "device without CUDA": (["--device", "cuda"], 2, "--device cuda: no CUDA device here"),
    "unknown device": (["--device", "tpu"], 2, "tpu"),
    "meta device": (["--device", "meta"], 2, "--device meta: expected cpu, cuda or cuda:N"),
    "lr inf": (["--protocol", "finetune", "--lr", "inf"], 2, "--lr must be a finite number, got inf"),
    "lr nan": (["--protocol", "finetune", "--lr", "nan"], 2, "lr=nan is out of range"),
    "lr 0": (["--protocol", "finetune", "--lr", "0"], 2, "lr=0.0 is out of range"),
    "transfer lr inf": (["--protocol", "ucf101", "--lr", "inf"], 2, "setting backbone_lr=inf is out of range"),
    "head lr inf": (["--protocol", "esc50", "--head-lr", "inf"], 2, "setting head_lr=inf is out of range"),
    "warmup inf": (["--protocol", "finetune", "--warmup-fraction=-inf"], 2, "warmup_fraction=-inf is out of range"),
    "weight decay inf": (["--protocol", "finetune", "--weight-decay", "inf"], 2, "--weight-decay must be a finite number"),
    "dropout 1": (["--protocol", "finetune", "--dropout", "1"], 2, "dropout=1.0 is out of range"),
    "epochs 0": (["--protocol", "finetune", "--epochs", "0"], 2, "epochs=0 is out of range"),
    "transfer batch 0": (["--protocol", "kinetics-sounds", "--batch-size", "0"], 2, "setting batch_size=0 is out of range"),
    "temporal views 0": (["--protocol", "ucf101", "--temporal-views", "0"], 2, "setting temporal_views=0 is out of range"),
    "views 0": (["--views", "0"], 2, "--views must be >= 1"),
    "test fraction 1": (["--test-fraction", "1"], 2, "--test-fraction in (0, 1)"),
    "test fraction nan": (["--test-fraction", "nan"], 2, "--test-fraction in (0, 1)"),
    "watchdog nan": (["--watchdog-s", "nan"], 2, "--watchdog-s must be a finite number of seconds >= 0"),
    "watchdog negative": (["--watchdog-s", "-1"], 2, "--watchdog-s must be a finite number of seconds >= 0"),
    "unknown head": (["--heads", "visual,smell"], 2, "--heads 'visual,smell' is invalid"),
    "a head twice": (["--heads", "audio,audio"], 2, "--heads 'audio,audio' is invalid"),
    "unknown protocol": (["--protocol", "svm"], 2, "invalid choice: 'svm'"),
    "split 4 of ucf101": (["--protocol", "ucf101", "--split", "4"], 2, "--split '4': ucf101 has splits/folds 1, 2, 3"),
    "fold 0 of esc50": (["--protocol", "esc50", "--fold", "0"], 2, "--split '0': esc50 has splits/folds 1, 2, 3, 4, 5"),
    "split for linear": (["--split", "1"], 2, "--split is for the transfer protocols"),
    "data override for linear": (["data.frames=8"], 2, "data overrides is for the transfer protocols"),
    "no such manifest": (["--manifest", "{tmp}/none.jsonl"], 2, "none.jsonl does not exist"),
    "a folder as manifest": (["--manifest", "{tmp}"], 2, "is not a regular file"),
    "no such checkpoint": (["--checkpoint", "{tmp}/none"], 2, "none does not exist"),
    "a folder without checkpoint": (["--checkpoint", "{tmp}"], 2, "holds no checkpoint"),
    "no config": ([], 1, "state.pt holds no config"),
    "invalid config": ([], 1, "the config in state.pt is invalid: model.dim=-8 is invalid"),
    "code in state.pt": ([], 1, "state.pt holds a pickled posix.system, which is refused"),
    "junk state.pt": ([], 1, "state.pt is not a readable checkpoint state"),
    "a list as state.pt": ([], 1, "state.pt holds a list, not a checkpoint state"),
    "junk weights": ([], 1, "model.safetensors is not a readable safetensors file"),
    "foreign weights": ([], 1, "the weights do not fit the module"),
}


@pytest.mark.parametrize("case", list(BAD_EVALUATE))
def test_bad_input_is_a_one_line_error_that_changes_nothing(run_dir, manifest, tmp_path, capsys, case):
    args, code, message = BAD_EVALUATE[case]
    if case == "device without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ckpt = _tampered(run_dir, tmp_path / "ckpt", case) if code == 1 else run_dir
    argv = ["--checkpoint", str(ckpt), "--manifest", str(manifest), "--quiet", *[a.format(tmp=tmp_path) for a in args]]
    before, run_before = snapshot(tmp_path), snapshot(run_dir)
    try:
        got = main(argv)
    except SystemExit as e:  # argparse: the usage block, then the error line
        got = e.code
    assert got == code
    line = error_line(capsys.readouterr().err)
    assert line.startswith("python -m avmt.evaluate: error: " if code == 2 else "avmt.evaluate: error: ") and message in line, line
    assert snapshot(tmp_path) == before and snapshot(run_dir) == run_before and not (tmp_path / "ran").exists()


# train.init_from reads checkpoints through the same loaders: each damaged one is a one-line error of python -m avmt.train
BAD_INIT_FROM = {
    "code in state.pt": "state.pt holds a pickled posix.system, which is refused",
    "junk state.pt": "state.pt is not a readable checkpoint state",
    "junk weights": "model.safetensors is not a readable safetensors file",
    "foreign weights": "the model weights do not fit the model of its config",
    "no config": "state.pt holds no config",
    "invalid config": "the config in state.pt is invalid: model.dim=-8 is invalid",
}


@pytest.mark.parametrize("case", list(BAD_INIT_FROM))
def test_a_damaged_init_from_is_a_one_line_error(run_dir, manifest, tmp_path, capsys, case):
    from avmt.train import main as train_main

    ckpt = _tampered(run_dir, tmp_path / "ckpt", case)
    argv = ["--quiet", f"data.manifest={manifest}", "data.num_workers=0", "train.batch_size=4", f"train.run_dir={tmp_path / 'run'}"]
    argv.append(f"train.init_from={ckpt}")
    before = snapshot(tmp_path, exclude=("run",))
    code, line, _ = refused(train_main, argv, capsys)
    assert code == 1 and line.startswith("avmt.train: error: train.init_from: ") and BAD_INIT_FROM[case] in line, line
    assert snapshot(tmp_path, exclude=("run",)) == before and not (tmp_path / "ran").exists()
