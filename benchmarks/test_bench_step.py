"""Training-step time per parameter-sharing scheme, and the largest batch that fits on a GPU.

A step is what ``avmt.train`` runs per batch: ``Pretraining`` forward (MEP + CPP, content-aware negatives),
backward, ``AdamW(amsgrad=True).step()``, ``zero_grad``; random clips of the preset's shape (no data loading).
Quick mode: `tiny`, batch 2, one round. Full mode: `tiny` batch 8 (5 rounds) and `small` batch 4 (3 rounds) on the
CPU; the `paper` preset (batch 4, T=15, bf16 autocast) only on a GPU. GPU only: the largest batch of the paper
preset with 30 s sequences (T=15) whose training step fits, per scheme (binary search, OOM caught).
"""

from __future__ import annotations

import os

import pytest
import torch

from avmt.bench import training_step
from avmt.bench.search import largest_fitting_batch, training_step_fits
from avmt.config import SHARING_SCHEMES, load_config
from avmt.optim import use_bf16
from avmt.params import count_parts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {  # preset: (batch, rounds) in full mode
    "tiny": (8, 5),
    "small": (4, 3),
    "paper": (4, 10),
}


# the CNN memory options (avmt.models.avbert.CNNRunner), timed side by side with the plain step
VARIANTS = {
    "plain": [],
    "cnn_checkpoint": ["train.cnn_checkpoint=true"],
    "cnn_checkpoint_chunk4": ["train.cnn_checkpoint=true", "train.cnn_chunk=4"],
    "clips_with_grad2": ["train.clips_with_grad=2"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
@pytest.mark.parametrize("preset", list(CASES))
def test_train_step(benchmark, full, preset, scheme, variant):
    if not full and preset != "tiny":
        pytest.skip("full mode only (--full)")
    if preset == "paper" and DEVICE != "cuda":
        pytest.skip("the paper preset's step is timed on a GPU only (a CPU step would take minutes)")
    if variant != "plain" and scheme != "lowrank":
        pytest.skip("the memory options are timed for lowrank only")
    batch, rounds = CASES[preset] if full else (2, 1)
    cfg = load_config(preset, overrides=[f"model.sharing={scheme}", *VARIANTS[variant]])
    d = cfg.data
    ts = training_step(cfg, batch, DEVICE)
    model = ts.model
    bf16 = use_bf16(cfg.train, torch.device(DEVICE))
    losses: list[float] = []

    def step() -> None:
        losses.append(float(ts.step()))

    before = [p.detach().clone() for p in model.layers.parameters()]
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1 if full else 0)
    # the timed function trained: finite losses and every Transformer parameter moved
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, model.layers.parameters()))
    mean = benchmark.stats.stats.mean if benchmark.stats is not None else float("nan")
    benchmark.extra_info.update(
        kind="step",
        variant=variant,
        preset=preset,
        sharing=scheme,
        batch=batch,
        clips=d.num_clips,
        device=DEVICE,
        precision="bf16" if bf16 else "fp32",
        threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
        loadavg=os.getloadavg()[0],
        transformer_params=count_parts(model)["transformer"],
        sequences_per_s=batch / mean if mean == mean and mean > 0 else None,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_largest_batch(benchmark, scheme, summary_line):
    """Paper preset, 30 s sequences (T=15), bf16 autocast: the largest batch whose training step fits the GPU."""
    cfg = load_config("paper", overrides=[f"model.sharing={scheme}"])
    assert cfg.data.num_clips == 15
    best, trials = benchmark.pedantic(
        lambda: largest_fitting_batch(lambda b: training_step_fits(cfg, b), start=4, limit=4096), rounds=1, iterations=1
    )
    assert best >= 1, f"not even batch 1 fits: {trials}"
    assert training_step_fits(cfg, best), f"batch {best} fitted during the search but not when run again: {trials}"
    summary_line(f"largest batch, paper preset, T=15, sharing={scheme}: {best} ({torch.cuda.get_device_name()}; tries {trials})")
    benchmark.extra_info.update(
        kind="largest_batch",
        preset="paper",
        sharing=scheme,
        clips=15,
        largest_batch=best,
        trials=trials,
        device=torch.cuda.get_device_name(),
        memory_bytes=torch.cuda.get_device_properties(0).total_memory,
    )
