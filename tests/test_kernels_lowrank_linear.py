"""The fused Triton low-rank map (avmt.kernels.lowrank_linear) against the plain PyTorch LowRankLinear.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported); the bf16/fp16 and paper-shape cases are GPU-marked. Accuracy rule (avmt.numerics): the fused error
against a float64 evaluation is at most 2x the fp32 (or same-dtype) reference's error, for the output and every
gradient, plus a small absolute floor.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from avmt import backends
from avmt.config import ConfigError, load_config
from avmt.models import AVBert, LowRankLinear, TransformerLayer
from avmt.numerics import error_report

triton_ok = backends.lowrank_status("cuda" if torch.cuda.is_available() else "cpu")["triton"][0]
pytestmark = pytest.mark.skipif(not triton_ok, reason="Triton cannot run here (no CUDA and no TRITON_INTERPRET=1)")

if triton_ok:
    from avmt.kernels.lowrank_linear import block_table, lowrank_linear, lowrank_linear_multi

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
        outs.append(lin(x2[start : start + length], g, gelu=gelu))
        start += length
    return torch.cat(outs).view(*x.shape[:-1], -1)


def fused(lin: LowRankLinear, x: torch.Tensor, segments: list[tuple[int, int]], gelu: bool, backward: str = "triton") -> torch.Tensor:
    return lowrank_linear(x, lin.V, lin.rotations(), lin.U, lin.bias, segments=segments, gelu=gelu, eps=lin.eps, backward=backward)


def outputs_and_grads(fn, lin: LowRankLinear, x: torch.Tensor, dy_seed: int, x_grad: bool = True) -> list[torch.Tensor]:
    """[y, dx, dU, db, dV, dA] of ``fn(lin, x)`` under a fixed random upstream gradient (dx omitted if not x_grad)."""
    lin.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x_grad)
    y = fn(lin, x)
    gen = torch.Generator(device="cpu").manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    y.backward(dy)
    return [y.detach(), *([x.grad] if x_grad else []), *(getattr(lin, p).grad for p in PARAMS)]


def assert_within_2x(got: list[torch.Tensor], ref: list[torch.Tensor], truth: list[torch.Tensor], names, floor: float = 1e-6):
    for name, row in zip(names, error_report(got, ref, truth, floor), strict=True):
        assert row["passed"], f"{name}: fused error {row['error']:.3g} > 2 x reference {row['reference_error']:.3g}"


def check_against_reference(n, m, o, g, shape, segments, gelu, seed, zero_rows=0, x_grad=True):
    """Forward and every gradient of the fused map, with the Triton backward and with the torch-matmul backward,
    each within 2x of the plain LowRankLinear's fp32 error against float64."""
    lin = make_map(n, m, o, g, seed)
    torch.manual_seed(seed + 1)
    x = torch.randn(*shape, n, device=DEV)
    if zero_rows:  # rows whose V^T x norm is below eps: the clamped branch of normalize
        x.view(-1, n)[:zero_rows] = 0
        x.view(-1, n)[zero_rows] *= 1e-9  # and one row just above zero, still clamped (norm < eps), not all-zero
    lin64 = copy.deepcopy(lin).double()
    truth = outputs_and_grads(lambda mod, xx: reference(mod, xx, segments, gelu), lin64, x.double(), seed, x_grad)
    ref = outputs_and_grads(lambda mod, xx: reference(mod, xx, segments, gelu), lin, x, seed, x_grad)
    names = ["y", *(["dx"] if x_grad else []), "dU", "db", "dV", "dA"]
    for backward in ("triton", "torch"):
        got = outputs_and_grads(lambda mod, xx, bw=backward: fused(mod, xx, segments, gelu, bw), lin, x, seed, x_grad)
        assert got[0].shape == (*shape, m) and got[0].dtype == x.dtype
        assert_within_2x(got, ref, truth, [f"{nm} ({backward} backward)" for nm in names])


