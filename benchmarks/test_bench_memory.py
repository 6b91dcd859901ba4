"""Memory of one training step per parameter-sharing scheme: weights, gradients, AdamW+AMSGrad state
and activations, for the Transformer part alone and for the whole model with its CNNs (avmt.bench.memory).

Quick mode (CI, ~20 s): the paper preset's Transformer part under FakeTensorMode (no memory, no compute) for the
four schemes, the lowrank/none ratio of weights+gradients+optimizer (target: >= 30x), and a real pretraining
step of the `tiny` preset per scheme. Every case checks what it measured: weight bytes = 4 x parameters, gradient
bytes = weight bytes, optimizer bytes = 3 x 4 x parameters after the step, activations > 0.

Full mode (`--full`): the sweep D in {384, 768, 1024}, L in {2, 6, 12}, T in {10, 15, 30, 60} around the paper
preset (one axis at a time; heads = D/64, FFN = 4D, O = 128), batch 4 (the paper's per-GPU batch: 256 over 64
GPUs), for the Transformer part and for the whole model (FakeTensorMode), fp32 and bf16 autocast at the paper
preset; real CPU runs that check the fake numbers (paper Transformer part at batch 4; paper model with CNNs at
batch 1 x 2 clips); real pretraining steps of the `tiny` and `small` presets. GPU (marked): the allocator's peak
of a real pretraining step at the paper preset per scheme.
"""

from __future__ import annotations

import functools

import pytest
import torch

from avmt.bench.memory import StepMemory, measure_step
from avmt.config import SHARING_SCHEMES, load_config
from avmt.models import AVBert

BATCH = 4  # the paper's batch per GPU: 256 sequences over 64 V100s
FULL_VARIANTS = {  # name: overrides of the paper preset, one axis at a time
    "paper": (),
    "D384": ("model.dim=384", "model.heads=6", "model.ffn_dim=1536"),
    "D1024": ("model.dim=1024", "model.heads=16", "model.ffn_dim=4096"),
    "L2": ("model.layers=2",),
    "L12": ("model.layers=12",),
    "T10": ("data.num_clips=10", "data.window_seconds=20.0"),
    "T30": ("data.num_clips=30", "data.window_seconds=60.0"),
    "T60": ("data.num_clips=60", "data.window_seconds=120.0"),
}
MiB = 2**20


@functools.cache
def _cfg(preset: str, variant: str, scheme: str):
    overrides = FULL_VARIANTS[variant] if preset == "paper" else ()
    return load_config(preset, overrides=[*overrides, f"model.sharing={scheme}", "model.kernel=reference"])


_CACHE: dict[tuple, StepMemory] = {}


