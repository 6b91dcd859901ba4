"""The transfer protocols (avmt.protocols, python -m avmt.evaluate --protocol ucf101 | esc50 | kinetics-sounds) end to
end from a tiny checkpoint on tiny datasets in the exact shipped layouts, and their split logic."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from data_fixtures import SR
from layout_fixtures import make_esc50, make_kinetics, make_ucf101

from avmt.config import load_config
from avmt.data.layouts import scan_esc50, scan_kinetics_sounds, scan_ucf101
from avmt.data.manifest import load_manifest
from avmt.data.prepare import prepare
from avmt.evaluate import main
from avmt.models import AVBert
from avmt.protocols import DEFAULTS, AudioClassifier, ProtocolError, _param_groups, folds_of, run_protocol, split_of, table
from avmt.train import synthetic_manifest, train

TINY_DATA = ["data.frames=4", "data.fps=4"]  # the tiny preset's clip length instead of the protocols' 32 frames at 15 fps
QUICK = ["--epochs", "1", "--batch-size", "4", "--train-repeats", "1", "--test-crop", "36", "--quiet", "--json"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-step pretraining run of the tiny preset: a real checkpoint."""
    os.environ["AVMT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    manifest = synthetic_manifest(load_config("tiny").data, count=8, progress=False)
    run = tmp_path_factory.mktemp("run")
    overrides = [f"data.manifest={manifest}", "data.num_workers=0", f"train.run_dir={run}", "train.batch_size=4", "train.max_steps=1"]
    train(load_config("tiny", overrides=[*overrides, "train.warmup_steps=1"]), progress=False)
    return run


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    ucf_root, ucf_splits = make_ucf101(base / "ucf")
    esc_root = make_esc50(base / "esc")
    ks_root, _ = make_kinetics(base / "ks")
    out = {}
    for name, items in (
        ("ucf101", scan_ucf101(ucf_root, ucf_splits)),
        ("esc50", scan_esc50(esc_root)),
        ("kinetics-sounds", scan_kinetics_sounds(ks_root)),
    ):
        prepare(items, base / f"prepared-{name}", SR, 2.0, progress=False)
        out[name] = base / f"prepared-{name}" / "manifest.jsonl"
    return out


def test_split_logic_of_each_layout(datasets):
    ucf = load_manifest(datasets["ucf101"])
    assert folds_of("ucf101", ucf) == ["1", "2", "3"]
    for fold in "123":
        train = {r["path"] for r in ucf if split_of("ucf101", r, fold) == "train"}
        test = {r["path"] for r in ucf if split_of("ucf101", r, fold) == "test"}
        assert train and test and not train & test
    esc = load_manifest(datasets["esc50"])
    assert folds_of("esc50", esc) == ["1", "2", "3", "4", "5"]
    tests = [{r["path"] for r in esc if split_of("esc50", r, f) == "test"} for f in "12345"]
    assert sum(map(len, tests)) == len(esc) and len(set().union(*tests)) == len(esc)  # each file is tested exactly once
    ks = load_manifest(datasets["kinetics-sounds"])
    assert folds_of("kinetics-sounds", ks) == ["1"] and {split_of("kinetics-sounds", r, "1") for r in ks} == {"train", "test"}
    with pytest.raises(ProtocolError, match="have no 'fold'.*--format esc50"):
        folds_of("esc50", ucf)


@pytest.mark.parametrize("protocol", ["ucf101", "esc50", "kinetics-sounds"])
def test_each_protocol_runs_end_to_end_from_a_tiny_checkpoint(run_dir, datasets, protocol, capsys):
    args = ["--checkpoint", str(run_dir), "--protocol", protocol, "--manifest", str(datasets[protocol]), *QUICK]
    views = ["--temporal-views", "2", "--spatial-views", "2"]
    assert main([*args, *views, *TINY_DATA]) == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out)["pretrained"]
    folds = {"ucf101": ["1", "2", "3"], "esc50": ["1", "2", "3", "4", "5"], "kinetics-sounds": ["1"]}[protocol]
    assert list(res["folds"]) == folds
    n = len(load_manifest(datasets[protocol]))
    for r in res["folds"].values():
        assert 0 <= r["test_top1"] <= r["test_top5"] <= 100 and len(r["train_loss"]) == 1
        assert r["train_videos"] + r["test_videos"] + r["excluded_videos"] == n
        assert r["views"] == (2 if protocol == "esc50" else 4)  # audio: temporal views only
    assert res["test_top1_mean"] == pytest.approx(sum(r["test_top1"] for r in res["folds"].values()) / len(folds))
    assert res["settings"]["epochs"] == 1 and res["data"]["test"]["crop_size"] == 36
    assert res["data"]["train"]["num_clips"] == (10 if protocol == "kinetics-sounds" else 1)