@pytest.mark.parametrize(
    "n, m, o, g, shape, segments, gelu",
    [
        (37, 53, 16, 1, (1,), [(1, 0)], False),  # one token
        (45, 70, 16, 2, (7,), [(7, 1)], True),  # 7 tokens, group 1, GELU
        (33, 65, 20, 3, (3, 43), [(50, 2), (0, 0), (79, 1)], False),  # 129 tokens, O=20 padded to 32, empty segment
        (70, 37, 16, 3, (129,), [(1, 0), (64, 1), (64, 2)], True),  # three groups in one launch, GELU
        (19, 83, 24, 2, (2, 20), [(0, 1), (33, 1), (7, 0)], True),  # leading empty segment, O=24, M over 64 (two M slices)
    ],
)
def test_forward_and_gradients_match_reference(n, m, o, g, shape, segments, gelu):
    check_against_reference(n, m, o, g, shape, segments, gelu, seed=n + m)


@pytest.mark.parametrize("gelu", [False, True])
def test_clamped_norm_rows(gelu):
    check_against_reference(29, 31, 16, 2, (9,), [(4, 0), (5, 1)], gelu, seed=3, zero_rows=3)


def test_weight_gradients_without_input_gradient():
    # x without requires_grad: the Triton backward skips dx (NEED_DX=False) but must still give every weight gradient
    check_against_reference(27, 41, 16, 2, (11,), [(6, 1), (5, 0)], True, seed=5, x_grad=False)


def test_triton_backward_is_what_runs(monkeypatch):
    """backward="triton" goes through the Triton backward op (once per map call); backward="torch" never does."""
    import avmt.kernels.lowrank_linear as kl

    calls = []
    real = kl._lowrank_fused_bwd
    monkeypatch.setattr(kl, "_lowrank_fused_bwd", lambda *a: calls.append(a[0].shape) or real(*a))
    lin = make_map(24, 40, 16, 2, 7)
    x = torch.randn(13, 24, device=DEV, requires_grad=True)
    fused(lin, x, [(13, 1)], True, "torch").sum().backward()
    assert calls == []
    fused(lin, x, [(13, 1)], True, "triton").sum().backward()
    assert calls == [torch.Size([1, 13, 40])]  # dy as [P, T, M]


def test_fp32_weights_are_cast_on_load():
    """fp16 x with fp32 weights (fp32 parameters under autocast) gives exactly what fp16 copies of the weights give:
    the kernels cast on load instead of the caller copying. Gradients come back in each weight's own dtype."""
    lin = make_map(40, 24, 16, 2, 9)
    with torch.no_grad():  # weights that fp16 represents exactly, so the two calls see the same numbers
        lin.V.copy_(lin.V.half().float())
        lin.U.copy_(lin.U.half().float())
    torch.manual_seed(0)
    x = torch.randn(9, 40, device=DEV).half()
    r = lin.rotations().detach()
    dy = torch.randn(9, 24, device=DEV).half()
    for backward in ("triton", "torch"):
        res = []
        for wdt in (torch.float32, torch.float16):
            v, u = (t.detach().to(wdt).requires_grad_() for t in (lin.V, lin.U))
            xx = x.clone().requires_grad_()
            y = lowrank_linear(xx, v, r, u, lin.bias.detach(), group=1, gelu=True, backward=backward)
            y.backward(dy)
            assert v.grad.dtype == u.grad.dtype == wdt and y.dtype == xx.grad.dtype == torch.float16
            res.append((y, xx.grad, v.grad.half(), u.grad.half()))
        for name, a, b in zip(("y", "dx", "dV", "dU"), *res):
            assert torch.equal(a, b), f"{name} ({backward} backward): fp32 weights differ from their fp16 copies"


