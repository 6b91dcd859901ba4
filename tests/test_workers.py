"""avmt.workers: spawned workers, tasks bounded in wall-clock time; and every pool and loader of avmt started after
this process has used FFmpeg's threads (the way a notebook or a script does before it runs prepare or train)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import SR, TEST_CFG, make_synth

from avmt.data.loader_cpu import CPULoader
from avmt.data.media import probe_and_extract, read_frames
from avmt.data.prepare import prepare, scan_root
from avmt.data.synth import SynthSpec, generate
from avmt.data.transcode import TranscodeSettings, transcode_video
from avmt.workers import START_METHOD, TaskTimeout, WorkerDied, imap_bounded


def _square(x: int) -> int:
    return x * x


def _stuck_or_square(x: int) -> int:
    """Job -1 blocks the way a decoder stuck in C code does: no signal handler of the worker can stop it."""
    if x == -1:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT})
        time.sleep(3600)
    if x == -2:
        os.kill(os.getpid(), signal.SIGSEGV)
    if x == -3:
        raise ValueError("job -3 is bad")
    return x * x


def test_the_start_method_is_spawn():
    assert START_METHOD == "spawn"


def test_imap_bounded_returns_every_result_once():
    got = dict(imap_bounded(_square, range(7), workers=2))
    assert got == {i: i * i for i in range(7)}


@pytest.mark.timeout(120)
def test_a_stuck_task_is_stopped_and_its_worker_replaced():
    t0 = time.monotonic()
    got = dict(imap_bounded(_stuck_or_square, [1, -1, 2, -2, 3, 4], workers=2, timeout_s=3.0))
    assert isinstance(got[1], TaskTimeout) and got[1].seconds == 3.0  # job 1 hung: its worker was killed
    assert isinstance(got[3], WorkerDied)  # job 3 crashed its worker
    assert [got[i] for i in (0, 2, 4, 5)] == [1, 4, 9, 16]  # the others went on, on replaced workers
    assert time.monotonic() - t0 < 60


def test_an_exception_in_a_task_is_raised_in_the_parent():
    with pytest.raises(ValueError, match="job -3 is bad"):
        list(imap_bounded(_stuck_or_square, [1, -3, 2], workers=1))


def test_a_worker_killed_by_a_signal_is_reported_and_replaced():
    got = dict(imap_bounded(_stuck_or_square, [-2, 5], workers=1))
    assert isinstance(got[0], WorkerDied) and "SIGSEGV" in got[0].describe()
    assert got[1] == 25


def test_closing_the_iterator_early_ends_every_worker():
    it = imap_bounded(_stuck_or_square, [1, -1, -1], workers=3)
    first = next(it)
    assert first == (0, 1)
    it.close()  # two workers are still stuck: they are killed, not waited for
    assert not [p for p in __import__("multiprocessing").active_children() if p.is_alive()]


def test_prepare_rejects_a_file_whose_worker_was_stopped_and_goes_on(tmp_path, monkeypatch):
    """What prepare does with a file that outlived its wall-clock limit (its worker killed) or whose worker died:
    a rejected record with the reason, its partial outputs removed, every other file processed."""
    import avmt.data.prepare as prep

    videos = make_synth(tmp_path / "v", "mp4", count=3, seconds=3.0)
    items = scan_root(videos)
    real = prep.imap_bounded

    def pool(fn, jobs, workers, limit):
        assert limit == pytest.approx(prep.wall_clock_limit(7.0, False))
        for n, rec in real(fn, jobs, workers, limit):
            if n == 0:  # as if the first file had hung: its partial side-car is left behind
                key = prep._file_key(items[0].path)
                (tmp_path / "out" / "audio" / f"{key}.part.npy").write_bytes(b"partial")
                rec = TaskTimeout(limit)
            elif n == 1:
                rec = WorkerDied(-signal.SIGSEGV)
            yield n, rec

    monkeypatch.setattr(prep, "imap_bounded", pool)
    s = prepare(items, tmp_path / "out", SR, 2.0, workers=2, progress=False, timeout_s=7.0)
    assert s.kept == 1 and s.reasons == {"timeout": 1, "error": 1}
    rejected = {r["path"]: r for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    assert "wall-clock" in rejected[items[0].path]["detail"] and "SIGSEGV" in rejected[items[1].path]["detail"]
    assert not list((tmp_path / "out" / "audio").glob("*.part.npy"))


def _use_ffmpeg_threads(video: Path, out: Path) -> None:
    """What leaves FFmpeg state with threads in this process, as the two hangs that were seen did: a threaded
    decode, a transcode (swscale slice threads), an audio resampling filter graph (probe_and_extract), and a few
    frame reads; none of it freed on purpose."""
    av = pytest.importorskip("av")
    with av.open(str(video)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for n, frame in enumerate(c.decode(s)):
            frame.reformat(width=96, height=96, format="rgb24")
            if n > 10:
                break
    transcode_video(video, out / "t.mp4", TranscodeSettings(48, 8))
    probe_and_extract(str(video), SR, 1.0)
    read_frames(str(video), np.arange(8).reshape(2, 4), 8.0, height=64, width=64, box=(0, 0, 48, 48), threads=0)


@pytest.mark.timeout(600)
def test_every_pool_and_loader_starts_after_ffmpeg_was_used_here(tmp_path):
    """Round after round in one process: FFmpeg's threads used in this process, then synth's and prepare's pools
    (plain and --transcode) and the CPU loader's workers (train and eval mode, fresh and persistent) started."""
    spec = SynthSpec(seconds=3.0, size=64, fps=8, sample_rate=SR, num_classes=2, format="mp4", seed=0)
    for r in range(3):
        root = tmp_path / f"round{r}"
        generate(root / "videos", 4, spec, workers=2, progress=False)
        (root / "videos" / "labels.csv").unlink()
        (root / "videos" / "synth.json").unlink()
        first = sorted((root / "videos").rglob("*.mp4"))[0]
        _use_ffmpeg_threads(first, root)
        items = scan_root(root / "videos")
        assert prepare(items, root / "plain", SR, 2.0, workers=2, progress=False).kept == 4
        _use_ffmpeg_threads(first, root)
        tc = prepare(items, root / "tc", SR, 2.0, workers=2, progress=False, transcode=TranscodeSettings(48, 8))
        assert tc.kept == 4
        _use_ffmpeg_threads(first, root)
        cfg = TEST_CFG.__class__(**{**TEST_CFG.__dict__, "window_seconds": 2.0, "num_clips": 1, "batch_timeout_s": 120.0})
        for train in (True, False):
            loader = CPULoader(root / "tc" / "manifest.jsonl", cfg, 2, train=train, num_workers=2, seed=r)
            for epoch in range(2):  # the second epoch reuses the persistent workers
                loader.set_epoch(epoch)
                batches = list(loader)
                assert len(batches) == 2 and all(b["video"].dtype == torch.uint8 for b in batches)
            loader.close()
