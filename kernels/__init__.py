"""Fused ops of avmt (importable as ``avmt.kernels``; the sources live in ``kernels/`` at the repo root).

:func:`lowrank_maps` is the one entry point the model calls for the low-rank map: it asks
:func:`avmt.backends.select_lowrank` which backend runs and calls either the fused Triton kernels
(:mod:`avmt.kernels.lowrank_linear`, imported only then) or :func:`lowrank_reference`, the plain PyTorch map that
is the source of truth the kernels are tested against. Importing this package never imports Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from avmt.backends import select_lowrank

Backward = Literal["triton", "torch"]
BACKWARDS: tuple[str, ...] = ("triton", "torch")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the map computes in: autocast's dtype inside an autocast region (as the reference's matmuls
    would), else x's own dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lowrank_reference(x: Tensor, V: Tensor, R: Tensor, U: Tensor, b: Tensor, *, gelu: bool = False, eps: float = 1e-6) -> Tensor:
    """``act(U · R · normalize(Vᵀ x) + b)`` in plain PyTorch for one modality group.

    x ``[..., N]``; V ``[N, O]``, R ``[O, O]`` (this group's), U ``[M, O]``, b ``[M]`` -> ``[..., M]`` (autocast
    applies as to any matmul)."""
    z = F.normalize(x @ V, dim=-1, eps=eps)
    y = F.linear(z @ R.transpose(0, 1), U, b)
    return F.gelu(y) if gelu else y


def lowrank_maps(
    x: Tensor,
    Vs: Sequence[Tensor],
    Rs: Sequence[Tensor],
    Us: Sequence[Tensor],
    bs: Sequence[Tensor],
    *,
    group: int,
    gelu: bool = False,
    eps: float = 1e-6,
    kernel: str = "auto",
    backward: Backward = "triton",
) -> list[Tensor]:
    """``P`` (1 to 3) low-rank maps of the same ``x`` for modality ``group``; returns ``P`` tensors ``[..., M]``.

    Args:
        x: ``[..., N]`` float tensor.
        Vs, Rs, Us, bs: per map ``V [G, N, O]``, ``R [G, O, O]`` (orthogonal), ``U [M, O]``, ``b [M]``; parameters go
            in as they are (fp32 under autocast): the Triton kernels cast them on load.
        kernel: ``auto`` | ``triton`` | ``reference`` (:func:`avmt.backends.select_lowrank`).
        backward: backward of the Triton path: ``triton`` (fused kernels) or ``torch`` (fp32 torch matmuls).
    Several maps run in one Triton launch that reads ``x`` once per token block (Q, K, V); the reference loops.
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward={backward!r} is invalid: expected one of {', '.join(BACKWARDS)}")
    dtype = compute_dtype(x)
    if select_lowrank(x.device, kernel, dtype) == "triton":
        from avmt.kernels.lowrank_linear import lowrank_linear_multi

        # only the activations are cast, as autocast's matmuls would cast them
        return lowrank_linear_multi(x.to(dtype), Vs, Rs, Us, bs, group=group, gelu=gelu, eps=eps, backward=backward)
    return [lowrank_reference(x, V[group], R[group], U, b, gelu=gelu, eps=eps) for V, R, U, b in zip(Vs, Rs, Us, bs)]
