"""prepare --format ucf101 | esc50 | kinetics-sounds: the transfer datasets in their exact shipped layouts (made here,
tiny), their split/fold records, and the modality-optional path through the loaders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from data_fixtures import SR, TEST_CFG
from layout_fixtures import UCF_CLASSES, make_esc50, make_kinetics, make_ucf101, write_wav

from avmt.data.clips import View
from avmt.data.layouts import scan_esc50, scan_kinetics_sounds, scan_ucf101
from avmt.data.loader import LoaderError, build_loader
from avmt.data.loader_cpu import CPULoader
from avmt.data.manifest import load_manifest
from avmt.data.prepare import main, prepare


@pytest.fixture(scope="module")
def ucf101(tmp_path_factory):
    return make_ucf101(tmp_path_factory.mktemp("ucf"))


@pytest.fixture(scope="module")
def esc50(tmp_path_factory):
    return make_esc50(tmp_path_factory.mktemp("esc"))


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    return make_kinetics(tmp_path_factory.mktemp("ks"))


def test_ucf101_layout_prepares_with_classind_labels_splits_and_silent_videos(ucf101, tmp_path):
    root, splits = ucf101
    out = tmp_path / "ucf"
    assert main(["--format", "ucf101", "--root", str(root), "--splits", str(splits), "--out", str(out), "--quiet"]) == 0
    recs = load_manifest(out)
    assert len(recs) == 12 and not (out / "rejected.jsonl").read_text()
    assert json.loads((out / "labels.json").read_text()) == {c: i for i, c in enumerate(UCF_CLASSES)}  # classInd, 0-based
    for r in recs:
        assert r["label_index"] == UCF_CLASSES.index(Path(r["path"]).parent.name)
        assert r["modalities"] == (["video", "audio"] if r["audio"] else ["video"])
        group = int(Path(r["path"]).stem.split("_g")[1][:2])
        assert r["splits"] == {str(k): "test" if group == k else "train" for k in (1, 2, 3)}
    assert sum(r["audio"] is None for r in recs) == 6  # the silent half is kept for the visual protocol
    for k in "123":  # no file in both train and test of a split, every file in one of them
        train = {r["path"] for r in recs if r["splits"][k] == "train"}
        test = {r["path"] for r in recs if r["splits"][k] == "test"}
        assert train and test and not train & test and len(train | test) == 12


def test_ucf101_split_errors_are_named(ucf101, tmp_path):
    root, splits = ucf101
    bad = tmp_path / "splits"
    bad.mkdir()
    for f in splits.iterdir():
        (bad / f.name).write_text(f.read_text())
    leaked = (splits / "trainlist01.txt").read_text().splitlines()[0].split()[0]
    (bad / "testlist01.txt").write_text((bad / "testlist01.txt").read_text() + leaked + "\n")
    with pytest.raises(ValueError, match=f"{leaked} is in both the train and the test list of split 1"):
        scan_ucf101(root, bad)
    (bad / "classInd.txt").write_text("1 ApplyEyeMakeup\nBasketball\n")
    with pytest.raises(ValueError, match=r"classInd.txt:2: expected '<index from 1> <class name>'"):
        scan_ucf101(root, bad)
    assert main(["--format", "ucf101", "--root", str(root), "--out", str(tmp_path / "o")]) == 2  # --splits missing


def test_esc50_layout_gives_audio_only_records_whose_folds_partition_the_set(esc50, tmp_path):
    out = tmp_path / "esc"
    assert main(["--format", "esc50", "--root", str(esc50), "--out", str(out), "--sample-rate", str(SR), "--quiet"]) == 0
    recs = load_manifest(out)
    assert len(recs) == 10 and all(r["modalities"] == ["audio"] and "fps" not in r for r in recs)
    assert json.loads((out / "labels.json").read_text()) == {"dog": 0, "rooster": 1}
    folds = [{r["path"] for r in recs if r["fold"] == f} for f in range(1, 6)]
    assert all(len(f) == 2 for f in folds) and set().union(*folds) == {r["path"] for r in recs}  # a partition
    assert all(r["duration"] == pytest.approx(5.0, abs=0.01) for r in recs)
    # an unlisted file is rejected with its reason; a CSV row whose name contradicts its fold is an error
    write_wav(esc50.parent / "extra" / "audio" / "9-1-A-0.wav", 5.0, 44100, 440.0)
    (esc50.parent / "extra" / "meta").mkdir()
    (esc50.parent / "extra" / "meta" / "esc50.csv").write_text("filename,fold,target,category\n9-1-A-0.wav,2,0,dog\n")
    with pytest.raises(ValueError, match="does not match fold 2 and target 0"):
        scan_esc50(esc50.parent / "extra")


def test_audio_only_records_load_audio_only_and_refuse_video(esc50, tmp_path):
    out = tmp_path / "esc"
    prepare(scan_esc50(esc50), out, SR, 2.0, progress=False)
    cfg = dataclasses.replace(TEST_CFG, num_clips=1, window_seconds=2.0)
    batches = list(build_loader(out / "manifest.jsonl", cfg, 4, train=True, device="cpu", modalities=("audio",)))
    assert sum(len(b["label"]) for b in batches) == 10
    assert all(set(b) == {"audio", "label", "index", "failures"} for b in batches)  # no stand-in video
    assert batches[0]["audio"].shape[1:] == (1, 1, cfg.n_mels, cfg.mel_frames)
    with pytest.raises(LoaderError, match="10 of 10 manifest records have no video"):
        build_loader(out / "manifest.jsonl", cfg, 4, train=True, device="cpu")


def test_video_only_loading_and_deterministic_test_views(ucf101, tmp_path):
    root, splits = ucf101
    out = tmp_path / "ucf"
    prepare(scan_ucf101(root, splits), out, SR, 2.0, progress=False)
    recs = load_manifest(out)
    cfg = dataclasses.replace(TEST_CFG, num_clips=1, window_seconds=1.0, clip_seconds=1.0, scale_range=(64, 64))  # 48 px crops
    with pytest.raises(LoaderError, match="6 of 12 manifest records have no audio"):
        build_loader(recs, cfg, 4, train=False, device="cpu")
    views = {}
    for clip in range(3):
        for crop in range(3):
            loader = CPULoader(recs, cfg, 12, train=False, num_workers=0, modalities=("video",), view=View(clip, 3, crop, 3))
            (batch,) = list(loader)
            assert set(batch) == {"video", "label", "index", "failures"}
            views[clip, crop] = batch["video"]
    # the same view twice is the same; temporal views differ in time, spatial ones in position
    again = list(CPULoader(recs, cfg, 12, train=False, num_workers=0, modalities=("video",), view=View(2, 3, 1, 3)))[0]["video"]
    assert torch.equal(again, views[2, 1])
    assert not torch.equal(views[0, 1], views[2, 1]) and not torch.equal(views[1, 0], views[1, 2])
    # spatial crop 0 of 3 starts at the left edge, 2 ends at the right one (64 px frames, 48 px crops: 0, 8, 16)
    whole = dataclasses.replace(cfg, crop_size=64)
    full = list(CPULoader(recs, whole, 12, train=False, num_workers=0, modalities=("video",), view=View(1, 3)))
    assert torch.equal(views[1, 0], full[0]["video"][..., 8:56, 0:48]) and torch.equal(views[1, 2], full[0]["video"][..., 8:56, 16:64])


def test_kinetics_sounds_folder_and_csv_layouts(kinetics, tmp_path):
    root, csv_path = kinetics
    out = tmp_path / "ks"
    assert main(["--format", "kinetics-sounds", "--root", str(root), "--out", str(out), "--sample-rate", str(SR), "--quiet"]) == 0
    recs = load_manifest(out)
    assert len(recs) == 6 and {r["split"] for r in recs} == {"train", "test"}
    assert json.loads((out / "labels.json").read_text()) == {"dog barking": 0, "playing drums": 1}  # sorted names
    assert all(r["label"] == Path(r["path"]).parent.name and r["split"] == Path(r["path"]).parents[1].name for r in recs)
    assert all(r["modalities"] == ["video", "audio"] for r in recs)
    items = scan_kinetics_sounds(root, csv_path)
    assert len(items) == 7 and items[-1].fields == {"split": "test"}
    s = prepare(items, tmp_path / "ks_csv", SR, 2.0, progress=False)
    assert s.kept == 6 and s.reasons == {"unreadable": 1}  # the listed clip that is not on disk is accounted for
    by_path = {r["path"]: r["split"] for r in load_manifest(tmp_path / "ks_csv")}
    assert by_path == {r["path"]: r["split"] for r in recs}
