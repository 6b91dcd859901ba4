"""Content-aware negative sampling (CANS, docs/method.md §4): ``sample_negatives`` and its PyTorch reference.

For anchor ``i`` the candidates are the pool rows ``j != anchor_index[i]`` (in mode ``sequence``, only those
with ``group[j] == anchor_group[i]``). Then, per mode:

- ``similar`` (CANS-Similar): weight ``1 - d̂``; ``dissimilar`` (CANS-Dissimilar): weight ``d̂``, where
  ``d̂`` is the l2 distance normalised to [0, 1] over the anchor's candidates (0.5 if they are all equal),
  and the ``floor(trim * n)`` nearest and farthest of the ``n`` candidates are dropped first (order:
  distance, then pool index);
- ``uniform`` (Current-MiniBatch) and ``sequence`` (Current-Sequence): weight 1, no trimming.

``k`` candidates are drawn without replacement with probability proportional to the weights (Gumbel-top-k).
The Gumbel noise of (anchor row, candidate) comes from a counter-based hash of a 64-bit seed drawn from
``generator``, so the reference, the C++ and the CUDA op select the same indices for the same seed.

**Fewer than k candidates.** A row whose selectable candidates (after the anchor, the group filter, the
trim and zero weights are removed) number fewer than ``k`` returns all of them, and ``-1`` in the remaining
slots. Never the anchor itself, never an out-of-range index: callers mask ``-1``.

**Checks.** Shapes, dtypes and devices are always checked. The checks that read values (finite embeddings in the
content-aware modes, ``anchor_index`` in range) run for CPU tensors only: on a GPU each would stall the stream
until the device catches up. There, out-of-range values and NaN/inf cannot make the CUDA op read or write out of
bounds, but the indices it returns for such rows are unspecified (a NaN embedding makes the loss NaN anyway, which
the training loop counts and skips).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import Tensor

from avmt import backends

Mode = Literal["similar", "dissimilar", "uniform", "sequence"]
Backend = backends.SamplingBackend
MODES: dict[str, int] = {"similar": 0, "dissimilar": 1, "uniform": 2, "sequence": 3}  # csrc/sampling.h SampleMode
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_M32 = 0xFFFFFFFF


# -- the reference: the specification every backend must match ---------------------------------------------------
def _mix32(x: Tensor) -> Tensor:
    """csrc/sampling.h mix32 on int64 tensors holding uint32 values (products wrap; only the low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seed: int, rows: Tensor, cols: Tensor) -> Tensor:
    """Gumbel(0,1) noise [len(rows), len(cols)] float64 for (seed, row, candidate), as csrc/sampling.h computes it."""
    seed_lo, seed_hi = torch.tensor(seed & _M32), torch.tensor((seed >> 32) & _M32)
    key = _mix32(seed_lo ^ _mix32(seed_hi ^ _mix32(rows.long() ^ 0x68E31DA4)))
    h = _mix32(key[:, None] ^ _mix32((cols.long() + 0x9E3779B9) & _M32)[None, :])
    u = ((h >> 8).double() + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(u))