def test_one_split_a_table_and_the_authors_defaults(run_dir, datasets, capsys):
    args = ["--checkpoint", str(run_dir), "--protocol", "ucf101", "--manifest", str(datasets["ucf101"]), *QUICK[:-1]]
    assert main([*args, "--split", "2", "--temporal-views", "1", "--spatial-views", "1", *TINY_DATA]) == 0
    printed = capsys.readouterr().out
    assert "| 2 |" in printed and "| 1 |" not in printed and "mean ± std" in printed
    assert DEFAULTS["ucf101"].epochs == 20 and DEFAULTS["ucf101"].head_lr == 0.03 and DEFAULTS["ucf101"].spatial_views == 3
    assert DEFAULTS["esc50"].backbone_lr == 0 and DEFAULTS["esc50"].epochs == 300 and DEFAULTS["esc50"].schedule == "linear"
    assert DEFAULTS["kinetics-sounds"].batch_size == 5 and DEFAULTS["kinetics-sounds"].temporal_views == 1


def test_esc50_trains_only_the_linear_head_on_the_frozen_cnn(run_dir, datasets):
    from avmt.checkpoint import load_model

    model, cfg = load_model(run_dir)
    clf = AudioClassifier(model, classes=2, dropout=0.1)
    groups = _param_groups(clf, DEFAULTS["esc50"])
    assert {id(p) for g in groups for p in g["params"]} == {id(clf.fc.weight), id(clf.fc.bias)}
    clf.train()
    assert not clf.cnn.training and clf.fc.training  # BatchNorm statistics of the CNN stay
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = dataclasses.replace(DEFAULTS["esc50"], epochs=1, batch_size=4, train_repeats=1, temporal_views=1)
    res = run_protocol("esc50", model, cfg.data, load_manifest(datasets["esc50"]), s, torch.device("cpu"), ["3"], False, TINY_DATA)
    assert list(res["folds"]) == ["3"] and res["folds"]["3"]["test_videos"] == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the given model is untouched
    assert "| 3 | 8 | 2 |" in table(res)


def test_bad_protocol_input_is_a_clear_error(run_dir, datasets, tmp_path, capsys):
    ucf = str(datasets["ucf101"])
    base = ["--checkpoint", str(run_dir), "--manifest", ucf, *QUICK]
    assert main([*base, "--protocol", "esc50"]) == 1
    assert "have no 'fold'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not a split of the dataset: refused before the checkpoint is read
        main([*base, "--protocol", "ucf101", "--split", "7"])
    assert "--split '7': ucf101 has splits/folds 1, 2, 3" in capsys.readouterr().err
    assert main([*base, "--protocol", "kinetics-sounds"]) == 1  # UCF101 records: half have no audio, and no 'split'
    assert "have no 'split'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--protocol", "linear", "--split", "1"])
    assert "--split is for the transfer protocols" in capsys.readouterr().err
    assert main([*base, "--protocol", "ucf101", "model.dim=8"]) == 1
    assert "data.key=value overrides of the data section only" in capsys.readouterr().err
    # a record without audio cannot feed the audio-visual protocol: reported, not skipped
    recs = [dict(r, split="train" if i % 2 else "test") for i, r in enumerate(load_manifest(ucf))]
    with pytest.raises(Exception, match="have no audio"):
        run_protocol(
            "kinetics-sounds",
            AVBert(load_config("tiny").model),
            load_config("tiny").data,
            recs,
            DEFAULTS["kinetics-sounds"],
            torch.device("cpu"),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("protocol", ["ucf101", "esc50", "kinetics-sounds"])
def test_each_protocols_model_trains_under_bf16_autocast_on_cuda(protocol):
    """What run_split does per step on a GPU (bf16 autocast, the protocol's loss, backward), on random batches of the
    tiny geometry: finite loss and gradients, and bf16 logits close to the fp32 ones of the same weights."""
    from avmt.protocols import _loss, build_classifier

    torch.manual_seed(0)
    cfg = load_config("tiny")
    clf = build_classifier(protocol, AVBert(cfg.model), 5, dropout=0.0).cuda().eval()  # eval: no dropout, fixed BN
    t = 10 if protocol == "kinetics-sounds" else 1
    batch = {
        "video": torch.randint(0, 256, (4, t, 3, cfg.data.frames, 32, 32), dtype=torch.uint8).cuda(),
        "audio": torch.randn(4, t, 1, cfg.data.n_mels, cfg.data.mel_frames).cuda(),
        "label": torch.tensor([0, 1, 2, 3]).cuda(),
    }
    with torch.no_grad():
        ref = clf(batch).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = clf(batch)
        loss = _loss(protocol, out, batch["label"])
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in clf.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.float(), ref, atol=0.05 * ref.abs().max().item() + 1e-3, rtol=0.05)
