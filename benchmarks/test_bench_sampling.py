"""Negative sampling (docs/method.md §4): the compiled op vs the PyTorch reference, time and peak extra memory.

Sweep (full): Np in {1K, 4K, 16K, 64K}, D = 768, k = 32, Na = 15% of Np, mode `similar`. On CPU the reference
is skipped above 16K: its [Na, Np] float64 intermediates alone would need > 20 GB at 64K.
"""

from __future__ import annotations

import pytest
import torch

from avmt.backends import select_sampling
from avmt.sampling import sample_negatives
from benchmarks.memory import peak_extra_memory

FULL_POOLS = [1024, 4096, 16384, 65536]
QUICK_POOLS = [1024]


def _device_and_backends() -> list[tuple[str, str]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [(device, "reference"), (device, select_sampling(device))]


@pytest.mark.parametrize("np_", FULL_POOLS)
@pytest.mark.parametrize("device, backend", _device_and_backends())
def test_sample_negatives(benchmark, full, np_, device, backend):
    if not full and np_ not in QUICK_POOLS:
        pytest.skip("full mode only (--full)")
    if backend == "reference" and device == "cpu" and np_ > 16384:
        pytest.skip("the CPU reference's [Na, Np] float64 intermediates do not fit this machine at this size")
    g = torch.Generator().manual_seed(0)
    d, k, na = 768, 32, int(0.15 * np_)
    pool = torch.randn(np_, d, generator=g).to(device)
    anchor_index = torch.randperm(np_, generator=g)[:na].to(device)
    anchors = pool[anchor_index]

    def run() -> torch.Tensor:
        out = sample_negatives(anchors, pool, k, anchor_index=anchor_index, generator=torch.Generator().manual_seed(1), backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = run()  # warm-up (and the correctness guard below)
    assert out.shape == (na, k) and (out >= 0).all() and not (out == anchor_index[:, None]).any()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        backend=backend,
        np=np_,
        na=na,
        d=d,
        k=k,
        peak_extra_bytes=peak_extra_memory(run, torch.device(device)),
        torch=torch.__version__,
    )
    benchmark.pedantic(run, rounds=5 if full else 1, iterations=1, warmup_rounds=0)
