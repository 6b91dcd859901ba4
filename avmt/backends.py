"""Which implementation of each op runs, and why the others cannot: the one place that decides.

avmt has two ops with more than one implementation:

- ``sample_negatives`` (:mod:`avmt.sampling`): the CUDA op, the C++ CPU op (both in the compiled ``avmt._C``), and
  the plain PyTorch reference;
- ``lowrank`` (the low-rank map ``U·R_m·normalize(V_mᵀx)+b``, :func:`avmt.kernels.lowrank_maps`): the fused Triton
  kernels and the plain PyTorch reference.

``*_status(device)`` returns ``{backend: (can run, why)}`` for tensors on ``device``; ``select_*`` returns the backend
that runs, raising with the reason when an explicitly requested one cannot (never a silent fallback).
``python -m avmt.info`` prints :func:`op_table`. Importing this module never imports Triton.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Literal

import torch

# -- the compiled extension avmt._C ------------------------------------------------------------------------------------


def _load_extension() -> tuple[ModuleType | None, str | None]:
    try:  # the compiled ops register torch.ops.avmt.* on import
        return importlib.import_module("avmt._C"), None
    except ImportError as e:  # a source checkout without `pip install --no-build-isolation -e .`
        return None, f"avmt._C is not built ({e}); run `pip install --no-build-isolation -e .`"


C, C_ERROR = _load_extension()


def extension_summary() -> str:
    """One line: whether ``avmt._C`` is built, with CUDA ops or not, and what it was built with."""
    if C is None:
        return C_ERROR or "not built"
    built = getattr(C, "build_torch", "?")
    if not C.cuda_built:
        return f"built (C++ CPU ops only; torch {built})"
    return f"built with CUDA ops (CUDA {C.build_cuda}, archs {C.build_archs}; torch {built})"


# -- sample_negatives ----------------------------------------------------------------------------------------------------

SamplingBackend = Literal["auto", "reference", "cpp", "cuda"]
SAMPLING_BACKENDS: tuple[str, ...] = ("auto", "reference", "cpp", "cuda")


def sampling_status(device: torch.device | str = "cpu") -> dict[str, tuple[bool, str]]:
    """{backend: (available for tensors on ``device``, why)} for ``sample_negatives``."""
    device = torch.device(device)
    status = {"reference": (True, "plain PyTorch, any device; materialises the [Na, Np] distance matrix")}
    if device.type == "cpu":
        status["cpp"] = (C is not None, "C++ op, parallel over anchors, tiled distances" if C is not None else C_ERROR)
        status["cuda"] = (False, "tensors are on the CPU")
        return status
    status["cpp"] = (False, f"tensors are on {device.type}; the C++ op takes CPU tensors")
    if C is None:
        status["cuda"] = (False, C_ERROR)
    elif not C.cuda_built:
        status["cuda"] = (False, "avmt._C was built without CUDA ops (CPU torch, no CUDA toolkit, or AVMT_NO_CUDA=1 at build time)")
    elif device.type != "cuda":
        status["cuda"] = (False, f"tensors are on {device.type}")
    else:
        status["cuda"] = (True, f"CUDA op (built for {C.build_archs}), tiled distances, per-row selection on chip")
    return status


def select_sampling(device: torch.device | str, backend: str = "auto") -> str:
    """The ``sample_negatives`` backend for tensors on ``device``: ``auto`` = cuda, else cpp, else the reference."""
    if backend not in SAMPLING_BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: expected one of {', '.join(SAMPLING_BACKENDS)}")
    status = sampling_status(device)
    if backend == "auto":
        return next((name for name in ("cuda", "cpp") if status[name][0]), "reference")
    ok, why = status[backend]
    if not ok:
        raise RuntimeError(f"sampling backend {backend!r} cannot run here: {why}")
    return backend


# -- lowrank -------------------------------------------------------------------------------------------------------------

LowrankKernel = Literal["auto", "triton", "reference"]
LOWRANK_KERNELS: tuple[str, ...] = ("auto", "triton", "reference")
LOWRANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_ERROR: list[str] = []  # [] until the first check, then [""] (imports) or [why not]


def _triton_error() -> str | None:
    """None if the fused module imports, else why not (cached after the first call)."""
    if not _TRITON_ERROR:
        try:
            importlib.import_module("avmt.kernels.lowrank_linear")
            _TRITON_ERROR.append("")
        except Exception as e:
            _TRITON_ERROR.append(f"importing triton failed: {type(e).__name__}: {e}")
    return _TRITON_ERROR[0] or None


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET=1 is set (it must be set before triton is first imported to take effect)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_incompatibility() -> str | None:
    """Why the Triton interpreter cannot run our kernels with the installed versions, or None. Triton 3.6's
    interpreter turns scalar arguments into Python ints with ``int()`` of a one-element array, which numpy 2.4
    refuses (seen with torch 2.11 + Triton 3.6 + numpy 2.4.6; numpy 2.3.5 works, as do Triton 3.7 and 3.8)."""
    import importlib.metadata as md

    def major_minor(dist: str) -> tuple[int, int]:
        try:
            return tuple(int(p) for p in md.version(dist).split(".")[:2])  # type: ignore[return-value]
        except (md.PackageNotFoundError, ValueError):
            return (0, 0)

    triton, numpy = major_minor("triton"), major_minor("numpy")
    if triton < (3, 7) and numpy >= (2, 4):
        return (
            f"the Triton {'.'.join(map(str, triton))} interpreter fails with numpy {'.'.join(map(str, numpy))} "
            "(int() of a one-element array): install numpy<2.4 or Triton>=3.7 to run the kernels on CPU"
        )
    return None


def lowrank_status(device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, tuple[bool, str]]:
    """For tensors on ``device`` (and of ``dtype``, if given): ``{"triton": (ok, why), "reference": (ok, why)}``."""
    device = torch.device(device)
    status = {"reference": (True, "plain PyTorch (avmt.kernels.lowrank_reference), every device: the source of truth")}
    err = _triton_error()
    if err is not None:
        status["triton"] = (False, err)
    elif dtype is not None and dtype not in LOWRANK_DTYPES:
        status["triton"] = (False, f"the Triton kernels take float32, bfloat16 or float16 tensors, got {dtype}")
    elif device.type == "cuda":
        status["triton"] = (True, "fused Triton kernels on CUDA tensors")
    elif device.type == "cpu" and interpreter_enabled():
        broken = _interpreter_incompatibility()
        status["triton"] = (False, broken) if broken else (True, "TRITON_INTERPRET=1: Triton interpreter on CPU tensors (slow, for tests)")
    else:
        status["triton"] = (False, f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device.type} tensors")
    return status


def select_lowrank(device: torch.device | str, kernel: str = "auto", dtype: torch.dtype | None = None) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device``. ``auto`` uses Triton only on CUDA (never the
    interpreter); an explicit ``triton`` that cannot run raises with the reason."""
    if kernel not in LOWRANK_KERNELS:
        raise ValueError(f"kernel={kernel!r} is invalid: expected one of {', '.join(LOWRANK_KERNELS)}")
    if kernel == "reference":
        return "reference"
    ok, why = lowrank_status(device, dtype)["triton"]
    if kernel == "auto":
        return "triton" if ok and torch.device(device).type == "cuda" else "reference"
    if not ok:
        raise RuntimeError(f"lowrank kernel 'triton' cannot run here: {why}")
    return "triton"


# -- the table python -m avmt.info prints ----------------------------------------------------------------------------------


def op_table(device: torch.device | str) -> list[tuple[str, str, dict[str, tuple[bool, str]]]]:
    """``[(op, selected backend, {backend: (ok, why)}), ...]`` for tensors on ``device``."""
    return [
        ("sample_negatives", select_sampling(device), sampling_status(device)),
        ("lowrank", select_lowrank(device, "auto"), lowrank_status(device)),
    ]