def _measure(preset: str, variant: str, scheme: str, **kw) -> StepMemory:
    key = (preset, variant, scheme, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = measure_step(_cfg(preset, variant, scheme), **kw)
    return _CACHE[key]


def check_and_record(benchmark, r: StepMemory, preset: str, variant: str) -> None:
    """The invariants every measured step must satisfy, then the numbers into the benchmark JSON."""
    for part, n in r.params.items():
        assert r.weights[part] == 4 * n, f"{part}: {r.weights[part]} weight bytes for {n} fp32 parameters"
        assert r.grads[part] == r.weights[part], f"{part}: every trained parameter has an fp32 gradient"
        assert r.optimizer[part] == r.optimizer_buffers * r.weights[part], f"{part}: AdamW state != {r.optimizer_buffers} x weights"
    assert r.optimizer_buffers == 3, "AdamW with amsgrad=True keeps exp_avg, exp_avg_sq and max_exp_avg_sq"
    assert r.activation_bytes > 0 and all(v > 0 for v in r.activations.values())
    if r.precision == "fp32":
        assert r.weight_copies == 0, "fp32: autograd saves the parameters themselves, no copies"
    benchmark.extra_info.update(kind="memory", preset=preset, variant=variant, **r.to_dict())


def _run_memory(benchmark, preset: str, variant: str, scheme: str, **kw) -> StepMemory:
    key = (preset, variant, scheme, tuple(sorted(kw.items())))
    _CACHE.pop(key, None)
    r = benchmark.pedantic(lambda: _measure(preset, variant, scheme, **kw), rounds=1, iterations=1)  # time = the measurement
    check_and_record(benchmark, r, preset, variant)
    return r


# -- quick + full ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_memory_transformer_paper(benchmark, scheme):
    """Paper preset, Transformer part (model.encode), batch 4, FakeTensorMode."""
    r = _run_memory(benchmark, "paper", "paper", scheme, scope="transformer", mode="fake", batch=BATCH)
    assert r.params["transformer"] == {"none": 127_581_696, "layers": 21_263_616, "all": 7_087_872, "lowrank": 3_843_840}[scheme]


def test_transformer_state_ratio(summary_line):
    """weights + gradients + AdamW state of the Transformer part: lowrank >= 30x smaller than none (params: 33.2x);
    activations: identical for none/layers/all (same computation), lowrank within 2x of them."""
    rs = {s: _measure("paper", "paper", s, scope="transformer", mode="fake", batch=BATCH) for s in SHARING_SCHEMES}
    ratio = rs["none"].train_state("transformer") / rs["lowrank"].train_state("transformer")
    param_ratio = rs["none"].params["transformer"] / rs["lowrank"].params["transformer"]
    summary_line(
        f"paper preset, Transformer part: weights+grads+AdamW(amsgrad) state none {rs['none'].train_state('transformer') / MiB:,.1f} MiB, "
        f"lowrank {rs['lowrank'].train_state('transformer') / MiB:,.1f} MiB: {ratio:.2f}x smaller (parameter ratio {param_ratio:.2f}x); "
        f"activations (batch {BATCH}, T=15) none {rs['none'].activation_bytes / MiB:,.1f} MiB, "
        f"lowrank {rs['lowrank'].activation_bytes / MiB:,.1f} MiB"
    )
    assert ratio >= 30
    assert ratio == pytest.approx(param_ratio, rel=1e-12)  # every byte of the state is per-parameter fp32
    assert rs["none"].activations == rs["layers"].activations == rs["all"].activations
    assert 0.5 <= rs["lowrank"].activation_bytes / rs["none"].activation_bytes <= 2


@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_memory_pretraining_real(benchmark, full, scheme):
    """A real pretraining step (MEP + CPP, AdamW step) of the `tiny` preset on CPU (batch 4 quick, 8 full)."""
    r = _run_memory(benchmark, "tiny", "tiny", scheme, scope="pretraining", mode="real", batch=8 if full else 4)
    assert set(r.activations) == {"cnn", "transformer", "heads"}


# -- full only ---------------------------------------------------------------------------------------------------------
def _full_only(full: bool) -> None:
    if not full:
        pytest.skip("full mode only (--full)")


@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_memory_pretraining_real_small(benchmark, full, scheme):
    _full_only(full)
    r = _run_memory(benchmark, "small", "small", scheme, scope="pretraining", mode="real", batch=4)
    assert set(r.activations) == {"cnn", "transformer", "heads"}


@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
@pytest.mark.parametrize("variant", [v for v in FULL_VARIANTS if v != "paper"])
def test_memory_transformer_sweep(benchmark, full, variant, scheme):
    _full_only(full)
    _run_memory(benchmark, "paper", variant, scheme, scope="transformer", mode="fake", batch=BATCH)


@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
@pytest.mark.parametrize("variant", list(FULL_VARIANTS))
def test_memory_model_sweep(benchmark, full, variant, scheme):
    """The whole model with its CNNs (3D ResNet-50 + 2D ResNet-50 at paper size), FakeTensorMode."""
    _full_only(full)
    r = _run_memory(benchmark, "paper", variant, scheme, scope="model", mode="fake", batch=BATCH)
    assert set(r.activations) == {"cnn", "transformer"}


@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
@pytest.mark.parametrize("scope", ["transformer", "model"])
def test_memory_paper_bf16(benchmark, full, scope, scheme):
    """bf16 autocast with fp32 weights (how avmt.train runs on a GPU), CPU autocast rules, FakeTensorMode.

    Activations shrink, but autocast keeps a bf16 copy of every weight a matmul saves for backward: 2 bytes per
    dense weight of every unique layer (autocast caches one cast per parameter), more for `lowrank`, whose
    ``V[group]`` slices are cast again at each of the 18 applications."""
    _full_only(full)
    r = _run_memory(benchmark, "paper", "paper", scheme, scope=scope, mode="fake", batch=BATCH, precision="bf16")
    fp32 = _measure("paper", "paper", scheme, scope=scope, mode="fake", batch=BATCH)
    assert r.activation_bytes < fp32.activation_bytes
    with torch.device("meta"):
        dense = sum(p.numel() for p in AVBert(_cfg("paper", "paper", scheme).model).layers.parameters() if p.dim() >= 2)
    if scope == "transformer" and scheme != "lowrank":
        assert r.weight_copies == 2 * dense
    else:
        assert r.weight_copies > 2 * dense


@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_memory_transformer_paper_real(benchmark, full, scheme):
    """Real tensors on this CPU at the paper preset (Transformer part, batch 4): must equal the FakeTensor numbers."""
    _full_only(full)
    r = _run_memory(benchmark, "paper", "paper", scheme, scope="transformer", mode="real", batch=BATCH)
    fake = _measure("paper", "paper", scheme, scope="transformer", mode="fake", batch=BATCH)
    assert (r.weights, r.grads, r.optimizer, r.activations, r.inputs) == (
        fake.weights,
        fake.grads,
        fake.optimizer,
        fake.activations,
        fake.inputs,
    )


@pytest.mark.parametrize("scheme", ["none", "lowrank"])
def test_memory_model_paper_real_small_batch(benchmark, full, scheme):
    """Real tensors at the paper preset with the CNNs: what a CPU can run, batch 1 x 2 clips; equals FakeTensor."""
    _full_only(full)
    r = _run_memory(benchmark, "paper", "paper", scheme, scope="model", mode="real", batch=1, clips=2)
    fake = _measure("paper", "paper", scheme, scope="model", mode="fake", batch=1, clips=2)
    assert (r.weights, r.grads, r.optimizer, r.activations, r.inputs) == (
        fake.weights,
        fake.grads,
        fake.optimizer,
        fake.activations,
        fake.inputs,
    )


# -- GPU ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_memory_pretraining_cuda_peak(benchmark, scheme, precision):
    """The allocator's peak of a real pretraining step at the paper preset (batch 4, T=15) on the GPU."""
    r = _run_memory(benchmark, "paper", "paper", scheme, scope="pretraining", mode="real", batch=BATCH, device="cuda", precision=precision)
    # weights, optimizer state and the activations are all alive at the end of the forward
    assert r.peak_allocated is not None and r.peak_allocated >= sum(r.weights.values()) + sum(r.optimizer.values()) + r.activation_bytes
