"""Compile the low-rank Triton kernels for a GPU target *without a GPU* and report their resource use.

    python benchmarks/compile_lowrank.py [--arch 90] [--json benchmarks/results/lowrank-compile-sm90.json]

Triton lowers a kernel to PTX and ptxas (bundled with the triton wheel) assembles the cubin without a driver, so
this runs on the CPU-only machines. For each kernel at the paper's block sizes (O = 128) it prints registers,
stack (spill) bytes per thread from ``cuobjdump -res-usage`` and Triton's shared memory. It proves the kernels
lower for that architecture and shows spills or shared memory over the SM limit (227 KB on sm_90) before a GPU
run would; it says nothing about correctness or speed on a GPU. It is a script, not a test: one configuration
takes seconds to a minute of CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # must be off before triton is imported: the interpreter cannot compile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

import avmt.kernels.lowrank_linear as kl

PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
WEIGHTS = {f"{k}{i}": "*fp32" for k in "vrub" for i in range(3)}  # fp32 parameters, cast on load (autocast)


def _jobs(dt: str) -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """(name, kernel, pointer types, constexprs, num_warps) as the launchers use them on CUDA for compute dtype dt."""
    c, ieee = PTR[dt], dt == "fp32"
    bt, bk, bo, bm = kl._block_sizes(768, 768, 128, _Cuda())
    bbt, bbo, bbm, bbn = kl._bwd_block_sizes(768, 768, 128, _Cuda())
    jobs = []
    for gelu in (False, True):
        jobs.append(
            (
                f"fwd gelu={int(gelu)}",
                kl._lowrank_fwd_kernel,
                dict(x_ptr=c, y_ptr=c, z_ptr="*fp32", n_ptr="*fp32", table_ptr="*i32", **WEIGHTS),
                dict(GELU=gelu, IEEE=ieee, BT=bt, BK=bk, BO=bo, BM=bm),
                8,
            )
        )
        for fuse in (True, False):
            jobs.append(
                (
                    f"bwd_dx gelu={int(gelu)} fuse_dx={int(fuse)}",
                    kl._lowrank_bwd_dx_kernel,
                    dict(dy_ptr=c, z_ptr="*fp32", n_ptr="*fp32", dx_ptr=c, w_ptr=c, dw_ptr=c, dq_ptr=c, table_ptr="*i32", **WEIGHTS),
                    dict(GELU=gelu, IEEE=ieee, FUSE_DX=fuse, BT=bbt, BO=bbo, BM=bbm, BN=bbn),
                    8,
                )
            )
        jobs.append(
            (
                f"bwd_du gelu={int(gelu)}",
                kl._lowrank_bwd_du_kernel,
                dict(dy_ptr=c, w_ptr=c, du_ptr="*fp32", db_ptr="*fp32", **WEIGHTS),
                dict(GELU=gelu, IEEE=ieee, BT=bbt, BO=bbo, BM=bbm),
                8,
            )
        )
    jobs.append(
        (
            "bwd_dxsum P=3",
            kl._lowrank_bwd_dxsum_kernel,
            dict(dq_ptr=c, dx_ptr=c, table_ptr="*i32", **WEIGHTS),
            dict(P=3, IEEE=ieee, BT=bbt, BO=bbo, BN=min(bbn, 32)),
            4,
        )
    )
    return jobs


class _Cuda:
    """Stands in for a CUDA torch.device in the block-size helpers (they only read ``.type``)."""

    type = "cuda"


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", line)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (90 = H100/H200)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="compute dtypes, comma-separated (bf16, fp16, fp32)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    rows = []
    for dt in args.dtypes.split(","):
        for name, fn, ptrs, consts, warps in _jobs(dt):
            sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a == "eps" else "i32") for a in fn.arg_names}
            t0 = time.time()
            k = triton_compile(ASTSource(fn, sig, constexprs=consts), target=target, options={"num_warps": warps})
            row = dict(
                kernel=name,
                dtype=dt,
                num_warps=warps,
                shared_bytes=k.metadata.shared,
                **_resource_usage(k.asm["cubin"]),
                compile_s=round(time.time() - t0, 1),
            )
            rows.append(row)
            print(f"{dt:5s} {name:32s} regs {row['reg']:3d}  stack {row['stack']:6d} B  shared {row['shared_bytes']:7d} B", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    what="Triton kernels compiled for a GPU target without a GPU (nothing was run)",
                    target=f"sm_{args.arch}",
                    triton=triton.__version__,
                    date=datetime.date.today().isoformat(),
                    command=" ".join([os.path.basename(sys.executable), *sys.argv]),
                    kernels=rows,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
