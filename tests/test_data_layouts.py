"""prepare --format ucf101 | esc50 | kinetics-sounds: the transfer datasets in their exact shipped layouts (made here,
tiny), their split/fold records, and the modality-optional path through the loaders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from bad_input import error_line, snapshot
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


def _files(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not probed: the metadata is refused first")


UCF_TRAIN, UCF_TEST = "A/v_A_g01_c01.avi 1\n", "B/v_B_g02_c01.avi\n"
ESC_HEAD = "filename,fold,target,category\n"
KS_HEAD = "youtube_id,time_start,time_end,label,split\n"

# name: (format, {file under the case folder: text}, extra argv, what the one line says). Every case exits 2, before
# any file is probed, and changes nothing outside OUT. A case folder holds ucf/ (UCF-101 + splits), esc/ (ESC-50),
# ks/ (Kinetics-Sounds) and secret.avi / secret.wav outside every root (what a '..' entry would pull in).
BAD_LAYOUTS = {
    "ucf101: '..' in a train list": ("ucf101", {"ucf/splits/trainlist01.txt": "A/../../../secret.avi 1\n"}, [], "'..' part"),
    "ucf101: '..' in a test list": (
        "ucf101",
        {"ucf/splits/testlist01.txt": "B/../../secret.avi\n"},
        [],
        "is not <Class>/<file> inside --root",
    ),
    "ucf101: absolute path": (
        "ucf101",
        {"ucf/splits/trainlist01.txt": "/etc/passwd 1\n"},
        [],
        "'/etc/passwd' is not <Class>/<file> inside",
    ),
    "ucf101: a deeper path": ("ucf101", {"ucf/splits/trainlist01.txt": "A/x/v.avi 1\n"}, [], "it has 3 path parts, expected 2"),
    "ucf101: another class's index": (
        "ucf101",
        {"ucf/splits/trainlist01.txt": "A/v_A_g01_c01.avi 2\n"},
        [],
        "has class index '2', but classInd.txt gives A index 1",
    ),
    "ucf101: index out of range": ("ucf101", {"ucf/splits/trainlist01.txt": "A/v_A_g01_c01.avi 7\n"}, [], "has class index '7'"),
    "ucf101: index not a number": ("ucf101", {"ucf/splits/trainlist01.txt": "A/v_A_g01_c01.avi one\n"}, [], "has class index 'one'"),
    "ucf101: index in a test list": ("ucf101", {"ucf/splits/testlist01.txt": "B/v_B_g02_c01.avi 1\n"}, [], "gives B index 2"),
    "ucf101: no index in a train list": (
        "ucf101",
        {"ucf/splits/trainlist01.txt": "A/v_A_g01_c01.avi\n"},
        [],
        "expected '<Class>/<file> <class index>'",
    ),
    "ucf101: extra columns": (
        "ucf101",
        {"ucf/splits/trainlist01.txt": "A/v_A_g01_c01.avi 1 x\n"},
        [],
        "expected '<Class>/<file> <class index>'",
    ),
    "ucf101: unknown class": ("ucf101", {"ucf/splits/trainlist01.txt": "C/v_C_g01_c01.avi 3\n"}, [], "class 'C' is not in classInd.txt"),
    "ucf101: a class twice in classInd": ("ucf101", {"ucf/splits/classInd.txt": "1 A\n2 A\n"}, [], "class 'A' is listed twice"),
    "ucf101: a path as class name": ("ucf101", {"ucf/splits/classInd.txt": "1 A\n2 ../B\n"}, [], "class name '../B' is not a folder name"),
    "ucf101: class indices with a gap": ("ucf101", {"ucf/splits/classInd.txt": "1 A\n3 B\n"}, [], "class indices are not 1..2 once each"),
    "ucf101: in train and test": (
        "ucf101",
        {"ucf/splits/testlist01.txt": "A/v_A_g01_c01.avi\n"},
        [],
        "is in both the train and the test list of split 1",
    ),
    "ucf101: no split lists": (
        "ucf101",
        {"ucf/splits/trainlist01.txt": None, "ucf/splits/testlist01.txt": None},
        [],
        "holds no trainlist0N.txt",
    ),
    "ucf101: --splits not a folder": ("ucf101", {}, ["--splits", "{case}/secret.avi"], "--splits"),
    "esc50: '..' in a filename": ("esc50", {"esc/meta/esc50.csv": ESC_HEAD + "1-x/../../../secret-0.wav,1,0,dog\n"}, [], "'..' part"),
    "esc50: absolute filename": ("esc50", {"esc/meta/esc50.csv": ESC_HEAD + "/tmp/1-1-A-0.wav,1,0,dog\n"}, [], "it is an absolute path"),
    "esc50: target and category disagree": (
        "esc50",
        {"esc/meta/esc50.csv": ESC_HEAD + "1-1-A-0.wav,1,0,dog\n1-2-A-0.wav,1,0,cat\n"},
        [],
        "esc50.csv:3: target 0 is 'cat' here but 'dog' on line 2",
    ),
    "esc50: a category with two targets": (
        "esc50",
        {"esc/meta/esc50.csv": ESC_HEAD + "1-1-A-0.wav,1,0,dog\n1-2-A-1.wav,1,1,dog\n"},
        [],
        "esc50.csv:3: category 'dog' is target 1 here but 0 on line 2",
    ),
    "esc50: fold 6": ("esc50", {"esc/meta/esc50.csv": ESC_HEAD + "6-1-A-0.wav,6,0,dog\n"}, [], "fold 6, target 0: ESC-50 has folds 1-5"),
    "esc50: fold 0": ("esc50", {"esc/meta/esc50.csv": ESC_HEAD + "0-1-A-0.wav,0,0,dog\n"}, [], "ESC-50 has folds 1-5 and targets 0-49"),
    "esc50: target 50": ("esc50", {"esc/meta/esc50.csv": ESC_HEAD + "1-1-A-50.wav,1,50,x\n"}, [], "fold 1, target 50"),
    "esc50: target -1": ("esc50", {"esc/meta/esc50.csv": ESC_HEAD + "1-1-A--1.wav,1,-1,x\n"}, [], "target -1"),
    "esc50: missing fields": ("esc50", {"esc/meta/esc50.csv": ESC_HEAD + "1-1-A-0.wav,1\n"}, [], "esc50.csv:2: no target, category"),
    "esc50: empty filename": ("esc50", {"esc/meta/esc50.csv": ESC_HEAD + ",1,0,dog\n"}, [], "esc50.csv:2: no filename"),
    "esc50: fold not a number": ("esc50", {"esc/meta/esc50.csv": ESC_HEAD + "1-1-A-0.wav,one,0,dog\n"}, [], "must be integers"),
    "esc50: name against its row": ("esc50", {"esc/meta/esc50.csv": ESC_HEAD + "1-1-A-0.wav,2,0,dog\n"}, [], "does not match fold 2"),
    "esc50: a column missing": ("esc50", {"esc/meta/esc50.csv": "filename,fold,target\n1-1-A-0.wav,1,0\n"}, [], "no column category"),
    "esc50: no meta CSV": ("esc50", {"esc/meta/esc50.csv": None}, [], "esc50.csv does not exist"),
    "kinetics: unknown split folder": ("kinetics-sounds", {"ks/val/dog/v.mp4": ""}, [], "'val' is not a Kinetics-Sounds split folder"),
    "kinetics: a class in one split only": (
        "kinetics-sounds",
        {"ks/train/tmp/v.mp4": ""},
        [],
        "class folder 'tmp' is in train but not in test",
    ),
    "kinetics: more classes than the dataset": (
        "kinetics-sounds",
        {f"ks/{s}/class{c:02d}/v.mp4": "" for s in ("train", "test") for c in range(32)},  # and dog: 33
        [],
        "33 classes (class00, class01, class02, ...), but Kinetics-Sounds has 32",
    ),
    "kinetics csv: missing fields": (
        "kinetics-sounds",
        {"ks.csv": KS_HEAD + "yt1,0,10\n"},
        ["--csv", "{case}/ks.csv"],
        "ks.csv:2: no label, split",
    ),
    "kinetics csv: unknown split": (
        "kinetics-sounds",
        {"ks.csv": KS_HEAD + "yt1,0,10,dog,val\n"},
        ["--csv", "{case}/ks.csv"],
        "split 'val' is not",
    ),
    "kinetics csv: '..' label": (
        "kinetics-sounds",
        {"ks.csv": KS_HEAD + "yt1,0,10,../..,train\n"},
        ["--csv", "{case}/ks.csv"],
        "label '../..'",
    ),
    "kinetics csv: a path as id": (
        "kinetics-sounds",
        {"ks.csv": KS_HEAD + "../yt1,0,10,dog,train\n"},
        ["--csv", "{case}/ks.csv"],
        "youtube_id",
    ),
    "kinetics csv: infinite time": (
        "kinetics-sounds",
        {"ks.csv": KS_HEAD + "yt1,0,inf,dog,train\n"},
        ["--csv", "{case}/ks.csv"],
        "must be finite",
    ),
    "kinetics csv: NaN time": (
        "kinetics-sounds",
        {"ks.csv": KS_HEAD + "yt1,nan,10,dog,train\n"},
        ["--csv", "{case}/ks.csv"],
        "must be finite",
    ),
    "kinetics csv: end before start": (
        "kinetics-sounds",
        {"ks.csv": KS_HEAD + "yt1,10,5,dog,train\n"},
        ["--csv", "{case}/ks.csv"],
        "got 10, 5",
    ),
    "kinetics csv: too many labels": (
        "kinetics-sounds",
        {"ks.csv": KS_HEAD + "".join(f"yt{c},0,10,class{c:02d},train\n" for c in range(33))},
        ["--csv", "{case}/ks.csv"],
        "but Kinetics-Sounds has 32",
    ),
    "kinetics csv: a folder as --csv": ("kinetics-sounds", {}, ["--csv", "{case}/ks"], "--csv"),
}


def _layout_case(case: Path) -> None:
    """Tiny well-formed layouts of the three datasets (empty media: these cases never reach a probe)."""
    _files(case, ["secret.avi", "secret.wav", "ucf/UCF-101/A/v_A_g01_c01.avi", "ucf/UCF-101/B/v_B_g02_c01.avi"])
    _files(case, ["esc/audio/1-1-A-0.wav", "esc/audio/1-2-A-0.wav", "ks/train/dog/v.mp4", "ks/test/dog/w.mp4"])
    (case / "ucf" / "splits").mkdir()
    (case / "ucf" / "splits" / "classInd.txt").write_text("1 A\n2 B\n")
    (case / "ucf" / "splits" / "trainlist01.txt").write_text(UCF_TRAIN)
    (case / "ucf" / "splits" / "testlist01.txt").write_text(UCF_TEST)
    (case / "esc" / "meta").mkdir()
    (case / "esc" / "meta" / "esc50.csv").write_text(ESC_HEAD + "1-1-A-0.wav,1,0,dog\n")


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_bad_dataset_metadata_is_a_one_line_error_before_any_work(tmp_path, capsys, case):
    fmt, files, extra, message = BAD_LAYOUTS[case]
    _layout_case(tmp_path)
    for name, text in files.items():
        if text is None:
            (tmp_path / name).unlink()
        else:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
    root = {"ucf101": "ucf/UCF-101", "esc50": "esc", "kinetics-sounds": "ks"}[fmt]
    argv = ["--format", fmt, "--root", str(tmp_path / root), "--out", str(tmp_path / "out"), "--quiet", "--workers", "0"]
    argv += ["--splits", str(tmp_path / "ucf" / "splits")] if fmt == "ucf101" and "--splits" not in extra else []
    argv += [a.format(case=tmp_path) for a in extra]
    before = snapshot(tmp_path)
    assert main(argv) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: ") and message in line, line
    assert snapshot(tmp_path) == before  # not even OUT: the metadata is checked before anything is written


def test_kinetics_sounds_labels_come_from_the_class_list_not_from_what_was_kept(tmp_path):
    """A class whose every file is rejected keeps its index, and so does every class after it."""
    _files(tmp_path, ["ks/train/a/x.mp4", "ks/test/a/y.mp4", "ks/train/b/x.mp4", "ks/test/b/y.mp4"])
    items = scan_kinetics_sounds(tmp_path / "ks")
    assert {(it.label, it.label_index) for it in items} == {("a", 0), ("b", 1)}
    (tmp_path / "ks.csv").write_text(KS_HEAD + "x,0,10,b,train\ny,0,10,c,test\n")
    assert [(it.label, it.label_index) for it in scan_kinetics_sounds(tmp_path / "ks", tmp_path / "ks.csv")] == [("b", 0), ("c", 1)]
