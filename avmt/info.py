"""What this machine offers avmt: ``python -m avmt.info [--json]``.

Prints the versions of Python, torch, CUDA, Triton and DALI that are present, for every op with more
than one possible implementation which backend runs here and why the others do not, and which data
loader ``data.loader=auto`` builds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

import avmt
from avmt import backends


@dataclass(frozen=True)
class BackendStatus:
    """One implementation of an op: whether it can run here and, if not, why."""

    name: str
    available: bool
    reason: str


@dataclass(frozen=True)
class OpStatus:
    op: str
    selected: str
    backends: tuple[BackendStatus, ...]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions and devices as a flat dict (None where a component is absent)."""
    cuda = torch.cuda.is_available()
    dali = next((v for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali") if (v := _version(d))), None)
    return {
        "avmt": avmt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda or "none (CPU build)",
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "triton": _version("triton"),
        "nvidia_dali": dali,
        "numpy": _version("numpy"),
        "avmt._C": backends.extension_summary(),
    }


_OP_TITLES = {
    "sample_negatives": "sample_negatives  (avmt.sampling)",
    "lowrank": "lowrank_linear  (U·R_m·normalize(V_mᵀx)+b, avmt.kernels.lowrank_maps; model.kernel=auto picks)",
}


def op_statuses() -> list[OpStatus]:
    """Per op, every implementation avmt has and whether it runs here (:func:`avmt.backends.op_table`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [
        OpStatus(
            op=f"{_OP_TITLES[op]}, for {device} tensors",
            selected=selected,
            backends=tuple(BackendStatus(name, ok, why) for name, (ok, why) in status.items()),
        )
        for op, selected, status in backends.op_table(device)
    ]


def loader_choice() -> OpStatus:
    """Which data loader ``data.loader=auto`` builds here (for the device training would use), and why not the other."""
    from avmt.data.loader import loader_status, select_loader

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return OpStatus(
        op=f"data loader  (data.loader, avmt.data.loader, batches for {device})",
        selected=select_loader("auto", device),
        backends=tuple(BackendStatus(name, ok, why) for name, (ok, why) in loader_status(device).items()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avmt.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    env, ops, loader = environment(), op_statuses(), loader_choice()
    if args.json:
        print(json.dumps({"environment": env, "ops": [asdict(o) for o in ops], "data_loader": asdict(loader)}, indent=2))
        return 0
    print("avmt environment")
    width = max(map(len, env))
    for key, value in env.items():
        shown = ", ".join(value) if isinstance(value, list) else ("not installed" if value is None else value)
        print(f"  {key.ljust(width)}  {shown if shown != '' else 'none'}")
    print("ops (backend that runs here, then every backend and why)")
    for o in ops:
        print(f"  {o.op}\n    selected: {o.selected}")
        for b in o.backends:
            print(f"    - {b.name}: {'available' if b.available else 'unavailable'} ({b.reason})")
    print(f"{loader.op}\n    selected by data.loader=auto: {loader.selected}")
    for b in loader.backends:
        print(f"    - {b.name}: {'available' if b.available else 'unavailable'} ({b.reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