def sample_negatives_reference(
    anchors: Tensor,
    pool: Tensor,
    k: int,
    mode: int,
    trim: float,
    anchor_index: Tensor,
    anchor_group: Tensor,
    pool_group: Tensor,
    seed: int,
) -> Tensor:
    """Plain PyTorch version of the op (same arguments as ``torch.ops.avmt.sample_negatives``). Builds [Na, Np]."""
    na, np_ = anchors.shape[0], pool.shape[0]
    device = anchors.device
    cols = torch.arange(np_, device=device)
    valid = cols[None, :] != anchor_index[:, None]
    if mode == MODES["sequence"]:
        valid &= pool_group[None, :] == anchor_group[:, None]
    if mode in (MODES["similar"], MODES["dissimilar"]):
        a, p = anchors.float(), pool.float()
        d2 = torch.addmm(a.square().sum(1, keepdim=True) + p.square().sum(1)[None, :], a, p.t(), beta=1, alpha=-2)
        d = torch.where(d2 > 0, d2.clamp_min(0).sqrt(), torch.zeros_like(d2))
        n = valid.sum(1)
        t = torch.floor(trim * n.double()).long()
        # rank of each candidate in (distance, index) order; stable sort keeps equal distances in index order
        order = torch.sort(d.masked_fill(~valid, math.inf), dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, cols.expand(na, -1).contiguous())
        kept = valid & (rank >= t[:, None]) & (rank < (n - t)[:, None])
        dmin = d.masked_fill(~valid, math.inf).amin(1, keepdim=True)
        dmax = d.masked_fill(~valid, -math.inf).amax(1, keepdim=True)
        span = dmax.double() - dmin.double()
        d_hat = torch.where(dmax > dmin, (d.double() - dmin.double()) / span.clamp_min(1e-300), torch.full_like(span, 0.5))
        weight = 1.0 - d_hat if mode == MODES["similar"] else d_hat
    else:
        kept = valid
        weight = torch.ones(na, np_, dtype=torch.float64, device=device)
    noise = gumbel_noise(seed, torch.arange(na, device=device), cols)
    keys = (weight.log() + noise).float()  # the float keys every backend sorts by
    keys = keys.masked_fill(~kept | (weight <= 0), -math.inf)
    sorted_keys, idx = torch.sort(keys, dim=1, descending=True, stable=True)  # ties: smaller index first
    take = min(k, np_)
    out = torch.where(sorted_keys[:, :take] > -math.inf, idx[:, :take], torch.full_like(idx[:, :take], -1))
    if take < k:
        out = torch.cat([out, out.new_full((na, k - take), -1)], dim=1)
    return out


# -- registration: fake (shape) implementation so the op traces under torch.compile ----------------------------------
if backends.C is not None:  # importing avmt._C (in avmt.backends) registered torch.ops.avmt.*

    @torch.library.register_fake("avmt::sample_negatives")
    def _(anchors, pool, k, mode, trim, anchor_index, anchor_group, pool_group, seed):
        torch._check(anchors.shape[1] == pool.shape[1])
        return anchors.new_empty((anchors.shape[0], k), dtype=torch.long)


def _seed(generator: torch.Generator | None) -> int:
    hi, lo = torch.randint(0, 2**31, (2,), generator=generator).tolist()  # a CPU generator (or the global RNG)
    return (hi << 31) | lo


