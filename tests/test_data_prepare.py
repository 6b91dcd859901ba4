"""prepare: every input is kept or rejected with the right reason; a re-run does no new work; CSV spans."""

import json
import os
import shutil

import numpy as np
import pytest
from bad_input import error_line, snapshot
from data_fixtures import SR, make_bad_files, make_synth

from avmt.data.manifest import load_manifest
from avmt.data.media import read_audio
from avmt.data.prepare import Item, main, prepare, scan_csv, scan_root


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    make_synth(root / "videos", "mp4", count=3, seconds=4.0)
    for d in (root / "videos").iterdir():  # class folders go directly under the scanned root
        shutil.move(str(d), str(root / d.name))
    (root / "videos").rmdir()
    expected = make_bad_files(root)
    (root / "stray.mp4").write_bytes(b"x")  # not in a class folder
    expected[str(root / "stray.mp4")] = "no_label"
    return root, expected


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_file_is_accounted_for_with_its_reason(mixed_root, tmp_path, capsys):
    root, expected = mixed_root
    items = scan_root(root)
    assert len(items) == 3 + len(expected)
    s = prepare(items, tmp_path, sample_rate=SR, min_seconds=2.0, workers=2, progress=False)
    kept, rejected = read_jsonl(tmp_path / "manifest.jsonl"), read_jsonl(tmp_path / "rejected.jsonl")
    assert (s.total, s.kept, s.rejected, s.processed, s.skipped) == (len(items), 3, len(expected), len(items), 0)
    assert sorted(r["path"] for r in kept + rejected) == sorted(it.path for it in items)  # exactly once each
    assert {r["path"]: r["reason"] for r in rejected} == expected
    assert all(r["detail"] for r in rejected)
    for r in kept:
        assert r["label"].startswith("class0") and r["fps"] == 8.0 and r["num_frames"] == 32
        assert (r["width"], r["height"], r["sample_rate"], r["video_codec"], r["audio_codec"]) == (64, 64, SR, "h264", "aac")
        assert 3.9 < r["duration"] <= 4.0 and r["audio_streams"] == 1
        wave = read_audio(r["audio"], 0, r["audio_samples"])
        assert wave.shape == (r["audio_samples"],) and 0.01 < np.abs(wave).max() <= 1.0
    assert json.loads((tmp_path / "labels.json").read_text()) == {"class00_disk": 0, "class01_square": 1, "class02_diamond": 2}

    # A re-run does no new work and leaves the outputs as they were.
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.jsonl")}
    s2 = prepare(scan_root(root), tmp_path, sample_rate=SR, min_seconds=2.0, workers=2, progress=False)
    assert (s2.processed, s2.skipped, s2.kept, s2.rejected) == (0, len(items), 3, len(expected))
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.jsonl")} == before

    # The CLI prints the summary.
    assert main(["--root", str(root), "--out", str(tmp_path), "--sample-rate", str(SR), "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{len(items)} files: 3 kept, {len(expected)} rejected" in out and "processed 0" in out


def test_rerun_redoes_only_changed_files(mixed_root, tmp_path):
    root, _ = mixed_root
    root2 = tmp_path / "root"
    shutil.copytree(root, root2, symlinks=True)
    out = tmp_path / "out"
    prepare(scan_root(root2), out, sample_rate=SR, min_seconds=2.0, progress=False)
    (root2 / "bad" / "empty.mp4").write_bytes(b"now something")  # changed since the last run
    s = prepare(scan_root(root2), out, sample_rate=SR, min_seconds=2.0, progress=False)
    assert s.processed == 1
    rej = {r["path"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    assert rej[str(root2 / "bad" / "empty.mp4")] == "not_a_video"
    assert len(read_jsonl(out / "manifest.jsonl")) + len(rej) == len(scan_root(root2))
    kept = len(read_jsonl(out / "manifest.jsonl"))
    s = prepare(scan_root(root2), out, sample_rate=SR // 2, min_seconds=2.0, progress=False)  # another rate: redone
    assert s.processed == kept and {r["sample_rate"] for r in read_jsonl(out / "manifest.jsonl")} == {SR // 2}


def test_csv_input_with_spans(mixed_root, tmp_path):
    root, _ = mixed_root
    videos = sorted(str(p) for p in root.glob("class*/*.mp4"))
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + f"{videos[0]},dog,0.5,3.5\n{videos[1]},cat\n{videos[2]},cat,3.0,3.5\n")
    s = prepare(scan_csv(csv), tmp_path / "out", sample_rate=SR, min_seconds=2.0, progress=False)
    assert (s.kept, s.rejected, s.reasons) == (2, 1, {"bad_span": 1})
    man = load_manifest(tmp_path / "out")
    assert [(r["label"], r["label_index"], r["start"], r["end"]) for r in man] == [
        ("dog", 1, 0.5, 3.5),
        ("cat", 0, 0.0, man[1]["duration"]),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("a.mp4\n")
    with pytest.raises(ValueError, match="expected path,label"):
        scan_csv(bad)


def test_extracted_audio_is_aligned_with_the_source(mixed_root, tmp_path):
    """The audio side-car written by prepare lines up with the synthesised waveform (AAC priming removed)."""
    from data_fixtures import FPS, SIZE

    from avmt.data.synth import SynthSpec, render

    root, _ = mixed_root
    video = next((root / "class01_square").glob("*.mp4"))
    prepare([Item(str(video), "class01_square")], tmp_path, sample_rate=SR, min_seconds=2.0, progress=False)
    rec = load_manifest(tmp_path)[0]
    _, source, _ = render(1, 1, SynthSpec(seconds=4.0, size=SIZE, fps=FPS, sample_rate=SR, num_classes=3, format="mp4", seed=0))
    got = read_audio(rec["audio"], 0, rec["audio_samples"])
    a, b = 2000, len(source) - 2000
    lag = max(range(-400, 401), key=lambda k: float(np.dot(source[a:b], got[a + k : b + k])))
    assert abs(lag) <= 16  # <= 1 ms at 16 kHz
    corr = np.corrcoef(source[a:b], got[a + lag : b + lag])[0, 1]
    assert corr > 0.9


def test_special_files_are_rejected_without_being_opened(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "root" / "a").mkdir(parents=True)
    os.mkfifo(tmp_path / "root" / "a" / "pipe.mp4")  # opening it for read would block until a writer comes
    cmd = [sys.executable, "-m", "avmt.data.prepare", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (rec,) = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert rec["reason"] == "not_regular_file" and "a FIFO" in rec["detail"]


def test_pool_workers_die_with_their_parent(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = (  # prepare's pool (avmt.workers.imap_bounded) with one worker busy for 10 minutes
        "import multiprocessing, threading, time\n"
        "from avmt.workers import imap_bounded\n"
        "threading.Thread(target=lambda: list(imap_bounded(time.sleep, [600], 1)), daemon=True).start()\n"
        "while not multiprocessing.active_children(): time.sleep(0.05)\n"
        "print(multiprocessing.active_children()[0].pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{worker}/stat") as f:  # a zombie waiting for its reaper is dead too
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {worker} outlived its killed parent by 10 s")


@pytest.mark.parametrize(
    "rows, args, code, message",
    [
        ("v.mp4,a\nv.mp4,a\n", [], 2, "is listed twice"),
        ("v.mp4,a,5,2\n", [], 2, "labels.csv:1: start,end must be finite with 0 <= start < end, got 5,2"),
        ("v.mp4,a,nan,2\n", [], 2, "labels.csv:1: start,end must be finite"),
        ("v.mp4,a,x,2\n", [], 2, "labels.csv:1: start,end must be numbers"),
        ("v.mp4,a,b\n", [], 2, "labels.csv:1: expected path,label[,start,end], got 3 columns"),
        ("v.mp4,a\n", ["--workers", "-1"], 2, "--workers >= 0"),
        ("v.mp4,a\n", ["--out", "{file}/out"], 1, "cannot write"),
        ("v.mp4,a\n", ["--out", "{file}"], 2, "file exists and is not a folder"),
        ("v.mp4,a\n", ["--min-seconds", "nan"], 2, "--min-seconds finite and > 0"),
        ("v.mp4,a\n", ["--min-seconds", "inf"], 2, "--min-seconds finite and > 0"),
        ("v.mp4,a\n", ["--min-seconds", "0"], 2, "--min-seconds finite and > 0"),
        ("v.mp4,a\n", ["--probe-timeout", "nan"], 2, "--probe-timeout finite and >= 0"),
        ("v.mp4,a\n", ["--probe-timeout", "inf"], 2, "--probe-timeout finite and >= 0"),
        ("v.mp4,a\n", ["--probe-timeout", "-1"], 2, "--probe-timeout finite and >= 0"),
        ("v.mp4,a\n", ["--sample-rate", "0"], 2, "--sample-rate > 0"),
        ("v.mp4,a\n", ["--max-repair", "nan"], 2, "--max-repair must be a share of the duration in [0, 1], got nan"),
        ("v.mp4,a\n", ["--max-repair", "1.5"], 2, "--max-repair must be a share of the duration in [0, 1], got 1.5"),
        ("v.mp4,a\n", ["--transcode", "--crf", "60"], 2, "0 <= crf <= 51"),
        ("v.mp4,a\n", ["--transcode", "--fps", "nan"], 2, "fps > 0"),
        ("v.mp4,a\n", ["--transcode", "--short-side", "1"], 2, "short_side >= 2"),
        ("v.mp4,a\n", ["--transcode", "--preset", "huge"], 2, "preset='huge' is invalid"),
        ("v.mp4,a\n", ["--fps", "30"], 2, "--short-side, --fps and --crf set what --transcode writes"),
        ("v.mp4,a\n", ["--csv", "{dir}"], 2, "is not a regular file"),
        ("v.mp4,a\n", ["--csv", "{fifo}"], 2, "fifo is not a regular file"),  # opening it would block forever
        ("v.mp4,a\n", ["--csv", "{dir}/none.csv"], 2, "none.csv is not a regular file"),
        ("v.mp4,a\n", ["--format", "ucf101"], 2, "--format ucf101 takes --root and --splits"),
        ("v.mp4,a\n", ["--root", "{dir}"], 2, "--format folders takes --root"),
        ("v.mp4,a\n", ["--format", "mp4"], 2, "invalid choice: 'mp4'"),
        ("v.mp4,a\n", ["--workers", "two"], 2, "invalid int value: 'two'"),
    ],
)
def test_bad_cli_input_is_a_one_line_error(tmp_path, capsys, rows, args, code, message):
    (tmp_path / "labels.csv").write_text(rows)
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    argv = ["--csv", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out"), "--quiet"]
    argv += [a.format(file=tmp_path / "file", dir=tmp_path / "dir", fifo=tmp_path / "fifo") for a in args]
    before = snapshot(tmp_path, exclude=("out",))
    try:
        got = main(argv)
    except SystemExit as e:  # argparse's own errors (a type or a choice)
        got = e.code
    assert got == code
    line = error_line(capsys.readouterr().err)
    assert "error: " in line and message in line, line
    assert snapshot(tmp_path, exclude=("out",)) == before


def test_the_pcm_side_car_reads_as_the_flac_of_earlier_manifests(mixed_root, tmp_path):
    """prepare writes a .npy side-car; it and the FLAC that earlier versions wrote from the same samples give the same
    windows, exactly (both 16-bit), zeros outside the file included."""
    from data_fixtures import write_flac

    from avmt.data.media import write_pcm

    root, _ = mixed_root
    video = next((root / "class01_square").glob("*.mp4"))
    prepare([Item(str(video), "class01_square")], tmp_path, sample_rate=SR, min_seconds=2.0, progress=False)
    assert load_manifest(tmp_path)[0]["audio"].endswith(".npy")
    n = 3 * SR + 77
    samples = np.random.default_rng(0).uniform(-0.9, 0.9, n).astype(np.float32)
    write_pcm(tmp_path / "new.npy", samples)
    write_flac(tmp_path / "old.flac", samples, SR)
    for start, length in ((0, n), (1234, 5000), (n - 100, 400), (-50, 200), (n + 10, 30)):
        np.testing.assert_array_equal(read_audio(tmp_path / "new.npy", start, length), read_audio(tmp_path / "old.flac", start, length))
    got = read_audio(tmp_path / "new.npy", -50, 200)
    assert not got[:50].any() and np.abs(got[50:] - samples[:150]).max() < 1e-4
