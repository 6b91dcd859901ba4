"""Triton kernels of avmt (importable as ``avmt.kernels``; the sources live in ``kernels/`` at the repo root).

Importing this package never imports Triton; :func:`backend_status` says whether the fused kernels can run
for tensors on a given device, and :func:`select_backend` picks one (raising when an explicitly requested
backend cannot run). The kernels themselves are in :mod:`avmt.kernels.lowrank_linear`.
"""

from __future__ import annotations

import importlib
import os
from typing import Literal

import torch

Kernel = Literal["auto", "triton", "reference"]
KERNELS: tuple[str, ...] = ("auto", "triton", "reference")


def _triton_error() -> str | None:
    """None if the fused module imports, else why not (cached after the first call)."""
    global _IMPORT_ERROR
    if _IMPORT_ERROR is None:
        try:
            importlib.import_module("avmt.kernels.lowrank_linear")
            _IMPORT_ERROR = ""
        except Exception as e:  # noqa: BLE001 - any import failure means "cannot run", reported verbatim
            _IMPORT_ERROR = f"importing triton failed: {type(e).__name__}: {e}"
    return _IMPORT_ERROR or None


_IMPORT_ERROR: str | None = None


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET=1 is set (it must be set before triton is first imported to take effect)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def backend_status(device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, tuple[bool, str]]:
    """For tensors on ``device`` (and of ``dtype``, if given): ``{"triton": (ok, why), "reference": (ok, why)}``."""
    device = torch.device(device)
    status = {"reference": (True, "plain PyTorch LowRankLinear, runs on every device (the source of truth)")}
    err = _triton_error()
    if err is not None:
        status["triton"] = (False, err)
    elif dtype is not None and dtype not in _KERNEL_DTYPES:
        status["triton"] = (False, f"the Triton kernels take float32, bfloat16 or float16 tensors, got {dtype}")
    elif device.type == "cuda":
        status["triton"] = (True, "fused Triton kernels on CUDA tensors")
    elif device.type == "cpu" and interpreter_enabled():
        status["triton"] = (True, "TRITON_INTERPRET=1: Triton interpreter on CPU tensors (slow, for tests)")
    else:
        status["triton"] = (False, f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device.type} tensors")
    return status


def select_backend(device: torch.device | str, kernel: str = "auto", dtype: torch.dtype | None = None) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device``. ``auto`` uses Triton only on CUDA; an explicit
    ``triton`` that cannot run raises with the reason."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is invalid: expected one of {', '.join(KERNELS)}")
    if kernel == "reference":
        return "reference"
    ok, why = backend_status(device, dtype)["triton"]
    if kernel == "auto":
        return "triton" if ok and torch.device(device).type == "cuda" else "reference"
    if not ok:
        raise RuntimeError(f"lowrank kernel 'triton' cannot run here: {why}")
    return "triton"
