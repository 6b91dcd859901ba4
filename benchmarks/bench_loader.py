"""Throughput of the CPU (PyAV) loader at the paper preset's shapes.

``python benchmarks/bench_loader.py [--quick] [--workers 2] [--batch-size 2] [--batches 8] [--work DIR] [--json FILE]``

Sequences of T=15 clips x 32 frames (16 fps) at 112^2 from a 30 s window, audio 44.1 kHz -> 80 x 128
log-mel per clip, train mode (random window, scale in [128, 160], crop, flip, SpecAugment). The inputs
are synthetic H.264/AAC videos (``avmt.data.synth``: 256^2 at 25 fps, 40 s, so frames are resampled
from 25 to 16 fps) written once into ``--work`` and prepared with ``avmt.data.prepare``. Reports
sequences/s after one warm-up batch. ``--quick`` uses 2 videos and 3 timed batches (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from avmt.config import PRESETS
from avmt.data.loader_cpu import CPULoader
from avmt.data.prepare import prepare, scan_root
from avmt.data.synth import SynthSpec, generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--videos", type=int, default=6)
    p.add_argument("--work", type=Path, default=Path("/tmp/avmt_bench_loader"))
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args()
    if a.quick:
        a.videos, a.batches = 2, 3
    cfg = PRESETS["paper"].data
    spec = SynthSpec(seconds=40.0, size=256, fps=25, sample_rate=cfg.sample_rate, num_classes=3, format="mp4", seed=0)
    t0 = time.perf_counter()
    generate(a.work / "videos", a.videos, spec, workers=2, progress=False)
    (a.work / "videos" / "labels.csv").unlink()
    (a.work / "videos" / "synth.json").unlink()
    s = prepare(scan_root(a.work / "videos"), a.work / "prepared", cfg.sample_rate, 2.0, workers=2, progress=False)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s ({s.kept} videos, {s.processed} prepared now)")

    loader = CPULoader(a.work / "prepared", cfg, a.batch_size, train=True, num_workers=a.workers, drop_last=True)
    it, epoch, n_seq, timed = iter(loader), 0, 0, 0
    t_start = None
    while timed < a.batches + 1:
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            loader.set_epoch(epoch)
            it = iter(loader)
            continue
        if t_start is None:  # first batch = warm-up (worker start, first decode)
            assert batch["video"].shape[1:] == (15, 3, 32, 112, 112) and batch["audio"].shape[1:] == (15, 1, 80, 128)
            t_start = time.perf_counter()
        else:
            n_seq += batch["video"].shape[0]
        timed += 1
    dt = time.perf_counter() - t_start
    result = {
        "bench": "cpu_loader",
        "sequences_per_s": round(n_seq / dt, 3),
        "seconds_per_sequence": round(dt / n_seq, 3),
        "sequences": n_seq,
        "batch_size": a.batch_size,
        "workers": a.workers,
        "shape_video": [15, 3, 32, 112, 112],
        "shape_audio": [15, 1, 80, 128],
        "source": "synthetic H.264/AAC 256x256 25 fps 44.1 kHz",
        "quick": a.quick,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(result))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
