"""``python -m avmt.bench gpu``: one command that checks every GPU path and leaves JSON behind.

    python -m avmt.bench gpu [--budget-s 480] [--out PATH] [--parts a,b] [--dry-run] [--no-build] [--commit SHA]

For a GPU machine that has only torch and Triton (no PyAV, no DALI, no network). It builds ``avmt._C`` when the
checkout has no usable build (``pip install --no-build-isolation --no-deps -e .``), then runs the parts below in
priority order, each in its own process with a time limit taken from ``--budget-s``, and rewrites the JSON after
every part (and while a part runs), so that a kill keeps what finished:

- ``sampling``: the fast ``sample_negatives`` backend (CUDA op on a GPU) against the reference for every mode (same
  indices for the same seed), its time vs the reference and the C++ CPU op for Np 1K-64K, device syncs per call;
- ``lowrank``: the Triton low-rank kernels, forward and backward, bf16/fp16/fp32 at the paper's shapes and ragged
  token counts, against the reference by the 2x error rule; time vs eager and vs ``torch.compile`` (one compiled
  module per shape set, recompiles counted); device syncs per call;
- ``step``: a paper-preset pretraining step per sharing scheme (bf16): seconds per step, allocator peak, syncs;
- ``cnn_options``: the CNN memory options side by side on the paper preset's `lowrank` step (bf16): plain,
  ``train.cnn_channels_last``, ``train.cnn_checkpoint`` in chunks of 4, both, and ``train.clips_with_grad=5``:
  seconds per step (and the ratio to plain), allocator peak, and the whole-step peak estimator against it;
- ``largest_batch``: the largest batch of 30 s sequences whose step fits, per scheme, within a bounded time;
- ``dali``: the DALI tests (H.264 decode on the GPU) when DALI and PyAV are importable, else a skip with the reason;
- ``gpu_tests``: the tests marked ``gpu`` that need nothing the machine lacks.

``--dry-run`` runs the same code on the CPU with tiny shapes (Triton interpreter, ``tiny`` preset): CI runs it so the
command cannot rot between GPU runs. Results go to ``benchmarks/results/gpu-<device>-<date>.json`` (``--out``);
``python -m avmt.bench report`` renders them. Exit code 1 if a part failed or timed out.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout (avmt/bench/gpu.py)
KIND = "avmt-gpu-check"
PARTS: tuple[str, ...] = ("sampling", "lowrank", "step", "cnn_options", "largest_batch", "dali", "gpu_tests")  # priority order
CAPS_S = {"sampling": 60, "lowrank": 150, "step": 90, "cnn_options": 75, "largest_batch": 90, "dali": 60, "gpu_tests": 150}
MIN_PART_S = 15  # a part is not started with less than this left of the budget
BUILD_TIMEOUT_S = 600
TAIL = 4000  # characters of a failed step's output kept in the JSON


# -- shared helpers ------------------------------------------------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a reader (or a kill) sees the previous file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    except BaseException:  # a full disk, a folder at ``path``, a kill: no stray temporary file is left
        tmp.unlink(missing_ok=True)
        raise


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout; pass --commit)"


def device_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"name": f"cpu ({os.cpu_count()} cores)", "cuda": False}
    p = torch.cuda.get_device_properties(0)
    return {
        "name": p.name,
        "cuda": True,
        "capability": f"{p.major}.{p.minor}",
        "sms": p.multi_processor_count,
        "memory_bytes": p.total_memory,
        "count": torch.cuda.device_count(),
    }


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "device"


class Part:
    """What a part function gets: the device, the mode, its deadline, and ``record`` to save results as it goes."""

    def __init__(self, name: str, dry_run: bool, deadline: float, out: Path) -> None:
        import torch

        self.name, self.dry_run, self.deadline, self.out = name, dry_run, deadline, out
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.results: dict[str, Any] = {"status": "running"}

    def left(self) -> float:
        return self.deadline - time.time()

    def record(self, key: str, value: Any) -> None:
        self.results[key] = value
        write_json(self.out, self.results)


@contextlib.contextmanager
def count_syncs(device: Any) -> Iterator[list[int | None]]:
    """Counts the host-device synchronisations inside the block (CUDA only, through torch's sync debug mode);
    ``box[0]`` holds the count afterwards, None on the CPU."""
    import torch

    box: list[int | None] = [None]
    if getattr(device, "type", device) != "cuda":
        yield box
        return
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    box[0] = sum("synchroniz" in str(w.message) for w in seen)


def timed(fn: Callable[[], Any], device: Any, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if getattr(device, "type", device) == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# -- parts ---------------------------------------------------------------------------------------------------------------


def part_sampling(ctx: Part) -> dict[str, Any]:
    import torch

    from avmt.backends import sampling_status, select_sampling
    from avmt.sampling import MODES, sample_negatives

    dev = ctx.device
    fast = select_sampling(dev)
    ctx.record("fast_backend", fast)
    ctx.record("backends", {k: list(v) for k, v in sampling_status(dev).items()})
    np_, d, na, k = (600, 32, 90, 16) if ctx.dry_run else (3000, 64, 400, 32)
    agree = {}
    for mode in MODES:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            pool = torch.randn(np_, d, generator=g).to(dev, dtype)
            anchor_index = torch.randint(0, np_, (na,), generator=g).to(dev)
            group = torch.randint(0, 40, (np_,), generator=g).to(dev)
            kw = dict(mode=mode, anchor_index=anchor_index, group=group)
            ref = sample_negatives(pool[anchor_index], pool, k, generator=torch.Generator().manual_seed(1), backend="reference", **kw)
            got = sample_negatives(pool[anchor_index], pool, k, generator=torch.Generator().manual_seed(1), backend=fast, **kw)
            # the reference and the op compute distances with different GEMMs: a few rows may differ at near-ties
            agree[f"{mode}/{str(dtype).removeprefix('torch.')}"] = (ref == got).all(1).float().mean().item()
    ctx.record("rows_equal_to_reference", agree)
    bad = {key: v for key, v in agree.items() if v < 0.99}

    sizes = [256, 1024] if ctx.dry_run else [1024, 4096, 16384, 65536]
    dim = 64 if ctx.dry_run else 768
    reps = 2 if ctx.dry_run else 5
    speed = []
    for n in sizes:
        if ctx.left() < 10:
            ctx.record("speed_note", f"stopped before Np={n}: part deadline")
            break
        g = torch.Generator().manual_seed(0)
        pool = torch.randn(n, dim, generator=g).to(dev)
        anchor_index = torch.randperm(n, generator=g)[: int(0.15 * n)].to(dev)
        anchors = pool[anchor_index]
        row: dict[str, Any] = {"np": n, "na": anchors.shape[0], "d": dim, "k": 32}

        def call(backend: str, a=anchors, p=pool, ai=anchor_index) -> Any:
            return sample_negatives(a, p, 32, anchor_index=ai, generator=torch.Generator().manual_seed(1), backend=backend)

        row[f"{fast}_s"] = timed(lambda: call(fast), dev, reps)
        with count_syncs(dev) as syncs:
            call(fast)
        row["syncs_per_call"] = syncs[0]
        if n * anchors.shape[0] * 8 * 6 < (2 << 30):  # the reference's [Na, Np] float64 intermediates
            row["reference_s"] = timed(lambda: call("reference"), dev, reps)
        if dev.type == "cuda" and n <= 16384:
            a_cpu, p_cpu, i_cpu = anchors.cpu(), pool.cpu(), anchor_index.cpu()
            row["cpp_s"] = timed(lambda a=a_cpu, p=p_cpu, i=i_cpu: call("cpp", a, p, i), "cpu", 1)
        speed.append(row)
        ctx.record("speed", speed)
    if bad:
        return {"status": "failed", "reason": f"fewer than 99% of rows equal the reference: {bad}"}
    return {"status": "passed"}


def _lowrank_cases(dry: bool) -> list[tuple[int, int, bool, int, list[tuple[int, int]]]]:
    """(N, M, gelu, maps, segments): the paper's maps (O=128, 3 groups) at ragged token counts."""
    if dry:
        return [(48, 48, False, 3, [(5, 0), (0, 1), (37, 2)]), (48, 80, True, 1, [(33, 1)]), (80, 48, False, 1, [(1, 0), (20, 2)])]
    return [
        (768, 768, False, 3, [(1000, 0), (1000, 1), (2099, 2)]),
        (768, 768, False, 1, [(61, 0), (67, 1), (2, 2)]),
        (768, 3072, True, 1, [(1000, 0), (1000, 1), (2099, 2)]),
        (3072, 768, False, 1, [(127, 2)]),
    ]


def part_lowrank(ctx: Part) -> dict[str, Any]:
    import copy

    import torch

    from avmt.backends import lowrank_status
    from avmt.kernels import lowrank_reference
    from avmt.kernels.lowrank_linear import lowrank_linear_multi
    from avmt.models import LowRankLinear
    from avmt.numerics import error_report

    dev = ctx.device
    ok, why = lowrank_status(dev)["triton"]
    ctx.record("triton", why)
    if not ok:
        return {"status": "failed", "reason": why}
    o = 16 if ctx.dry_run else 128
    # the interpreter's bf16 tl.dot is wrong, so the dry run checks fp32 only
    dtypes = [torch.float32] if ctx.dry_run else [torch.bfloat16, torch.float16, torch.float32]

    def maps_for(n: int, m: int, count: int, seed: int) -> list[LowRankLinear]:
        torch.manual_seed(seed)
        mods = [LowRankLinear(n, m, o, 3, init_std=0.02, eps=1e-6) for _ in range(count)]
        with torch.no_grad():  # far-from-identity rotations and a non-zero bias
            for mod in mods:
                mod.A.normal_(std=0.3)
                mod.bias.normal_()
        return [mod.to(dev) for mod in mods]

    def run(mods, x, segments, gelu, impl: str, dtype) -> list[Any]:
        """[outputs..., dx, per map dU, db, dV, dA] under a fixed upstream gradient."""
        for mod in mods:
            mod.zero_grad(set_to_none=True)
        x = x.detach().clone().requires_grad_(True)
        amp = torch.autocast(dev.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16) else contextlib.nullcontext()
        with amp:
            if impl == "reference":
                outs = []
                for mod in mods:
                    pieces, start = [], 0
                    for length, g in segments:
                        pieces.append(
                            lowrank_reference(
                                x[start : start + length], mod.V[g], mod.rotations()[g], mod.U, mod.bias, gelu=gelu, eps=mod.eps
                            )
                        )
                        start += length
                    outs.append(torch.cat(pieces))
            else:
                xd = x.to(dtype) if dtype != torch.float64 else x
                outs = lowrank_linear_multi(
                    xd,
                    [mod.V for mod in mods],
                    [mod.rotations() for mod in mods],
                    [mod.U for mod in mods],
                    [mod.bias for mod in mods],
                    segments=segments,
                    gelu=gelu,
                    eps=mods[0].eps,
                    backward="torch" if impl == "triton-torchbwd" else "triton",
                )
        gen = torch.Generator().manual_seed(7)
        loss = sum((y.float() * torch.randn(y.shape, generator=gen).to(dev)).sum() for y in outs)
        loss.backward()
        grads = [x.grad] + [getattr(mod, p).grad for mod in mods for p in ("U", "bias", "V", "A")]
        return [y.detach() for y in outs] + grads

    accuracy, failures = [], []
    for n, m, gelu, count, segments in _lowrank_cases(ctx.dry_run):
        tokens = sum(length for length, _ in segments)
        mods = maps_for(n, m, count, seed=n + m)
        x = torch.randn(tokens, n, device=dev)
        truth = run([copy.deepcopy(mod).double() for mod in mods], x.double(), segments, gelu, "reference", torch.float64)
        for dtype in dtypes:
            if ctx.left() < 20:
                ctx.record("accuracy_note", "stopped early: part deadline")
                break
            ref = run(mods, x, segments, gelu, "reference", dtype)
            for impl in ("triton", "triton-torchbwd"):
                got = run(mods, x, segments, gelu, impl, dtype)
                floor = 1e-3 if dtype != torch.float32 else 1e-6
                report = error_report(got, ref, truth, floor=floor)
                case = {
                    "n": n,
                    "m": m,
                    "o": o,
                    "gelu": gelu,
                    "maps": count,
                    "segments": segments,
                    "dtype": str(dtype).removeprefix("torch."),
                    "impl": impl,
                    "passed": all(r["passed"] for r in report),
                    "worst_ratio": max(r["ratio"] for r in report),
                }
                accuracy.append(case)
                if not case["passed"]:
                    failures.append({**case, "errors": report})
            ctx.record("accuracy", accuracy)
    ctx.record("accuracy_failures", failures)

    _lowrank_speed(ctx, maps_for)  # records "speed" and "compile" as it goes
    if failures:
        return {"status": "failed", "reason": f"{len(failures)} of {len(accuracy)} accuracy cases break the 2x rule"}
    return {"status": "passed"}


def _lowrank_speed(ctx: Part, maps_for: Callable[..., list[Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Eager reference vs Triton vs torch.compile of the reference, bf16 autocast (fp32 in the dry run)."""
    import torch
    import torch._dynamo

    dev = ctx.device
    dtype = torch.float32 if ctx.dry_run else torch.bfloat16
    shapes = [(48, 80, True)] if ctx.dry_run else [(768, 768, False), (768, 3072, True), (3072, 768, False)]
    token_counts = [64] if ctx.dry_run else [128, 4096, 65536]
    reps = 1 if ctx.dry_run else 20
    # inductor on the GPU; on the CPU (dry run) aot_eager traces the same way without minutes of C++ compiles
    backend = "inductor" if dev.type == "cuda" else "aot_eager"
    for limit in ("recompile_limit", "cache_size_limit"):  # each token count is a new static shape: never fall back to eager
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    rows: list[dict[str, Any]] = []
    compiles: list[dict[str, Any]] = []
    for n, m, gelu in shapes:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        lin = maps_for(n, m, 1, seed=0)[0]
        compiled = torch.compile(lambda x, mod=lin, g=gelu: mod(x, 2, gelu=g), backend=backend, dynamic=False)
        for t in token_counts:
            if ctx.left() < 15:
                rows.append({"n": n, "m": m, "tokens": t, "note": "not run: part deadline"})
                continue
            x = torch.randn(t, n, device=dev, requires_grad=True)
            dy = torch.randn(t, m, device=dev, dtype=dtype)
            row: dict[str, Any] = {
                "n": n,
                "m": m,
                "o": lin.rank,
                "gelu": gelu,
                "tokens": t,
                "dtype": str(dtype).removeprefix("torch."),
                "compile_backend": backend,
            }
            for impl in ("reference", "triton", "compiled"):
                if impl == "compiled" and ctx.left() < 45:  # a compile cannot be interrupted: leave room for it
                    row["compiled_note"] = "not run: part deadline"
                    continue
                lin.kernel = "triton" if impl == "triton" else "reference"
                fn = compiled if impl == "compiled" else (lambda x, mod=lin, g=gelu: mod(x, 2, gelu=g))

                def fwd(fn=fn, x=x) -> Any:
                    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                        return fn(x)

                def fwd_bwd(fn=fn, x=x, dy=dy, lin=lin) -> None:
                    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                        y = fn(x)
                    y.backward(dy)
                    lin.zero_grad(set_to_none=True)
                    x.grad = None

                if impl != "compiled":  # the compiled forward alone would be one more compile per shape
                    row[f"{impl}_fwd_s"] = timed(fwd, dev, reps)
                row[f"{impl}_fwd_bwd_s"] = timed(fwd_bwd, dev, reps)
                if impl == "triton":
                    with count_syncs(dev) as syncs:
                        fwd_bwd()
                    row["triton_syncs_per_fwd_bwd"] = syncs[0]
            lin.kernel = "reference"
            row["compiled_graphs_so_far"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            rows.append(row)
            ctx.record("speed", rows)
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        compiles.append(
            {
                "n": n,
                "m": m,
                "gelu": gelu,
                "graphs": graphs,
                "recompiles": max(0, graphs - 1),
                "frames": dict(torch._dynamo.utils.counters["frames"]),
            }
        )
        ctx.record("compile", compiles)
    return rows, compiles


def part_step(ctx: Part) -> dict[str, Any]:
    import gc

    import torch

    from avmt.bench import training_step
    from avmt.bench.peak import step_peak
    from avmt.config import SHARING_SCHEMES, load_config
    from avmt.optim import use_bf16

    dev = ctx.device
    preset, batch, steps = ("tiny", 2, 2) if ctx.dry_run else ("paper", 4, 5)
    rows: dict[str, Any] = {}
    bad: list[str] = []
    for scheme in SHARING_SCHEMES:
        if ctx.left() < 10:
            rows[scheme] = {"note": "not run: part deadline"}
            continue
        cfg = load_config(preset, overrides=[f"model.sharing={scheme}"])
        ts = training_step(cfg, batch, dev)
        model = ts.model

        def step(ts=ts) -> float:
            return float(ts.step())

        before = [p.detach().clone() for p in model.layers.parameters()]
        first_loss = step()  # warm-up: cuDNN/Triton autotuning, allocator growth
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with count_syncs(dev) as syncs:
            step()
        seconds = timed(step, dev, steps, warmup=0)
        moved = all(not torch.equal(b, p.detach()) for b, p in zip(before, model.layers.parameters(), strict=True))
        rows[scheme] = {
            "preset": preset,
            "batch": batch,
            "clips": cfg.data.num_clips,
            "seconds_per_step": seconds,
            "sequences_per_s": batch / seconds,
            "precision": "bf16" if use_bf16(cfg.train, dev) else "fp32",
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
            "syncs_per_step": syncs[0],
            "first_loss": first_loss,
            "transformer_params_moved": moved,
        }
        ok = moved and math.isfinite(first_loss)
        ctx.record("steps", rows)
        if not ok:
            bad.append(scheme)
        del step, ts, model, before
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if ctx.left() > 30:  # the whole-step peak estimator (avmt.bench.peak) against the allocator's own peak
            est = step_peak(cfg, batch, mode="real", device=dev, scope="pretraining")
            rows[scheme]["estimated_peak_bytes"] = est.peak_bytes
            rows[scheme]["estimated_peak_at"] = est.peak_at
            if est.allocator_peak_bytes:
                rows[scheme]["estimate_over_allocator"] = est.peak_bytes / est.allocator_peak_bytes
            ctx.record("steps", rows)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if bad:
        return {"status": "failed", "reason": f"non-finite loss or parameters that did not move: {bad}"}
    return {"status": "passed"}


CNN_OPTIONS: dict[str, list[str]] = {  # name: train overrides, compared with "plain" on one step
    "plain": [],
    "channels_last": ["train.cnn_channels_last=true"],
    "cnn_checkpoint_chunk4": ["train.cnn_checkpoint=true", "train.cnn_chunk=4"],
    "cnn_checkpoint_chunk4_channels_last": ["train.cnn_checkpoint=true", "train.cnn_chunk=4", "train.cnn_channels_last=true"],
    "clips_with_grad5": ["train.clips_with_grad=5"],
}


def part_cnn_options(ctx: Part) -> dict[str, Any]:
    """Whether channels-last CNNs pay off under bf16, and what recompute and partial back-propagation cost in time
    and save in memory on a real allocator (the long-clip measurements the CPU cannot make)."""
    import gc

    import torch

    from avmt.bench import training_step
    from avmt.bench.peak import step_peak
    from avmt.config import load_config

    dev = ctx.device
    preset, batch, steps = ("tiny", 2, 1) if ctx.dry_run else ("paper", 4, 3)
    rows: dict[str, Any] = {}
    for name, overrides in CNN_OPTIONS.items():
        if ctx.left() < 10:
            rows[name] = {"note": "not run: part deadline"}
            continue
        if ctx.dry_run and name == "clips_with_grad5":
            overrides = ["train.clips_with_grad=2"]  # tiny has T=4
        cfg = load_config(preset, overrides=["model.sharing=lowrank", *overrides])
        ts = training_step(cfg, batch, dev)
        first = float(ts.step())  # warm-up: cuDNN algorithm choice for this layout, allocator growth
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(lambda ts=ts: ts.step(), dev, steps, warmup=0)
        rows[name] = {
            "overrides": overrides,
            "seconds_per_step": seconds,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
            "first_loss": first,
        }
        del ts
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if ctx.left() > 25:
            est = step_peak(cfg, batch, mode="real", device=dev, scope="model")
            rows[name]["estimated_peak_bytes"] = est.peak_bytes
            if est.allocator_peak_bytes:
                rows[name]["estimate_over_allocator"] = est.peak_bytes / est.allocator_peak_bytes
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        ctx.record("cnn_options", rows)
    plain = rows.get("plain", {}).get("seconds_per_step")
    for r in rows.values():
        if plain and r.get("seconds_per_step"):
            r["time_over_plain"] = r["seconds_per_step"] / plain
    ctx.record("cnn_options", rows)
    bad = [n for n, r in rows.items() if "first_loss" in r and not math.isfinite(r["first_loss"])]
    if bad:
        return {"status": "failed", "reason": f"non-finite loss: {bad}"}
    return {"status": "passed"}


class _Deadline(Exception):
    pass


def part_largest_batch(ctx: Part) -> dict[str, Any]:
    import torch

    from avmt.bench import training_step
    from avmt.bench.search import largest_fitting_batch, training_step_fits
    from avmt.config import SHARING_SCHEMES, load_config

    preset = "tiny" if ctx.dry_run else "paper"
    rows = {}
    for i, scheme in enumerate(SHARING_SCHEMES):
        cfg = load_config(preset, overrides=[f"model.sharing={scheme}"])
        share = ctx.left() / (len(SHARING_SCHEMES) - i)  # what is left, split over the schemes still to go
        stop = time.time() + share
        tried: list[tuple[int, bool]] = []

        def fits(b: int, cfg=cfg, stop=stop, tried=tried) -> bool:
            if time.time() > stop:
                raise _Deadline
            if ctx.dry_run:  # the CPU has no allocator limit: a real step, under a pretend limit of 2 sequences
                ok = b <= 2 and math.isfinite(float(training_step(cfg, b, "cpu").step()))
            else:
                ok = training_step_fits(cfg, b, ctx.device)
            tried.append((b, ok))
            return ok

        try:
            best, trials = largest_fitting_batch(fits, start=1 if ctx.dry_run else 4, limit=4 if ctx.dry_run else 4096)
            rows[scheme] = {
                "preset": preset,
                "clips": cfg.data.num_clips,
                "largest_batch": best,
                "trials": trials,
                "memory_bytes": torch.cuda.get_device_properties(0).total_memory if ctx.device.type == "cuda" else None,
                "simulated_limit": 2 if ctx.dry_run else None,
            }
        except _Deadline:
            fitted = [b for b, ok in tried if ok]
            rows[scheme] = {
                "preset": preset,
                "clips": cfg.data.num_clips,
                "largest_batch_at_least": max(fitted, default=0),
                "trials": tried,
                "note": f"search stopped after {share:.0f} s",
            }
        ctx.record("largest_batch", rows)
    incomplete = [s for s, r in rows.items() if "largest_batch" not in r]
    return {"status": "passed", **({"note": f"bounds only (time limit): {incomplete}"} if incomplete else {})}


def _pytest(ctx: Part, args: list[str], key: str) -> dict[str, Any]:
    """Runs pytest in a subprocess until the part's deadline; the counts and failures from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, ctx.left() - 5))
            out, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = _text(e.stdout) + _text(e.stderr), "timeout"
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        failures = []
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                name = f"{case.get('classname')}::{case.get('name')}"
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                if bad is not None:
                    counts["failed"] += 1
                    failures.append({"test": name, "message": (bad.get("message") or "")[:500]})
                elif case.find("skipped") is not None:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
    ctx.record(key, {"command": " ".join(cmd[2:]), "returncode": rc, **counts, "failures": failures})
    if rc == "timeout" or counts["failed"] or rc not in (0, 5):
        return {"status": "failed", "reason": f"pytest {rc}: {counts}", "output_tail": out[-TAIL:]}
    if counts["passed"] == 0:
        return {"status": "skipped", "reason": f"every selected test was skipped here ({counts['skipped']})"}
    return {"status": "passed"}


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def part_dali(ctx: Part) -> dict[str, Any]:
    missing = [m for m in ("nvidia.dali", "av") if not _importable(m)]
    if missing:
        why = f"not importable here: {', '.join(missing)} (DALI decodes; PyAV writes the H.264 test videos)"
        return {"status": "skipped", "reason": why}
    return _pytest(ctx, ["-m", "gpu", "tests/test_data_loader_dali.py"], "pytest")


def part_gpu_tests(ctx: Part) -> dict[str, Any]:
    # the DALI files run in part dali; benchmarks/ holds benchmarks, not tests
    return _pytest(ctx, ["-m", "gpu", "tests", "--ignore=tests/test_data_loader_dali.py"], "pytest")


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


PART_FUNCS: dict[str, Callable[[Part], dict[str, Any]]] = {
    "sampling": part_sampling,
    "lowrank": part_lowrank,
    "step": part_step,
    "cnn_options": part_cnn_options,
    "largest_batch": part_largest_batch,
    "dali": part_dali,
    "gpu_tests": part_gpu_tests,
}


def run_child(name: str, dry_run: bool, deadline: float, out: Path) -> int:
    """Body of a part's process: runs the part, writes its result file (also on an exception), returns 0."""
    if not _cuda_visible():  # before triton is imported: on the CPU the kernels run in the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    ctx = Part(name, dry_run, deadline, out)
    try:
        result = PART_FUNCS[name](ctx)
    except Exception as e:
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "output_tail": traceback.format_exc()[-TAIL:]}
    ctx.results.update(result)
    write_json(out, ctx.results)
    return 0


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


# -- the orchestrator ----------------------------------------------------------------------------------------------------


def _build_status() -> dict[str, Any]:
    """Whether avmt._C and avmt.kernels import in a fresh interpreter, and what _C was built with."""
    code = (
        "import json, torch, avmt.kernels, avmt._C as c; print(json.dumps({'cuda_built': bool(c.cuda_built), "
        "'build_torch': getattr(c, 'build_torch', None), 'torch': torch.__version__, 'cuda': torch.cuda.is_available()}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    stale = info["build_torch"] != info["torch"] or (info["cuda"] and not info["cuda_built"])
    return {"ok": not stale, **info}


def ensure_built(no_build: bool) -> dict[str, Any]:
    t0 = time.time()
    status = _build_status()
    if status["ok"]:
        return {"status": "passed", "action": "already built", **status, "seconds": round(time.time() - t0, 1)}
    if no_build:
        return {"status": "failed", "reason": f"avmt is not built for this torch/GPU and --no-build was given: {status}"}
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", str(ROOT)]
    print("+", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        out, rc = "", "timeout"
    setup_lines = [ln.strip() for ln in out.splitlines() if "avmt setup:" in ln]
    after = _build_status() if rc == 0 else {"ok": False}
    result = {
        "action": "pip install --no-build-isolation --no-deps -e .",
        "returncode": rc,
        "seconds": round(time.time() - t0, 1),
        "setup": setup_lines[-2:],
        "before": status,
        **after,
    }
    if rc != 0 or not after.get("ok"):
        return {"status": "failed", "reason": f"build failed (pip exit {rc})", "output_tail": out[-TAIL:], **result}
    return {"status": "passed", **result}


def spawn_part(name: str, dry_run: bool, timeout: float, part_file: Path) -> dict[str, Any]:
    """Runs one part in its own process (own CUDA context: a crash or hang there cannot take the others down)."""
    deadline = time.time() + timeout - 5
    cmd = [
        sys.executable,
        "-m",
        "avmt.bench.gpu",
        "--child",
        name,
        "--part-file",
        str(part_file),
        "--deadline",
        str(deadline),
        *(["--dry-run"] if dry_run else []),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AVMT_GPU_CHECK_PARENT": str(os.getpid())}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = "timeout"
    try:
        result = json.loads(part_file.read_text())
    except (OSError, json.JSONDecodeError):
        result = {}
    if rc == "timeout":
        result.update(status="timeout", reason=f"killed after {timeout:.0f} s; the results above are what it had recorded")
    elif rc != 0 or result.get("status") in (None, "running"):
        result.update(status="failed", reason=f"the part's process exited with {rc}")
    if result["status"] in ("failed", "timeout"):
        result.setdefault("output_tail", (out or "")[-TAIL:])
    return result


def unwritable(out: Path) -> str | None:
    """Why the result file ``out`` cannot be written (a folder, not a regular file, not writable, no writable folder
    above it), or None. The commands that write one check it before any work, so no measurement is lost to it."""
    if out.is_dir():
        return f"--out {out} is a folder; name the file to write"
    if out.exists() and not out.is_file():
        return f"--out {out} is not a regular file"
    if out.exists() and not os.access(out, os.W_OK):
        return f"--out {out} is not writable"
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out}: {parent} is not a writable folder"
    return None


def run_check(args: argparse.Namespace, spawn: Callable[[str, bool, float, Path], dict[str, Any]] = spawn_part) -> int:
    import torch

    t0 = time.time()
    dev = device_info()
    now = datetime.now(UTC)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu-{_slug(dev['name'] if dev['cuda'] else 'cpu')}-{now:%Y%m%dT%H%M%S}.json")
    parts = args.parts.split(",") if args.parts is not None else list(PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or len(set(parts)) != len(parts):
        what = f"unknown part(s) {unknown}" if unknown else f"a part twice in {args.parts!r}"
        print(f"python -m avmt.bench gpu: error: {what}; the parts are {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if not MIN_PART_S <= args.budget_s < math.inf:  # NaN too: a budget no comparison can spend
        print(
            f"python -m avmt.bench gpu: error: --budget-s must be a finite number of seconds >= {MIN_PART_S} (the least a part "
            f"is started with), got {args.budget_s:g}",
            file=sys.stderr,
        )
        return 2
    why = unwritable(out)
    if why is not None:
        print(f"python -m avmt.bench gpu: error: {why}", file=sys.stderr)
        return 2
    doc: dict[str, Any] = {
        "kind": KIND,
        "dry_run": args.dry_run,
        "date": now.isoformat(timespec="seconds"),
        "commit": _commit(args.commit),
        "command": " ".join(["python -m avmt.bench gpu", *args.argv]),
        "budget_s": args.budget_s,
        "device": dev,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "nvidia_dali": _version("nvidia-dali-cuda130"),
            "av": _version("av"),
        },
        "parts": {p: {"status": "pending"} for p in ["build", *parts]},
    }
    write_json(out, doc)
    print(f"avmt GPU check: {dev['name']}{' (dry run)' if args.dry_run else ''}; writing {out}", flush=True)
    doc["parts"]["build"] = ensure_built(args.no_build)
    write_json(out, doc)
    _say("build", doc["parts"]["build"], t0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in parts:
            left = args.budget_s - (time.time() - t0)
            if left < MIN_PART_S:
                doc["parts"][name] = {"status": "skipped", "reason": f"budget: {max(0.0, left):.0f} s of {args.budget_s} s left"}
            else:
                started = time.time()
                doc["parts"][name] = {"status": "running", "started": datetime.now(UTC).isoformat(timespec="seconds")}
                write_json(out, doc)
                result = spawn(name, args.dry_run, min(CAPS_S[name], left), Path(tmp) / f"{name}.json")
                doc["parts"][name] = {**result, "seconds": round(time.time() - started, 1)}
            doc["total_s"] = round(time.time() - t0, 1)
            write_json(out, doc)
            _say(name, doc["parts"][name], t0)
    counts = {s: sum(p["status"] == s for p in doc["parts"].values()) for s in ("passed", "failed", "timeout", "skipped")}
    print(f"wrote {out} ({doc['total_s']} s)")
    print(f"gpu-check: {counts['passed']} passed, {counts['failed'] + counts['timeout']} failed, {counts['skipped']} skipped")
    return 1 if counts["failed"] or counts["timeout"] else 0


def _say(name: str, result: dict[str, Any], t0: float) -> None:
    why = f": {result['reason']}" if result.get("reason") else ""
    print(f"[{time.time() - t0:6.1f} s] {name:14s} {result['status']}{why}", flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget-s", type=float, default=480, help="time for the whole check, build included (default 480)")
    p.add_argument("--out", help="result JSON (default: benchmarks/results/gpu-<device>-<date>.json)")
    p.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default: all, in that order)")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny shapes (CI)")
    p.add_argument("--no-build", action="store_true", help="never run pip; fail the build step if avmt is not built")
    p.add_argument("--commit", help="the commit to record (default: git rev-parse HEAD of the checkout)")


def main(argv: list[str] | None = None) -> int:
    """Entry of a part's process (``--child``); the check itself runs through ``python -m avmt.bench gpu``."""
    p = argparse.ArgumentParser(prog="python -m avmt.bench.gpu")
    p.add_argument("--child", choices=PARTS, required=True)
    p.add_argument("--part-file", type=Path, required=True)
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    # Its own session (so that a timeout can kill the part's whole group) also means no signal from the parent's
    # terminal: the kernel ends the part when the orchestrator dies, and a part whose orchestrator is already gone
    # (killed before this line) does not start.
    from avmt.workers import die_with_parent

    die_with_parent()
    parent = os.environ.get("AVMT_GPU_CHECK_PARENT")
    if parent is not None and os.getppid() != int(parent):
        return 1
    return run_child(a.child, a.dry_run, a.deadline, a.part_file)


if __name__ == "__main__":
    sys.exit(main())
