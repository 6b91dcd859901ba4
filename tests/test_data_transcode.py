"""avmt.data.transcode and prepare --transcode: size, constant frame rate, keyframe grid, resumability, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import SR, TEST_CFG, check_contract, make_synth

from avmt.data.loader_cpu import CPULoader
from avmt.data.manifest import load_manifest
from avmt.data.media import MediaError, read_frames
from avmt.data.prepare import main, prepare, scan_root
from avmt.data.transcode import TranscodeSettings, output_size, transcode_video

av = pytest.importorskip("av")  # every test here writes or reads media with PyAV


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("tc") / "videos", "mp4", count=2, seconds=6.0)


def _keyframes(path):
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        flags = [p.is_keyframe for p in c.demux(vs) if p.size]
        return flags, vs.codec_context.name, (vs.codec_context.width, vs.codec_context.height), float(vs.average_rate)


def test_output_size_keeps_the_aspect_never_upscales_and_is_even():
    assert output_size(1280, 720, 128) == (228, 128)
    assert output_size(720, 1280, 128) == (128, 228)
    assert output_size(64, 48, 128) == (64, 48)  # smaller than asked: kept
    assert output_size(101, 75, 50) == (68, 50)


@pytest.mark.parametrize("fps", [8.0, 4.0, 12.5])
def test_constant_rate_h264_with_a_keyframe_every_second(videos, tmp_path, fps):
    src = next(videos.rglob("*.mp4"))
    meta = transcode_video(src, tmp_path / "out.mp4", TranscodeSettings(short_side=32, fps=fps))
    flags, codec, size, rate = _keyframes(tmp_path / "out.mp4")
    assert (codec, size, rate) == ("h264", (32, 32), fps) and meta["width"] == meta["height"] == 32
    assert meta["num_frames"] == len(flags) == round(6.0 * fps)  # 6 s at the new rate: frames repeated or dropped
    gop = round(fps)
    assert [i for i, k in enumerate(flags) if k] == list(range(0, len(flags), gop))
    assert not list(tmp_path.glob("*.part*"))
    frames = read_frames(tmp_path / "out.mp4", np.arange(meta["num_frames"]), fps)
    assert frames.shape == (meta["num_frames"], 32, 32, 3)


def test_a_file_that_cannot_be_transcoded_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(MediaError) as e:
        transcode_video(bad, tmp_path / "out.mp4", TranscodeSettings(short_side=32, fps=8))
    assert e.value.reason == "transcode"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mp4"]


def test_prepare_transcode_records_both_files_resumes_and_feeds_the_loader(videos, tmp_path, capsys):
    out = tmp_path / "prepared"
    settings = TranscodeSettings(short_side=64, fps=8)
    s = prepare(scan_root(videos), out, sample_rate=SR, min_seconds=2.0, transcode=settings, progress=False)
    assert s.kept == 2 and s.transcoded_bytes > 0 and s.video_hours == pytest.approx(12 / 3600)
    recs = load_manifest(out)
    for r in recs:
        assert r["path"].startswith(str(out / "video")) and r["video_codec"] == "h264" and r["transcode"] == settings.to_dict()
        assert r["source"]["path"].startswith(str(videos)) and r["source"]["size"] > 0
    (out / "video" / "leftover.mp4.part.mp4").write_bytes(b"half")  # what a kill mid-transcode leaves
    again = prepare(scan_root(videos), out, sample_rate=SR, min_seconds=2.0, transcode=settings, progress=False)
    assert again.processed == 0 and again.skipped == 2  # resumed: nothing redone
    other = prepare(scan_root(videos), out, sample_rate=SR, min_seconds=2.0, transcode=TranscodeSettings(64, 4.0), progress=False)
    assert other.processed == 2 and {r["fps"] for r in load_manifest(out)} == {4.0}  # new settings: redone
    batches = list(CPULoader(out, TEST_CFG, 2, train=False, num_workers=0))
    check_contract(batches[0], TEST_CFG, 2)
    assert main(["--root", str(videos), "--out", str(tmp_path / "cli"), "--transcode", "--short-side", "32", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "transcoded to 32 px, 16 fps" in printed and "per hour of video" in printed  # --fps: the paper preset's 16
    first = [json.loads(line) for line in (tmp_path / "cli" / "manifest.jsonl").read_text().splitlines()]
    assert first[0]["fps"] == 16.0 and {r["transcode"]["crf"] for r in first} == {23}  # x264's default quality
    before = sum(Path(r["path"]).stat().st_size for r in first)
    assert main(["--root", str(videos), "--out", str(tmp_path / "cli"), "--transcode", "--short-side", "32", "--crf", "35", "--quiet"]) == 0
    redone = [json.loads(line) for line in (tmp_path / "cli" / "manifest.jsonl").read_text().splitlines()]
    assert {r["transcode"]["crf"] for r in redone} == {35} and len(redone) == 2  # another quality: every file redone
    assert sum(Path(r["path"]).stat().st_size for r in redone) < before


def test_transcode_options_need_transcode(videos, tmp_path, capsys):
    assert main(["--root", str(videos), "--out", str(tmp_path / "x"), "--short-side", "32"]) == 2
    assert "pass --transcode" in capsys.readouterr().err
    assert main(["--root", str(videos), "--out", str(tmp_path / "x"), "--transcode", "--fps", "0"]) == 2
    assert "expected short_side >= 2, fps > 0" in capsys.readouterr().err
    assert main(["--root", str(videos), "--out", str(tmp_path / "x"), "--crf", "20"]) == 2
    assert "pass --transcode" in capsys.readouterr().err
    assert main(["--root", str(videos), "--out", str(tmp_path / "x"), "--transcode", "--crf", "52"]) == 2
    assert "0 <= crf <= 51" in capsys.readouterr().err


def test_a_transcode_past_the_time_limit_is_rejected_as_a_timeout(videos, tmp_path, monkeypatch):
    import time

    import avmt.data.prepare as prep

    monkeypatch.setattr(prep, "transcode_video", lambda src, dst, settings: time.sleep(5))
    # in this process (workers=0), where the monkeypatch applies and only the in-worker limit (SIGALRM) acts
    s = prepare(scan_root(videos), tmp_path, SR, 2.0, workers=0, progress=False, timeout_s=0.5, transcode=TranscodeSettings(32, 8))
    assert s.reasons == {"timeout": 2}  # not "transcode": the time limit is not mistaken for a media error
    rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert all("took longer than 0.5 s" in r["detail"] for r in rejected)


def test_an_interrupted_transcode_leaves_no_part_file(videos, tmp_path, monkeypatch):
    import avmt.data.transcode as tc

    def interrupted(*args):
        raise KeyboardInterrupt  # what prepare's time limit or a Ctrl-C does mid-file

    monkeypatch.setattr(tc, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        transcode_video(next(videos.rglob("*.mp4")), tmp_path / "out.mp4", TranscodeSettings(32, 8))
    assert list(tmp_path.iterdir()) == []


def _corrupt_middle(src, dst):
    """``src`` with the payload of its middle keyframe zeroed: an H.264 mp4 that opens and probes (first frames, last
    second, audio) and then fails to decode half-way (FFmpeg: InvalidDataError)."""
    with av.open(str(src)) as c:
        keyframes = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size and p.is_keyframe]
    pos, size = keyframes[len(keyframes) // 2]
    data = bytearray(src.read_bytes())
    data[pos + 4 : pos + size] = bytes(size - 4)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))


def test_a_video_whose_decode_fails_mid_way(videos, tmp_path, caplog):
    import logging

    src = sorted(videos.rglob("*.mp4"))[0]
    bad = tmp_path / "in" / src.parent.name / "bad.mp4"
    _corrupt_middle(src, bad)
    # transcoding decodes every frame: the file is rejected with the decoder's error, and no output is left
    s = prepare(scan_root(tmp_path / "in"), tmp_path / "tc", SR, 2.0, progress=False, transcode=TranscodeSettings(32, 8))
    assert s.kept == 0 and s.reasons == {"transcode": 1}
    rejected = json.loads((tmp_path / "tc" / "rejected.jsonl").read_text())
    assert "InvalidDataError" in rejected["detail"] and rejected["path"] == str(bad)
    assert list((tmp_path / "tc" / "video").iterdir()) == []
    # without --transcode the cheap probe keeps it; the loader then fails on it, logs it and replaces it
    s = prepare(scan_root(tmp_path / "in"), tmp_path / "plain", SR, 2.0, progress=False)
    assert s.kept == 1
    prepare(scan_root(videos), tmp_path / "good", SR, 2.0, progress=False)
    recs = load_manifest(tmp_path / "plain") + load_manifest(tmp_path / "good")
    with caplog.at_level(logging.WARNING, logger="avmt.data"):
        loader = CPULoader(recs, TEST_CFG, 1, train=False, num_workers=0)
        batches = list(loader)
    assert loader.failures >= 1 and "bad.mp4" in caplog.text and "InvalidDataError" in caplog.text
    assert [int(b["index"]) for b in batches][1:] == [1, 2] and int(batches[0]["index"]) != 0  # row 0 replaced


@pytest.mark.parametrize("room", ["audio", "none"])
def test_a_full_disk_stops_prepare_and_keeps_what_was_done(videos, tmp_path, tmpfs, capsys, room):
    """A real full disk (a small tmpfs), filled while the audio side-car (``none``) or the transcoded video (``audio``) of the
    second video is written: prepare stops with the reason instead of rejecting the file, keeps the first video's
    record, leaves no partial file, and the same command finishes once there is space."""
    disk = tmpfs("2m")
    out = disk / "prepared"
    first, second = sorted(videos.rglob("*.mp4"))
    settings = TranscodeSettings(short_side=64, fps=8)
    only_first = [it for it in scan_root(videos) if it.path == str(first)]
    assert prepare(only_first, out, SR, 2.0, progress=False, transcode=settings).kept == 1
    before = (out / "manifest.jsonl").read_text()
    # the second video's side-car and transcode sizes, from a run elsewhere
    prepare([it for it in scan_root(videos) if it.path == str(second)], tmp_path / "sizes", SR, 2.0, progress=False, transcode=settings)
    side = next((tmp_path / "sizes" / "audio").iterdir()).stat().st_size
    video = next((tmp_path / "sizes" / "video").iterdir()).stat().st_size
    assert video > 2 * 4096  # more than the slack below
    free = __import__("shutil").disk_usage(disk).free
    pages = -(-side // 4096) * 4096  # tmpfs allocates whole pages
    keep = pages + 4096 if room == "audio" else 0  # room for the second side-car but not for its video, or for nothing
    (disk / "filler").write_bytes(b"\0" * max(0, free - keep))
    args = ["--root", str(videos), "--out", str(out), "--transcode", "--short-side", "64", "--fps", "8", "--quiet", "--workers", "1"]
    args += ["--sample-rate", str(SR)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run the same command again" in err, err
    assert bool(list((out / "audio").glob(f"{'*'}.npy"))) and len(list((out / "audio").iterdir())) == (2 if room == "audio" else 1)
    assert (out / "manifest.jsonl").read_text().startswith(before)  # the first record is intact
    assert not (out / "rejected.jsonl").exists() or (out / "rejected.jsonl").read_text() == ""  # nothing rejected for it
    assert not [p for p in out.rglob("*") if ".part." in p.name]  # no partial side-car or video
    (disk / "filler").unlink()
    assert main(args) == 0
    assert {r["source"]["path"] for r in load_manifest(out)} == {str(first), str(second)}
