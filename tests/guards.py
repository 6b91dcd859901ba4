"""Reference loss trajectories: what the first steps of the ``tiny`` preset compute, per sharing scheme, kept in
``tests/fixtures/loss-tiny-<scheme>.json`` and checked bit for bit by tests/test_guards.py.

A run is ``python -m avmt.train``'s own loop (:func:`avmt.train.train`) for :data:`STEPS` steps: fp32 on the CPU,
seed 0, batch 4, loading in the main process, on a small synthetic dataset written here with one encoder thread (so
that its bytes, and so the decoded frames, are the same on every machine). Everything the loop logs per step is
kept: the loss, every MEP and CPP accuracy and loss, the gradient norm and the learning rate.

Each file holds a trajectory at 1 and at 2 torch threads. A run is bit-for-bit repeatable at a given thread count, but
not across thread counts: the CNNs' convolution backward sums the weight gradient over the batch in an order that
depends on the threads (the forward is equal), so the two differ from the first step's gradient norm on, in the last
bits; at this learning rate and batch the gap grows to 18-44% of the loss by step 30 (docs/training.md,
"Determinism"), so no tolerance across thread counts would be meaningful.

After a deliberate change of what training computes, regenerate the files in the same commit and say why there:

    python tests/guards.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from avmt.config import load_config
from avmt.data.prepare import prepare, scan_csv
from avmt.data.synth import SynthSpec, generate

FIXTURES = Path(__file__).parent / "fixtures"
SCHEMES = ("none", "layers", "all", "lowrank")
THREADS = (1, 2)
STEPS = 30
# what a step's record holds besides these is bookkeeping (epoch, replaced samples), not numerics
SKIP = ("epoch", "data_failures", "nonfinite_skipped")


def fixture_path(scheme: str) -> Path:
    return FIXTURES / f"loss-tiny-{scheme}.json"


def guard_manifest(root: Path) -> Path:
    """The guard's dataset: 12 videos of 12 s in the tiny preset's geometry (64 px, 8 fps, 16 kHz), written with one
    encoder thread, prepared in this process."""
    data = load_config("tiny").data
    spec = SynthSpec(seconds=data.window_seconds + 4, size=64, fps=8, sample_rate=data.sample_rate, num_classes=8, encoder_threads=1)
    generate(root / "videos", 12, spec, workers=1, progress=False)
    prepare(scan_csv(root / "videos" / "labels.csv"), root / "prepared", data.sample_rate, data.clip_seconds, workers=0, progress=False)
    return root / "prepared" / "manifest.jsonl"


def trajectory(manifest: Path, run_dir: Path, scheme: str, threads: int) -> list[dict]:
    """The per-step records of a :data:`STEPS`-step run of ``scheme`` at ``threads`` torch threads."""
    from avmt.train import train

    overrides = [f"data.manifest={manifest}", "data.num_workers=0", f"train.run_dir={run_dir}", f"model.sharing={scheme}"]
    overrides += ["train.batch_size=4", "train.warmup_steps=5", f"train.max_steps={STEPS}", "train.log_every=1", "train.save_every=1000"]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train(load_config("tiny", overrides=overrides), resume=False, progress=False)
    finally:
        torch.set_num_threads(previous)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in SKIP} for r in records]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AVMT_CACHE"] = tmp
        manifest = guard_manifest(Path(tmp))
        for scheme in SCHEMES:
            runs = {str(n): trajectory(manifest, Path(tmp) / f"{scheme}-{n}", scheme, n) for n in THREADS}
            again = trajectory(manifest, Path(tmp) / f"{scheme}-again", scheme, THREADS[0])
            if again != runs[str(THREADS[0])]:
                print(f"{scheme}: two runs at {THREADS[0]} thread(s) differ; not written (the run is not repeatable)", file=sys.stderr)
                return 1
            doc = {"preset": "tiny", "scheme": scheme, "steps": STEPS, "torch": torch.__version__, "threads": runs}
            fixture_path(scheme).write_text(json.dumps(doc, indent=1) + "\n")
            one = runs[str(THREADS[0])]
            print(f"wrote {fixture_path(scheme)}: loss {one[0]['loss']:.4f} -> {one[-1]['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
