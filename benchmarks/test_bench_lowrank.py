"""Low-rank map ``act(U·R_m·normalize(V_mᵀx)+b)`` (docs/method.md §2): fused Triton kernel vs the eager PyTorch reference vs
``torch.compile(mode="max-autotune")`` of the reference; forward and forward+backward; time and achieved GB/s.
Forward+backward of the Triton forward runs twice: with the Triton backward (``triton``) and with the fp32
torch-matmul backward (``triton-torchbwd``), so the two backward paths are timed side by side.

Full sweep (``--full``, GPU only): tokens in {256, 1K, 4K, 16K, 64K}; paper maps O=128 with (N, M) = (768, 768)
(Q/K/V/attention out), (768, 3072)+GELU (FFN in), (3072, 768) (FFN out); bf16 inputs, fp32 parameters, bf16 autocast.
Quick mode (default): one tiny shape, one round, fp32: proves the benchmark code works on CPU. There the Triton
case runs only under the interpreter (TRITON_INTERPRET=1) and the compiled case is skipped (max-autotune on CPU
would spend minutes compiling): those timings mean nothing, only the GPU numbers do.

GB/s counts the compulsory traffic: forward reads x and the weights and writes y; forward+backward adds reading
dy and x again, writing dx, and reading/writing the weights and their gradients.
"""

from __future__ import annotations

import pytest
import torch

from avmt.backends import lowrank_status, select_lowrank
from avmt.models import LowRankLinear

FULL_TOKENS = [256, 1024, 4096, 16384, 65536]
FULL_SHAPES = [(768, 768, False), (768, 3072, True), (3072, 768, False)]
QUICK = (64, [(96, 160, True)])
IMPLS = ["triton", "triton-torchbwd", "reference", "compiled"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cases(full_mode: bool):
    tokens, shapes = (FULL_TOKENS, FULL_SHAPES) if full_mode else ([QUICK[0]], QUICK[1])
    return [(t, n, m, g) for t in tokens for n, m, g in shapes]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        full_mode = bool(metafunc.config.getoption("--full"))
        cases = _cases(full_mode)
        metafunc.parametrize("case", cases, ids=[f"T{t}-N{n}-M{m}{'-gelu' if g else ''}" for t, n, m, g in cases])


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_lowrank_map(benchmark, full, impl, backward, case):
    tokens, n, m, gelu = case
    if full and DEVICE != "cuda":
        pytest.skip("the full sweep needs a CUDA device")
    if impl == "triton-torchbwd" and not backward:
        pytest.skip("the forward of triton-torchbwd is the triton forward; only forward+backward differs")
    if (
        impl.startswith("triton")
        and select_lowrank(DEVICE, "auto") != "triton"
        and not (DEVICE == "cpu" and lowrank_status("cpu")["triton"][0])
    ):
        pytest.skip(f"Triton cannot run here: {lowrank_status(DEVICE)['triton'][1]}")
    if impl == "compiled" and DEVICE != "cuda":
        pytest.skip("torch.compile(max-autotune) is benchmarked on the GPU only (minutes of compile on CPU)")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    o, groups, group = 128, 3, 2
    torch.manual_seed(0)
    lin = LowRankLinear(
        n,
        m,
        o,
        groups,
        init_std=0.02,
        eps=1e-6,
        kernel="triton" if impl.startswith("triton") else "reference",
        kernel_backward="torch" if impl == "triton-torchbwd" else "triton",
    )
    lin = lin.to(DEVICE)  # fp32 parameters; bf16 compute through autocast, as mixed-precision training runs it
    x = torch.randn(tokens, n, device=DEVICE, dtype=dtype, requires_grad=backward)
    dy = torch.randn(tokens, m, device=DEVICE, dtype=dtype)
    if impl == "compiled":
        # a fresh dynamo cache per case: every case builds a new module, so past dynamo's recompile limit the
        # "compiled" column would silently run eager; the frame count below proves it compiled
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    fn = lin if impl != "compiled" else torch.compile(lin, mode="max-autotune")

    def run() -> torch.Tensor:
        lin.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            if backward:
                x.grad = None
                y = fn(x, group, gelu=gelu)
                y.backward(dy)
            else:
                with torch.no_grad():
                    y = fn(x, group, gelu=gelu)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return y

    y = run()  # warm-up (compiles/autotunes) and a guard that the benchmarked function computes the map
    if impl == "compiled":
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "torch.compile fell back to eager"
    params = ("U", "bias", "V", "A")
    got = [x.grad.clone(), *(getattr(lin, p).grad.clone() for p in params)] if backward else []
    kernel, lin.kernel = lin.kernel, "reference"
    lin.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        want = lin(x, group, gelu=gelu)
    if backward:  # and that its gradients are the reference's (loosely: this guards the benchmark, tests check accuracy)
        want.backward(dy)
        for name, g, w in zip(("x", *params), got, [x.grad, *(getattr(lin, p).grad for p in params)]):
            scale = w.float().abs().max().item()
            err = (g.float() - w.float()).abs().max().item()
            assert err <= (5e-2 if dtype == torch.bfloat16 else 1e-3) * (1 + scale), f"d{name}: {err:.3g} off the reference"
    lin.kernel = kernel
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y.detach().float(), want.detach().float(), rtol=tol, atol=tol)

    s = x.element_size()
    weights = (groups * n * o + m * o + m) * s + groups * o * o * 4  # V, U, b read in the compute dtype; R in fp32
    fwd_bytes = tokens * (n + m) * s + weights
    moved = fwd_bytes + (tokens * (m + 2 * n) * s + 2 * weights if backward else 0)
    benchmark.pedantic(run, rounds=10 if full else 1, iterations=1, warmup_rounds=2 if full else 0)
    mean = benchmark.stats.stats.mean if benchmark.stats is not None else float("nan")
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        impl=impl,
        tokens=tokens,
        n=n,
        m=m,
        o=o,
        gelu=gelu,
        dtype=str(dtype),
        backward=backward,
        min_bytes=moved,
        gb_per_s=moved / mean / 1e9 if mean == mean and mean > 0 else None,
        torch=torch.__version__,
        interpreter=DEVICE == "cpu" and impl.startswith("triton"),
        triton_backward=None if not impl.startswith("triton") else lin.kernel_backward,
    )