@pytest.mark.parametrize("backward", ["triton", "torch"])
def test_fused_qkv_matches_three_maps(backward):
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
            outs = lowrank_linear_multi(
                xx,
                [mp.V for mp in mods],
                [mp.rotations() for mp in mods],
                [mp.U for mp in mods],
                [mp.bias for mp in mods],
                group=2,
                eps=mods[0].eps,
                backward=backward,
            )
            outs = [o_.view(b, s, heads, n // heads).transpose(1, 2) for o_ in outs]
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
    outs = lowrank_linear_multi(
        x,
        [mp.V for mp in maps],
        [mp.rotations() for mp in maps],
        [mp.U for mp in maps],
        [mp.bias for mp in maps],
        segments=segments,
        gelu=True,
    )
    with torch.no_grad():
        for mp, y in zip(maps, outs):
            want = reference(mp, x, segments, True)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_layer_hands_parameters_to_the_kernels_uncast_and_unstacked(monkeypatch):
    """Under bf16 autocast with fp32 parameters, the fused Q/K/V launch and the single-map launches get each map's
    own parameter tensors (no per-call stack or cast copy); only the activations are cast."""
    import avmt.kernels.lowrank_linear as kl

    class Stop(Exception):
        pass

    seen = []

    def spy(x, Vs, Rs, Us, bs, **kw):  # records the call and stops before the (bf16, interpreter) kernel runs
        seen.append((x.dtype, list(Vs), list(Us), list(bs)))
        raise Stop

    monkeypatch.setattr(kl, "lowrank_linear_multi", spy)
    torch.manual_seed(0)
    layer = TransformerLayer(
        32, 4, 48, dropout=0.0, attention_dropout=0.0, ln_eps=1e-12, init_std=0.02, lowrank=True, rank=16, groups=2, kernel="triton"
    ).to(DEV)
    x = torch.randn(2, 3, 32, device=DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        with pytest.raises(Stop):
            layer(x, 1)
        with pytest.raises(Stop):
            layer.ffn_in(x, 1, gelu=True)
    (xd, vs, us, bs), (xd1, v1, u1, b1) = seen
    maps = (layer.query, layer.key, layer.value)
    assert xd == xd1 == torch.bfloat16
    assert all(a is mp.V and b is mp.U and c is mp.bias for a, b, c, mp in zip(vs, us, bs, maps))
    assert len(v1) == 1 and v1[0] is layer.ffn_in.V and u1[0] is layer.ffn_in.U and b1[0] is layer.ffn_in.bias


def test_block_table_is_cached_per_layout_and_device():
    """One table per (segment lengths, groups, block size, device): the second call returns the same tensor without
    building (and, on a GPU, copying) it again; another layout gets its own, with the right rows."""
    import avmt.kernels.lowrank_linear as kl

    x = torch.randn(3, 8, device=DEV)
    a = block_table([70, 0, 5], [2, 0, 1], 32, x)
    hits = kl._cached_table.cache_info().hits
    assert block_table((70, 0, 5), (2, 0, 1), 32, x) is a and kl._cached_table.cache_info().hits == hits + 1
    assert a.dtype == torch.int32 and a.device == x.device
    assert a.tolist() == [[0, 70, 2], [32, 70, 2], [64, 70, 2], [70, 75, 1]]  # no block spans two segments
    assert block_table([70, 0, 5], [2, 0, 1], 64, x).tolist() == [[0, 70, 2], [64, 70, 2], [70, 75, 1]]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # fake inputs never reach (or fill) the cache
        t = block_table([5], [0], 32, mode.from_tensor(x))
    assert type(t) is not torch.Tensor and block_table([5], [0], 32, x).tolist() == [[0, 5, 0]]


def test_forward_splits_m_over_programs(monkeypatch):
    """Several programs per (token block, map), each writing its own part of M, give the one-program result."""
    import avmt.kernels.lowrank_linear as kl

    lin = make_map(40, 200, 16, 2, 5)
    x = torch.randn(37, 40, device=DEV)
    r = lin.rotations().detach()
    outs = {}
    for splits in (1, 2, 3):
        monkeypatch.setattr(kl, "_m_splits", lambda programs, m, bm, device, k=splits: k)
        with torch.no_grad():
            outs[splits] = lowrank_linear(x, lin.V, r, lin.U, lin.bias, group=1, gelu=True)
    assert torch.equal(outs[1], outs[2]) and torch.equal(outs[1], outs[3])


def test_bad_inputs_raise():
    lin = make_map(16, 24, 16, 2, 0)
    x = torch.randn(5, 16, device=DEV)
    r = lin.rotations()
    with pytest.raises(ValueError, match="V must be"):
        lowrank_linear(torch.randn(5, 17, device=DEV), lin.V, r, lin.U, lin.bias)
    with pytest.raises(ValueError, match="R must be"):
        lowrank_linear(x, lin.V, r[:1], lin.U, lin.bias)
    with pytest.raises(TypeError, match="must have x's dtype"):  # fp16 weights with fp32 x (fp32 weights are cast on load)
        lowrank_linear(x, lin.V.half(), r, lin.U, lin.bias)
    with pytest.raises(ValueError, match="backward='cuda' is invalid"):
        lowrank_linear(x, lin.V, r, lin.U, lin.bias, backward="cuda")
    with pytest.raises(ValueError, match="1 to 3 maps"):
        lowrank_linear_multi(x, [lin.V] * 4, [r] * 4, [lin.U] * 4, [lin.bias] * 4)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        lowrank_linear(x.long(), lin.V, r, lin.U, lin.bias)
    with pytest.raises(ValueError, match="sum to the 5 tokens"):
        lowrank_linear(x, lin.V, r, lin.U, lin.bias, segments=[(2, 0), (2, 1)])
    with pytest.raises(IndexError, match="out of range"):
        lowrank_linear(x, lin.V, r, lin.U, lin.bias, group=2)
    with pytest.raises(ValueError, match="same device|must share one device"):
        lowrank_linear(x, lin.V, r, lin.U.to("meta"), lin.bias)


def test_backend_selection(monkeypatch):
    assert backends.select_lowrank("cpu", "reference") == "reference"
    assert backends.select_lowrank("cpu", "auto") == "reference"  # the interpreter is for tests, never automatic
    with pytest.raises(ValueError, match="expected one of"):
        backends.select_lowrank("cpu", "cuda")
    with pytest.raises(RuntimeError, match="got torch.float64"):
        backends.select_lowrank("cpu", "triton", torch.float64)
    assert backends.select_lowrank("cuda", "auto", torch.float64) == "reference"  # auto falls back for float64
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton needs CUDA tensors"):
        backends.select_lowrank("cpu", "triton")
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
    assert_within_2x(
        [losses["triton"], *grads["triton"].values()],
        [losses["reference"], *grads["reference"].values()],
        [losses["float64"], *grads["float64"].values()],
        names,
        floor=1e-5,
    )


# ---- GPU: bf16/fp16, paper shapes, torch.compile --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, m, gelu", [(768, 768, False), (768, 3072, True), (3072, 768, False), (3072, 3072, True)])
def test_gpu_paper_shapes(dtype, n, m, gelu, backward):
    """bf16/fp16 as the model runs them: fp32 parameters under autocast (the reference's matmuls and the fused
    kernels both compute in the autocast dtype; the kernels cast the fp32 parameters on load), fp32 without
    autocast; forward and every gradient, with the Triton backward and with the torch-matmul backward."""
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
        return lowrank_linear(
            xx.to(dt), mod.V, mod.rotations(), mod.U, mod.bias, segments=segments, gelu=gelu, eps=mod.eps, backward=backward
        )

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
    eager.sum().backward()
    want = [getattr(lin, p).grad.clone() for p in PARAMS]
    lin.zero_grad(set_to_none=True)
    compiled = torch.compile(f, fullgraph=True)(x)  # the forward and the Triton backward ops, traced
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    compiled.sum().backward()
    for p, w in zip(PARAMS, want):
        torch.testing.assert_close(getattr(lin, p).grad, w, rtol=1e-4, atol=1e-5, msg=lambda m, p=p: f"d{p}: {m}")


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
