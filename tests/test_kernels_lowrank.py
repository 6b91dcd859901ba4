"""The fused Triton low-rank map (avmt.kernels.lowrank_linear) against the plain PyTorch LowRankLinear.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported); the bf16/fp16 and paper-shape cases are GPU-marked. Accuracy rule (docs ENGINEERING.md): the fused
error against a float64 evaluation is at most 2x the fp32 (or same-dtype) reference's error, for the output
and every gradient, plus a small absolute floor.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from avmt import kernels
from avmt.config import ConfigError, load_config
from avmt.models import AVBert, LowRankLinear

triton_ok = kernels.backend_status("cuda" if torch.cuda.is_available() else "cpu")["triton"][0]
pytestmark = pytest.mark.skipif(not triton_ok, reason="Triton cannot run here (no CUDA and no TRITON_INTERPRET=1)")

if triton_ok:
    from avmt.kernels.lowrank_linear import lowrank_linear, lowrank_linear_multi, lowrank_qkv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PARAMS = ("U", "bias", "V", "A")


def make_map(n: int, m: int, o: int, g: int, seed: int, dtype=torch.float32) -> LowRankLinear:
    torch.manual_seed(seed)
    lin = LowRankLinear(n, m, o, g, init_std=0.02, eps=1e-6)
    with torch.no_grad():  # far-from-identity rotations and a non-zero bias, not the init values
        lin.A.normal_(std=0.3)
        lin.bias.normal_()
    return lin.to(DEV, dtype)


def reference(lin: LowRankLinear, x: torch.Tensor, segments: list[tuple[int, int]], gelu: bool) -> torch.Tensor:
    """The plain PyTorch map applied segment by segment over the flattened tokens."""
    x2 = x.reshape(-1, x.shape[-1])
    outs, start = [], 0
    for length, g in segments:
        outs.append(lin(x2[start:start + length], g, gelu=gelu))
        start += length
    return torch.cat(outs).view(*x.shape[:-1], -1)


def fused(lin: LowRankLinear, x: torch.Tensor, segments: list[tuple[int, int]], gelu: bool) -> torch.Tensor:
    return lowrank_linear(x, lin.V, lin.rotations(), lin.U, lin.bias, segments=segments, gelu=gelu, eps=lin.eps)


def outputs_and_grads(fn, lin: LowRankLinear, x: torch.Tensor, dy_seed: int) -> list[torch.Tensor]:
    lin.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(lin, x)
    gen = torch.Generator(device="cpu").manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    y.backward(dy)
    return [y.detach(), x.grad, *(getattr(lin, p).grad for p in PARAMS)]


def assert_within_2x(got: list[torch.Tensor], ref: list[torch.Tensor], truth: list[torch.Tensor], names, floor: float = 1e-6):
    for name, g, r, t in zip(names, got, ref, truth):
        t = t.double()
        scale = t.abs().max().item()
        err_fused = (g.double() - t).abs().max().item()
        err_ref = (r.double() - t).abs().max().item()
        assert err_fused <= 2 * err_ref + floor * (1 + scale), f"{name}: fused error {err_fused:.3g} > 2 x reference {err_ref:.3g}"


def check_against_reference(n, m, o, g, shape, segments, gelu, seed, zero_rows=0):
    lin = make_map(n, m, o, g, seed)
    torch.manual_seed(seed + 1)
    x = torch.randn(*shape, n, device=DEV)
    if zero_rows:  # rows whose V^T x norm is below eps: the clamped branch of normalize
        x.view(-1, n)[:zero_rows] = 0
    lin64 = copy.deepcopy(lin).double()
    truth = outputs_and_grads(lambda mod, xx: reference(mod, xx, segments, gelu), lin64, x.double(), seed)
    ref = outputs_and_grads(lambda mod, xx: reference(mod, xx, segments, gelu), lin, x, seed)
    got = outputs_and_grads(lambda mod, xx: fused(mod, xx, segments, gelu), lin, x, seed)
    assert got[0].shape == (*shape, m) and got[0].dtype == x.dtype
    assert_within_2x(got, ref, truth, ("y", "dx", "dU", "db", "dV", "dA"))


@pytest.mark.parametrize(
    "n, m, o, g, shape, segments, gelu",
    [
        (37, 53, 16, 1, (1,), [(1, 0)], False),  # one token
        (45, 70, 16, 2, (7,), [(7, 1)], True),  # 7 tokens, group 1, GELU
        (33, 65, 20, 3, (3, 43), [(50, 2), (0, 0), (79, 1)], False),  # 129 tokens, O=20 padded to 32, empty segment
        (70, 37, 16, 3, (129,), [(1, 0), (64, 1), (64, 2)], True),  # three groups in one launch, GELU
    ],
)
def test_forward_and_gradients_match_reference(n, m, o, g, shape, segments, gelu):
    check_against_reference(n, m, o, g, shape, segments, gelu, seed=n + m)


def test_clamped_norm_rows():
    check_against_reference(29, 31, 16, 2, (9,), [(4, 0), (5, 1)], False, seed=3, zero_rows=3)


def test_fused_qkv_matches_three_maps():
    n, o, g, heads, b, s = 48, 16, 3, 4, 2, 5
    maps = [make_map(n, n, o, g, seed) for seed in (10, 11, 12)]
    maps64 = [copy.deepcopy(mp).double() for mp in maps]
    torch.manual_seed(0)
    x = torch.randn(b, s, n, device=DEV)
    dys = [torch.randn(b, heads, s, n // heads, device=DEV) for _ in range(3)]

    def run(mods, xx, use_fused):
        for mp in mods:
            mp.zero_grad(set_to_none=True)
        xx = xx.detach().clone().requires_grad_(True)
        if use_fused:
            outs = lowrank_qkv(xx, [mp.V for mp in mods], [mp.rotations() for mp in mods], [mp.U for mp in mods],
                               [mp.bias for mp in mods], heads, group=2, eps=mods[0].eps)
        else:
            outs = [mp(xx, 2).view(b, s, heads, n // heads).transpose(1, 2) for mp in mods]
        sum((o_ * d.to(o_.dtype)).sum() for o_, d in zip(outs, dys)).backward()
        return [*(o_.detach() for o_ in outs), xx.grad, *(getattr(mp, p).grad for mp in mods for p in PARAMS)]

    truth, ref, got = run(maps64, x.double(), False), run(maps, x, False), run(maps, x, True)
    assert got[0].shape == (b, heads, s, n // heads)
    names = ["q", "k", "v", "dx", *(f"{p}[{i}]" for i in range(3) for p in PARAMS)]
    assert_within_2x(got, ref, truth, names)


def test_multi_map_segments_in_one_launch():
    # two maps x three segments: each output must equal the map's own segment-wise reference
    maps = [make_map(40, 24, 16, 3, seed) for seed in (20, 21)]
    torch.manual_seed(1)
    x = torch.randn(30, 40, device=DEV)
    segments = [(10, 2), (13, 0), (7, 1)]
    outs = lowrank_linear_multi(x, [mp.V for mp in maps], [mp.rotations() for mp in maps], [mp.U for mp in maps],
                                [mp.bias for mp in maps], segments=segments, gelu=True)
    with torch.no_grad():
        for mp, y in zip(maps, outs):
            want = reference(mp, x, segments, True)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    lin = make_map(16, 24, 16, 2, 0)
    x = torch.randn(5, 16, device=DEV)
    r = lin.rotations()
    with pytest.raises(ValueError, match="V must be"):
        lowrank_linear(torch.randn(5, 17, device=DEV), lin.V, r, lin.U, lin.bias)
    with pytest.raises(ValueError, match="R must be"):
        lowrank_linear(x, lin.V, r[:1], lin.U, lin.bias)
    with pytest.raises(TypeError, match="must have x's dtype"):
        lowrank_linear(x.double().float().half(), lin.V, r, lin.U, lin.bias)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        lowrank_linear(x.long(), lin.V, r, lin.U, lin.bias)
    with pytest.raises(ValueError, match="sum to the 5 tokens"):
        lowrank_linear(x, lin.V, r, lin.U, lin.bias, segments=[(2, 0), (2, 1)])
    with pytest.raises(IndexError, match="out of range"):
        lowrank_linear(x, lin.V, r, lin.U, lin.bias, group=2)
    with pytest.raises(ValueError, match="same device|must share one device"):
        lowrank_linear(x, lin.V, r, lin.U.to("meta"), lin.bias)


def test_backend_selection(monkeypatch):
    assert kernels.select_backend("cpu", "reference") == "reference"
    assert kernels.select_backend("cpu", "auto") == "reference"  # the interpreter is for tests, never automatic
    with pytest.raises(ValueError, match="expected one of"):
        kernels.select_backend("cpu", "cuda")
    with pytest.raises(RuntimeError, match="got torch.float64"):
        kernels.select_backend("cpu", "triton", torch.float64)
    assert kernels.select_backend("cuda", "auto", torch.float64) == "reference"  # auto falls back for float64
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton needs CUDA tensors"):
        kernels.select_backend("cpu", "triton")
    with pytest.raises(ConfigError):
        load_config("tiny", overrides=["model.kernel=cuda"])


@pytest.mark.skipif(DEV != "cpu", reason="CPU interpreter variant; the GPU runs test_model_gpu")
def test_model_triton_matches_reference_tiny(monkeypatch):
    """One forward+backward of the tiny lowrank AVBert: kernel=triton vs reference, checked against float64."""
    import avmt.kernels.lowrank_linear as kl

    launches = []
    real = kl.lowrank_linear_multi
    monkeypatch.setattr(kl, "lowrank_linear_multi", lambda *a, **k: launches.append(len(a[1])) or real(*a, **k))
    losses, grads = {}, {}
    for kernel in ("reference", "triton"):
        cfg = load_config("tiny", overrides=["model.sharing=lowrank", f"model.kernel={kernel}"])
        torch.manual_seed(0)
        models = {kernel: AVBert(cfg.model).eval()}  # eval: no dropout, so both runs see the same function
        if kernel == "reference":
            models["float64"] = copy.deepcopy(models[kernel]).double()
        g = torch.Generator().manual_seed(0)
        d = cfg.data
        video = torch.randn(2, d.num_clips, 3, d.frames, d.crop_size, d.crop_size, generator=g)
        audio = torch.randn(2, d.num_clips, 1, d.n_mels, d.mel_frames, generator=g)
        for name, model in models.items():
            dt = torch.float64 if name == "float64" else torch.float32
            out = model(video.to(dt), audio.to(dt))
            w = torch.Generator().manual_seed(1)
            loss = sum((y * torch.randn(y.shape, generator=w, dtype=dt)).sum() for y in (out.visual, out.audio, out.multimodal))
            loss.backward()
            losses[name] = loss.detach().double()
            grads[name] = {k: p.grad.double() for k, p in model.named_parameters() if "layers" in k}
    # mid fusion, 2 layers, 3 Transformers: per layer application one QKV launch (3 maps) and 3 single-map launches
    assert launches == [3, 1, 1, 1] * (3 * cfg.model.layers)
    assert len(grads["triton"]) == 28  # U, bias, V, A of the 6 maps + 2 LayerNorms of the one shared layer
    names = ["loss", *grads["float64"]]
    assert_within_2x([losses["triton"], *grads["triton"].values()], [losses["reference"], *grads["reference"].values()],
                     [losses["float64"], *grads["float64"].values()], names, floor=1e-5)


# ---- GPU: bf16/fp16, paper shapes, torch.compile --------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, m, gelu", [(768, 768, False), (768, 3072, True), (3072, 768, False)])
def test_gpu_paper_shapes(dtype, n, m, gelu):
    """bf16/fp16 as the model runs them: fp32 parameters under autocast (the reference's matmuls and the fused
    kernels both compute in the autocast dtype), fp32 without autocast."""
    import contextlib

    lin = make_map(n, m, 128, 3, 0)
    torch.manual_seed(1)
    tokens = 4099
    x = torch.randn(tokens, n, device=DEV)
    segments = [(1000, 0), (1000, 1), (2099, 2)]
    truth = outputs_and_grads(lambda mod, xx: reference(mod, xx, segments, gelu), copy.deepcopy(lin).double(), x.double(), 0)

    def amp():
        return torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def fused_amp(mod, xx):
        dt = dtype if dtype != torch.float32 else xx.dtype  # what LowRankLinear's triton path does under autocast
        return lowrank_linear(xx.to(dt), mod.V.to(dt), mod.rotations(), mod.U.to(dt), mod.bias, segments=segments,
                              gelu=gelu, eps=mod.eps)

    with amp():
        ref = outputs_and_grads(lambda mod, xx: reference(mod, xx, segments, gelu), lin, x, 0)
        got = outputs_and_grads(fused_amp, lin, x, 0)
    assert got[0].dtype == ref[0].dtype == dtype
    assert_within_2x(got, ref, truth, ("y", "dx", "dU", "db", "dV", "dA"), floor=1e-3 if dtype != torch.float32 else 1e-6)


@pytest.mark.gpu
def test_gpu_torch_compile():
    lin = make_map(256, 512, 128, 3, 0)
    x = torch.randn(4, 64, 256, device=DEV)

    def f(xx):
        return lowrank_linear(xx, lin.V, lin.rotations(), lin.U, lin.bias, group=1, gelu=True, eps=lin.eps)

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    compiled.sum().backward()
    assert lin.A.grad is not None and torch.isfinite(lin.A.grad).all()


@pytest.mark.gpu
def test_model_gpu():
    cfg = load_config("tiny", overrides=["model.sharing=lowrank", "model.kernel=reference"])
    torch.manual_seed(0)
    ref = AVBert(cfg.model).cuda().eval()
    fused_model = copy.deepcopy(ref)
    for mod in fused_model.modules():
        if isinstance(mod, LowRankLinear):
            mod.kernel = "triton"
    d = cfg.data
    video = torch.randn(2, d.num_clips, 3, d.frames, d.crop_size, d.crop_size, device="cuda")
    audio = torch.randn(2, d.num_clips, 1, d.n_mels, d.mel_frames, device="cuda")
    a, b = ref(video, audio).multimodal, fused_model(video, audio).multimodal
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # fp32 parameters, bf16 compute: the kernels follow autocast
        a, b = ref(video, audio).multimodal, fused_model(video, audio).multimodal
    torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


def test_interpreter_flag_is_set_for_cpu_runs():
    # guards the premise of every CPU test above: without it they would silently not exercise the kernels
    assert DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