def sample_negatives(
    anchors: Tensor,
    pool: Tensor,
    k: int,
    *,
    mode: Mode = "similar",
    trim: float = 0.025,
    anchor_index: Tensor | None = None,
    group: Tensor | None = None,
    anchor_group: Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Draw ``k`` negatives per anchor from ``pool``; returns int64 ``[Na, k]`` pool indices (``-1`` = none left).

    Args:
        anchors: ``[Na, D]`` float32/bfloat16/float16 anchor embeddings.
        pool: ``[Np, D]`` candidate embeddings, same dtype and device as ``anchors``.
        k: negatives per anchor (> 0).
        mode: ``similar`` | ``dissimilar`` | ``uniform`` | ``sequence`` (see the module docstring).
        trim: fraction dropped at each end of an anchor's distance order, in [0, 0.5) (content-aware modes).
        anchor_index: int64 ``[Na]``, the anchor's own row in ``pool`` (never returned); None if not in the pool.
        group: int64 ``[Np]``, the sequence of each pool row; required by mode ``sequence``.
        anchor_group: int64 ``[Na]``, each anchor's sequence; defaults to ``group[anchor_index]``.
        generator: a CPU ``torch.Generator`` for the seed; the same generator state gives the same indices.
        backend: ``auto`` (CUDA op for CUDA tensors, C++ op for CPU tensors, else the reference with a warning),
            or one of ``reference``, ``cpp``, ``cuda`` (an error if it cannot run here).
    """
    _validate(anchors, pool, k, mode, trim, anchor_index, group, anchor_group)
    if anchors.device.type == "cpu":  # on a GPU, reading values back would stall the stream (see the docstring)
        _validate_values(anchors, pool, mode, anchor_index, anchor_group)
    na, np_ = anchors.shape[0], pool.shape[0]
    device = anchors.device
    if anchor_index is None:
        anchor_index = torch.full((na,), -1, dtype=torch.long, device=device)
    if mode == "sequence":
        if anchor_group is None:
            anchor_group = group[anchor_index]
    else:
        anchor_group = torch.zeros(na, dtype=torch.long, device=device)
        group = torch.zeros(np_, dtype=torch.long, device=device)
    name = backends.select_sampling(device, backend)
    if backend == "auto" and name == "reference" and backends.C is None:
        warnings.warn(f"sample_negatives runs the slow PyTorch reference: {backends.C_ERROR}", stacklevel=2)
    args = (anchors, pool, k, MODES[mode], float(trim), anchor_index, anchor_group, group, _seed(generator))
    if name == "reference":
        return sample_negatives_reference(*args)
    return torch.ops.avmt.sample_negatives(*args)


def _validate(anchors, pool, k, mode, trim, anchor_index, group, anchor_group) -> None:
    if not isinstance(anchors, Tensor) or not isinstance(pool, Tensor):
        raise TypeError("anchors and pool must be tensors")
    if anchors.dim() != 2 or pool.dim() != 2:
        raise ValueError(f"anchors must be [Na, D] and pool [Np, D], got {tuple(anchors.shape)} and {tuple(pool.shape)}")
    if anchors.shape[1] != pool.shape[1]:
        raise ValueError(f"anchors and pool need the same D, got {anchors.shape[1]} and {pool.shape[1]}")
    if anchors.dtype not in FLOAT_DTYPES or pool.dtype != anchors.dtype:
        raise ValueError(f"anchors and pool must share one dtype of float32/bfloat16/float16, got {anchors.dtype} and {pool.dtype}")
    if anchors.device != pool.device:
        raise ValueError(f"anchors and pool must be on one device, got {anchors.device} and {pool.device}")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if pool.shape[0] == 0:
        raise ValueError("the pool is empty: there is nothing to sample negatives from")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: expected one of {', '.join(MODES)}")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim={trim!r} is invalid: expected a fraction in [0, 0.5)")
    for name, t, n in (
        ("anchor_index", anchor_index, anchors.shape[0]),
        ("group", group, pool.shape[0]),
        ("anchor_group", anchor_group, anchors.shape[0]),
    ):
        if t is None:
            continue
        if t.dtype != torch.long or t.shape != (n,) or t.device != anchors.device:
            raise ValueError(
                f"{name} must be an int64 tensor of shape [{n}] on {anchors.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if mode == "sequence":
        if group is None:
            raise ValueError("mode='sequence' needs group (the sequence id of every pool row)")
        if anchor_group is None and anchor_index is None:
            raise ValueError("mode='sequence' needs anchor_group, or anchor_index of every anchor to read it from group")


def _validate_values(anchors, pool, mode, anchor_index, anchor_group) -> None:
    """The checks that read tensor values: run for CPU tensors only (each is a device sync on a GPU)."""
    if mode in ("similar", "dissimilar") and not (torch.isfinite(anchors).all() and torch.isfinite(pool).all()):
        raise ValueError("anchors or pool hold NaN/inf: distances would be meaningless")
    if anchor_index is not None and anchor_index.numel() and (anchor_index.min() < -1 or anchor_index.max() >= pool.shape[0]):
        raise ValueError(f"anchor_index values must be in [-1, {pool.shape[0]}) (-1: the anchor is not in the pool)")
    if mode == "sequence" and anchor_group is None and bool((anchor_index < 0).any()):
        raise ValueError("mode='sequence' needs anchor_group, or anchor_index of every anchor to read it from group")
