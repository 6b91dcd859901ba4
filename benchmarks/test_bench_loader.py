"""The CPU loader fed three ways, side by side on the same generated videos (docs/data.md, "Transcoding").

- ``original``: the originals as a user has them (full: 1280x720 H.264 at 25 fps, a keyframe every 10 s);
- ``transcoded``: their ``prepare --transcode`` copies (the paper data config: 160-px short side, 16 fps, a keyframe
  every second);
- ``decode_whole``: the originals, each sequence decoded from the file's first frame to its last and the frames
  picked afterwards (the released AVBERT code's method), the rest of the pipeline unchanged.

Each case reports sequences per second at the paper data settings (T=15 clips x 32 frames at 16 fps, 112^2
crops, 80 x 128 log-mel, train mode) with the loader's default worker count, timed in rounds that alternate between
the cases (the machine's speed drifts over minutes), its ratio to the originals overall and round by round, the CPU
seconds one sequence costs on one core (in-process, as a worker loads it), and the share of time a short
training run (the ``small`` preset, batch 4, audio at 44.1 kHz as prepared) fed by it waits for data. Quick mode
(CI) shrinks the videos and the counts so that it only proves the benchmark runs; keep numbers from ``--full``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avmt.config import load_config
from avmt.data.clips import sample_rng
from avmt.data.loader import worker_count
from avmt.data.loader_cpu import CPULoader, SequenceDataset
from avmt.data.manifest import load_manifest
from avmt.data.media import FrameConverter
from avmt.data.prepare import prepare, scan_root
from avmt.data.synth import SynthSpec, generate
from avmt.data.transcode import TranscodeSettings
from avmt.workers import START_METHOD

CASES = ("original", "transcoded", "decode_whole")


@dataclasses.dataclass(frozen=True)
class Inputs:
    original: Path  # prepared manifest of the originals
    transcoded: Path  # prepared manifest of their transcoded copies
    width: int
    height: int
    keyframe_seconds: float
    videos: int
    seconds: float
    transcode_wall_s: float  # prepare --transcode of all videos (probe + FLAC + transcode), wall clock


def _upscale(src: Path, dst: Path, width: int, height: int, keyframe_seconds: float) -> None:
    """``src`` re-encoded at ``width`` x ``height`` (stretched: the content does not matter here) with a keyframe every
    ``keyframe_seconds``, audio copied: a user's file (synth renders small square frames; 720p in memory would not fit)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        vin, ain = inp.streams.video[0], inp.streams.audio[0]
        rate = vin.average_rate
        vout = out.add_stream("libx264", rate=rate)
        vout.width, vout.height, vout.pix_fmt = width, height, "yuv420p"
        gop = str(round(keyframe_seconds * float(rate)))
        vout.codec_context.options = {"preset": "veryfast", "crf": "23", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        aout = out.add_stream_from_template(ain)
        for packet in inp.demux(vin, ain):
            if packet.stream is ain:
                if packet.dts is not None:
                    packet.stream = aout
                    out.mux(packet)
                continue
            for frame in packet.decode():
                frame = frame.reformat(width=width, height=height, format="yuv420p")
                frame.pict_type = 0
                for p in vout.encode(frame):
                    out.mux(p)
        for p in vout.encode(None):
            out.mux(p)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, request) -> Inputs:
    full = bool(request.config.getoption("--full"))
    cfg = load_config("paper").data
    root = tmp_path_factory.mktemp("loader")
    videos, seconds = (4, 40.0) if full else (2, 32.0)
    width, height = (1280, 720) if full else (256, 144)
    spec = SynthSpec(seconds=seconds, size=128, fps=25, sample_rate=cfg.sample_rate, num_classes=2, format="mp4", seed=0)
    generate(root / "small", videos, spec, workers=worker_count(-1), progress=False)
    for src in sorted((root / "small").rglob("*.mp4")):
        dst = root / "originals" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        _upscale(src, dst, width, height, keyframe_seconds=10.0)
    items = scan_root(root / "originals")
    prepare(items, root / "original", cfg.sample_rate, 2.0, workers=worker_count(-1), progress=False)
    settings = TranscodeSettings(cfg.scale_range[1], cfg.fps)
    t0 = time.perf_counter()
    prepare(items, root / "transcoded", cfg.sample_rate, 2.0, workers=worker_count(-1), progress=False, transcode=settings)
    wall = time.perf_counter() - t0
    return Inputs(root / "original" / "manifest.jsonl", root / "transcoded" / "manifest.jsonl", width, height, 10.0, videos, seconds, wall)


def _read_whole(path, indices, fps, height=None, width=None, box=None, threads=0, out=None, **_) -> np.ndarray:
    """The released code's method: decode every frame of the file, then pick the sequence's frames (converted to RGB,
    rescaled, cut and written out as :func:`avmt.data.media.read_frames` does, so only the decoding differs)."""
    import av

    convert = FrameConverter(height, width, box)
    want = np.asarray(indices)
    wanted, got = set(want.reshape(-1).tolist()), {}
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        vs.thread_count = threads
        if threads != 1:
            vs.thread_type = "AUTO"
        for n, frame in enumerate(c.decode(vs)):
            if n in wanted:
                got[n] = convert(frame)
    last = max(got)
    if out is None:
        out = np.empty((*want.shape, *got[last].shape), np.uint8)
    for pos in np.ndindex(*want.shape):
        out[pos] = got[min(int(want[pos]), last)]
    return out


def _cpu_seconds_per_sequence(records: list[dict], cfg, count: int) -> float:
    """CPU seconds (all threads of this process) to load one train sequence on one core: the frame reader without
    decoder threads and torch on one thread, as in a loader worker, but into plain memory (a worker's batch is in
    shared memory, whose first-touch faults cost it more: docs/data.md); after one warm-up load."""
    ds = SequenceDataset(records, cfg, train=True, seed=0, decode_threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds.load(0, sample_rng(0, 0, 0))
        t0 = time.process_time()
        for k in range(count):
            ds.load(k % len(ds), sample_rng(0, 1, k))
        return (time.process_time() - t0) / count
    finally:
        torch.set_num_threads(threads)


def _batches(loader: CPULoader, count: int):
    """``count`` batches, epoch after epoch (the loader's epoch advances when one ends)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader.iterate():
            yield batch
            count -= 1
            if count == 0:
                return
        epoch += 1


def _data_wait_share(case: str, inputs: Inputs, tmp: Path, steps: int) -> float:
    """The ``small`` preset trained for ``steps`` steps on the case's files: the summary's data-wait share."""
    from avmt.train import train

    manifest = inputs.transcoded if case == "transcoded" else inputs.original
    batch = min(4, inputs.videos)
    overrides = [f"data.manifest={manifest}", f"train.run_dir={tmp / case}", f"train.batch_size={batch}", f"train.max_steps={steps}"]
    cfg = load_config("small", overrides=[*overrides, "data.sample_rate=44100", "train.warmup_steps=1", "train.save_every=1000000"])
    return train(cfg, resume=False, progress=False)["data_wait_share"]


@contextlib.contextmanager
def _reader_of(case: str):
    """The frame reader of ``case`` set on the dataset class for the block: a dataset made inside it keeps that reader,
    and so do its spawned workers, which receive the dataset pickled."""
    saved = SequenceDataset.__dict__["frame_reader"]
    if case == "decode_whole":  # the same pipeline with the whole-file frame reader
        SequenceDataset.frame_reader = staticmethod(_read_whole)
    try:
        yield
    finally:
        SequenceDataset.frame_reader = saved


def _records(case: str, inputs: Inputs) -> list[dict]:
    return load_manifest(inputs.transcoded if case == "transcoded" else inputs.original)


def _timed_round(case: str, inputs: Inputs, batch: int, batches: int) -> tuple[float, float]:
    """``(start-up, steady)``: the seconds from making a fresh loader to its first batch (its workers' start plus the
    first batch's decoding), and those that ``batches`` batches of ``case`` take after it; the loader's workers are
    ended before it returns, so no idle prefetching outlives it."""
    cfg = load_config("paper").data
    recs = _records(case, inputs)
    # The records repeated so that one epoch holds every timed batch: at an epoch's end the DataLoader drains its
    # workers, which a real dataset (thousands of batches per epoch) almost never does.
    repeated = recs * -(-(batches + 1) * batch // len(recs))
    with _reader_of(case):
        t_start = time.perf_counter()
        loader = CPULoader(repeated, cfg, batch, train=True, seed=0, num_workers=worker_count(-1), drop_last=True)
        stream = _batches(loader, batches + 1)
        first = next(stream)
        startup = time.perf_counter() - t_start
        assert first["video"].dtype == torch.uint8 and first["video"].shape[1:] == (15, 3, 32, 112, 112)
        t0 = time.perf_counter()
        assert sum(1 for _ in stream) == batches
        seconds = time.perf_counter() - t0
        stream.close()
        loader.close()
        gc.collect()
    return startup, seconds


def test_loader(benchmark, full, inputs, tmp_path, summary_line):
    """The three cases timed in alternating rounds (A B C, C B A, ...), so that the machine's drift over minutes falls
    on every case alike; the benchmark's time is the whole side-by-side run."""
    rounds, batch, batches, steps = (4, 2, 4, 8) if full else (1, 1, 2, 2)  # full: 32 timed sequences per case
    seconds: dict[str, list[float]] = {case: [] for case in CASES}
    first: dict[str, list[float]] = {case: [] for case in CASES}

    def side_by_side() -> None:
        for r in range(rounds):
            for case in CASES if r % 2 == 0 else CASES[::-1]:
                startup, steady = _timed_round(case, inputs, batch, batches)
                first[case].append(startup)
                seconds[case].append(steady)

    benchmark.pedantic(side_by_side, rounds=1, iterations=1)
    per_round = batch * batches
    rate = {case: rounds * per_round / sum(seconds[case]) for case in CASES}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cfg = load_config("paper").data
    cases = []
    for case in CASES:
        recs = _records(case, inputs)
        with _reader_of(case):
            cpu_s = _cpu_seconds_per_sequence(recs, cfg, 16 if full else 2)  # alone on the machine
            wait = _data_wait_share(case, inputs, tmp_path, steps)
        ratios = [seconds["original"][r] / seconds[case][r] for r in range(rounds)]  # equal sequences per round
        cases.append(
            {
                "case": case,
                "sequences_per_s": rate[case],
                "sequences": rounds * per_round,
                "round_seconds": seconds[case],
                # a fresh loader's first batch: worker start-up + one batch's decoding (timed apart from the steady rate)
                "first_batch_seconds": first[case],
                "batch_seconds": sum(seconds[case]) / (rounds * batches),
                "vs_original_by_round": ratios,
                "sequences_per_s_per_core": rate[case] / max(1, worker_count(-1)),
                "cpu_s_per_sequence": cpu_s,  # one core, in-process (decode, rescale, crop, log-mel)
                "sequences_per_cpu_s": 1.0 / cpu_s,
                "data_wait_share_small": wait,
                "video": f"{recs[0]['width']}x{recs[0]['height']} {recs[0]['video_codec']} {recs[0]['fps']:g} fps",
                "keyframe_seconds": 1.0 if case == "transcoded" else inputs.keyframe_seconds,
                **({"transcode_wall_s": inputs.transcode_wall_s} if case == "transcoded" else {}),
            }
        )
        summary_line(
            f"loader {case:13s} {rate[case]:6.2f} sequences/s ({worker_count(-1)} workers; "
            f"{rate[case] / rate['original']:4.1f}x the originals, {min(ratios):.1f}-{max(ratios):.1f}x by round), "
            f"{1 / cpu_s:5.2f} per CPU-second on one core, small-run data wait {wait:.0%}, "
            f"first batch of a fresh loader {sum(first[case]) / rounds:.2f} s"
        )
    benchmark.extra_info.update(
        kind="loader_side_by_side",
        cases=cases,
        rounds=rounds,
        batch=batch,
        batches_per_round=batches,
        workers=worker_count(-1),
        start_method=START_METHOD,  # how the loader starts its workers: it sets the start-up cost
        cores=cores,
        host_bytes_per_sequence=15 * 32 * 3 * 112 * 112 + 15 * 80 * 128 * 4,  # uint8 video + float32 log-mel
        videos=inputs.videos,
        seconds_per_video=inputs.seconds,
        torch=torch.__version__,
    )
