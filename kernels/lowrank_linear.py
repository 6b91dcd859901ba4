"""Fused low-rank map ``y = act(U · R_m · normalize(V_mᵀ x) + b)`` (docs/method.md §2) in Triton, forward and backward.

One forward launch covers:

- ``P`` maps that read the same ``x`` (``P = 3`` for the attention Q, K, V projections, ``P = 1`` otherwise);
- several modality *segments*: contiguous token ranges, each with its own group ``m`` (its ``V_m`` and ``R_m``).

The ``P`` maps' weights are passed as separate tensors (up to three pointer slots, picked by the map index inside
the kernel), never stacked: stacking copied every weight on every call. Weights may be float32 while ``x`` is
bfloat16/float16 (fp32 parameters under autocast): the kernels cast them on load, so no per-call cast copies
either.

Forward kernel (per program: one block of ``BT`` tokens of one segment, one map ``p``, one part of ``M``):

1. ``z = x[BT, N] @ V[p, m][N, O]`` accumulated in fp32 over ``BK``-wide slices of ``N``;
2. the row norm, ``z / max(||z||, eps)``, and the rotation ``w = z @ R[p, m]ᵀ`` on the ``[BT, O]`` tile in fp32;
3. a loop over this program's part of ``M`` in ``BM``-wide slices: ``y = act(w @ U[p]ᵀ + b[p])`` written out.

The ``O``-wide intermediate never leaves the chip. ``M`` is split over several programs only when the (token
block, map) grid alone would leave SMs idle (:func:`_m_splits`); each split recomputes steps 1-2, so ``x`` is
read once per (token block, map, split). The block table (which token block belongs to which segment and group)
is built on the host and cached per layout and device (:func:`block_table`), so a call does not copy or wait. ``z`` (fp32,
normalised) and the row norms are written as side outputs only for the backward pass (``O`` is 6-24× smaller
than ``N``/``M`` at paper shapes).

Backward (``backward="triton"``, the default), a mix of two Triton kernels and cuBLAS:

- ``_lowrank_bwd_dx_kernel`` (Triton), per token block of one segment and one map: recompute ``w = z R_mᵀ`` from
  the saved ``z``; loop over ``M``: ``dpre = dy · GELU'(w Uᵀ + b)`` (pre-activation recomputed, O-deep, instead
  of stored, M-wide), ``dw += dpre U``; then ``dz = dw R_m``, the ``normalize()`` Jacobian
  ``dq = (dz - z (z·dz)) / ||q||`` (``dz / eps`` on clamped rows, as the forward clamps), and for a single map
  ``dx = dq V_mᵀ`` slice by slice of ``N`` from the dq still on chip. ``dpre`` (M wide) never reaches memory;
  ``w``, ``dw``, ``dq`` (O wide) are written once for the weight gradients.
- ``_lowrank_bwd_dxsum_kernel`` (Triton), only for Q/K/V (``P = 3``): ``dx = Σ_p dq_p V_pᵀ`` from the written dq
  (see its docstring for why this is not inside the dx kernel).
- ``_lowrank_bwd_du_kernel`` (Triton): ``dU = dpreᵀ w`` and ``db = Σ dpre`` over all tokens (``U``, ``b`` are
  shared by every group, so segments do not matter here), with ``dpre`` recomputed from ``dy`` and ``w`` once
  more so that it is never materialised; two-stage: per token chunk partial sums, then a torch sum.
- cuBLAS (torch matmuls in the compute dtype, summed in fp32): ``dV[p, m] = x_segᵀ dq_seg`` and
  ``dR[p, m] = dw_segᵀ z_seg`` per segment. These
  are long-K reductions over tokens into small outputs, which cuBLAS's split-K GEMMs already do well; a Triton
  version would only repeat them. The gradient of ``R_m`` flows on to ``A_m`` through ``torch.matrix_exp``'s own
  autograd, because ``R`` is an input.

``backward="torch"`` keeps the previous backward (all fp32 torch matmuls per segment, :func:`_backward_torch`) as
the plain PyTorch reference beside the kernels; the tests compare both against float64.

The ops are registered with ``torch.library.triton_op`` (``avmt::lowrank_fused`` forward,
``avmt::lowrank_fused_bwd`` for the Triton half of the backward) so ``torch.compile`` can trace them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton
from triton.runtime.jit import JITFunction

from avmt.kernels import BACKWARDS, Backward

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MAX_MAPS = 3  # pointer slots of the kernels: Q, K, V


@triton.jit
def _block_row(table_ptr, blk):
    """Row ``blk`` of the host-built block table: (first token, one past the segment's last token, group). Token
    indices come back as int64, so that every ``rows * stride`` offset is 64-bit (int32 overflows near 700K tokens
    of an FFN map)."""
    start = tl.load(table_ptr + 3 * blk).to(tl.int64)
    end = tl.load(table_ptr + 3 * blk + 1).to(tl.int64)
    g = tl.load(table_ptr + 3 * blk + 2)
    return start, end, g


@triton.jit
def _pick(p, a, b, c):
    """The ``p``-th of three pointers (``p`` a runtime or constexpr map index)."""
    if p == 0:
        ptr = a
    elif p == 1:
        ptr = b
    else:
        ptr = c
    return ptr


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, DT: tl.constexpr):
    """``a @ b`` with fp32 accumulation: IEEE fp32 for fp32 compute (no TF32, so the fused path stays within 2x of
    the fp32 reference), else both operands in the compute dtype ``DT`` (bf16/fp16 tensor cores)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _rot(a, b, IEEE: tl.constexpr):
    """``a @ b`` for the O x O rotation steps, fp32 operands: IEEE for fp32 compute; TF32 tensor cores for bf16/fp16
    compute, where the reference's own rotation matmul runs in bf16/fp16 under autocast (TF32 keeps more bits).
    An IEEE (FMA) dot of a [BT, 128] by [128, 128] fp32 tile spills kilobytes of registers per thread on sm_90
    (cuobjdump of the cubin compiled here without a GPU); TF32 does not."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _gelu_grad_tl(pre):
    """d/dpre of the erf GELU (fp32)."""
    cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
    pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327
    return cdf + pre * pdf


@triton.jit
def _lowrank_fwd_kernel(
    x_ptr,
    v0,
    v1,
    v2,
    r0,
    r1,
    r2,
    u0,
    u1,
    u2,
    b0,
    b1,
    b2,
    y_ptr,
    z_ptr,
    n_ptr,
    table_ptr,
    T,
    N,
    M,
    O,
    eps,
    s_xt,
    s_xn,
    s_vg,
    s_vn,
    s_vo,
    s_rg,
    s_ri,
    s_rj,
    s_um,
    s_uo,
    s_bm,
    s_yp,
    s_yt,
    s_ym,
    s_zp,
    s_zt,
    s_zo,
    s_np,
    M_PER,
    GELU: tl.constexpr,
    IEEE: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BO: tl.constexpr,
    BM: tl.constexpr,
):
    blk = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)  # this program writes y[:, split * M_PER : (split + 1) * M_PER]
    DT = x_ptr.dtype.element_ty  # compute dtype; fp32 weights are cast to it on load (no per-call cast copies)
    start, end, g = _block_row(table_ptr, blk)
    v_base = _pick(p, v0, v1, v2) + g * s_vg
    r_base = _pick(p, r0, r1, r2) + g * s_rg
    u_base = _pick(p, u0, u1, u2)
    b_base = _pick(p, b0, b1, b2)

    rows = start + tl.arange(0, BT)
    rmask = rows < end
    offs_o = tl.arange(0, BO)
    omask = offs_o < O  # O is padded up to BO (a power of two >= 16, tl.dot's minimum); padding loads as 0

    # 1. down-projection, fp32 accumulation
    acc = tl.zeros([BT, BO], dtype=tl.float32)
    for k0 in range(0, N, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < N
        xt = tl.load(x_ptr + rows[:, None] * s_xt + ks[None, :] * s_xn, mask=rmask[:, None] & kmask[None, :], other=0.0)
        vt = tl.load(v_base + ks[:, None] * s_vn + offs_o[None, :] * s_vo, mask=kmask[:, None] & omask[None, :], other=0.0)
        acc += _dot(xt, vt, IEEE, DT)

    # 2. row norm and rotation on chip (fp32; O x O is small next to N x O)
    norm = tl.sqrt(tl.sum(acc * acc, axis=1))
    z = acc / tl.maximum(norm, eps)[:, None]
    first = split == 0  # every split recomputes z; the first one writes it
    tl.store(z_ptr + p * s_zp + rows[:, None] * s_zt + offs_o[None, :] * s_zo, z, mask=(rmask & first)[:, None] & omask[None, :])
    tl.store(n_ptr + p * s_np + rows, norm, mask=rmask & first)
    # w = z @ R^T: load R transposed, rt[j, i] = R[i, j]
    rt = tl.load(r_base + offs_o[:, None] * s_rj + offs_o[None, :] * s_ri, mask=omask[:, None] & omask[None, :], other=0.0)
    w = _rot(z, rt.to(tl.float32), IEEE)
    w = w.to(DT)  # expansion runs in the compute dtype (bf16/fp16 tensor cores), fp32 accumulation

    # 3. expansion, bias, activation, slice by slice of this program's part of M
    for m0 in range(split * M_PER, tl.minimum(split * M_PER + M_PER, M), BM):
        ms = m0 + tl.arange(0, BM)
        mmask = ms < M
        ut = tl.load(u_base + offs_o[:, None] * s_uo + ms[None, :] * s_um, mask=omask[:, None] & mmask[None, :], other=0.0)
        y = _dot(w, ut, IEEE, DT)
        bias = tl.load(b_base + ms * s_bm, mask=mmask, other=0.0).to(tl.float32)
        y = y + bias[None, :]
        if GELU:  # exact (erf) GELU, as the reference F.gelu
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        tl.store(
            y_ptr + p * s_yp + rows[:, None] * s_yt + ms[None, :] * s_ym, y.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & mmask[None, :]
        )


@triton.jit
def _lowrank_bwd_dx_kernel(
    dy_ptr,
    z_ptr,
    n_ptr,
    v0,
    v1,
    v2,
    r0,
    r1,
    r2,
    u0,
    u1,
    u2,
    b0,
    b1,
    b2,
    dx_ptr,
    w_ptr,
    dw_ptr,
    dq_ptr,
    table_ptr,
    T,
    N,
    M,
    O,
    eps,
    s_dyp,
    s_dyt,
    s_dym,
    s_zp,
    s_zt,
    s_zo,
    s_np,
    s_vg,
    s_vn,
    s_vo,
    s_rg,
    s_ri,
    s_rj,
    s_um,
    s_uo,
    s_bm,
    s_dxt,
    s_dxn,
    s_wp,
    s_wt,
    s_wo,  # w, dw and dq share one [P, T, O] layout
    GELU: tl.constexpr,
    IEEE: tl.constexpr,
    FUSE_DX: tl.constexpr,
    BT: tl.constexpr,
    BO: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """One block of ``BT`` tokens of one segment, one map ``p``: dy -> (w, dw, dq) and, with ``FUSE_DX`` (a single
    map), dx = dq Vᵀ straight from the on-chip dq."""
    blk = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    DT = dx_ptr.dtype.element_ty  # compute dtype (x's)
    start, end, g = _block_row(table_ptr, blk)
    r_base = _pick(p, r0, r1, r2) + g * s_rg
    u_base = _pick(p, u0, u1, u2)
    b_base = _pick(p, b0, b1, b2)
    rows = start + tl.arange(0, BT)
    rmask = rows < end
    offs_o = tl.arange(0, BO)
    omask = offs_o < O
    tile = rmask[:, None] & omask[None, :]
    ro = p * s_wp + rows[:, None] * s_wt + offs_o[None, :] * s_wo

    z = tl.load(z_ptr + p * s_zp + rows[:, None] * s_zt + offs_o[None, :] * s_zo, mask=tile, other=0.0)
    nrm = tl.load(n_ptr + p * s_np + rows, mask=rmask, other=1.0)
    # R^T (rt[j, i] = R[i, j]): w = z R^T exactly as the forward computed it
    rt = tl.load(r_base + offs_o[:, None] * s_rj + offs_o[None, :] * s_ri, mask=omask[:, None] & omask[None, :], other=0.0).to(tl.float32)
    w = _rot(z, rt, IEEE).to(DT)
    tl.store(w_ptr + ro, w, mask=tile)  # for the dU reduction, in the dtype its dot consumes

    # dw = dpre @ U over M slices; dpre stays on chip
    dw = tl.zeros([BT, BO], dtype=tl.float32)
    for m0 in range(0, M, BM):
        ms = m0 + tl.arange(0, BM)
        mmask = ms < M
        dyt = tl.load(dy_ptr + p * s_dyp + rows[:, None] * s_dyt + ms[None, :] * s_dym, mask=rmask[:, None] & mmask[None, :], other=0.0).to(
            tl.float32
        )
        ut = tl.load(
            u_base + offs_o[:, None] * s_uo + ms[None, :] * s_um, mask=omask[:, None] & mmask[None, :], other=0.0
        )  # [BO, BM] = U[ms, :]^T
        if GELU:  # recompute the pre-activation (O-deep) rather than store it (M-wide)
            bias = tl.load(b_base + ms * s_bm, mask=mmask, other=0.0).to(tl.float32)
            pre = _dot(w, ut, IEEE, DT) + bias[None, :]
            dpre = dyt * _gelu_grad_tl(pre)
        else:
            dpre = dyt
        dw += _dot(dpre, tl.trans(ut), IEEE, DT)
    tl.store(dw_ptr + ro, dw.to(dw_ptr.dtype.element_ty), mask=tile)

    # back through the rotation (dz = dw R) and normalize(): q = V^T x, z = q / max(||q||, eps)
    # R reloaded (an L2 hit) instead of keeping the O x O tile live in registers across the M loop
    r = tl.load(r_base + offs_o[:, None] * s_ri + offs_o[None, :] * s_rj, mask=omask[:, None] & omask[None, :], other=0.0).to(tl.float32)
    dz = _rot(dw, r, IEEE)
    clamped = nrm <= eps
    zdz = tl.sum(z * dz, axis=1)
    dq = tl.where(clamped[:, None], dz / eps, (dz - z * zdz[:, None]) / tl.where(clamped, 1.0, nrm)[:, None])
    tl.store(dq_ptr + ro, dq.to(dq_ptr.dtype.element_ty), mask=tile)  # for dV = x^T dq (cuBLAS), and the dx sum over maps

    if FUSE_DX:  # one map: dx = dq V^T from the dq still on chip, slice by slice of N
        v_base = _pick(p, v0, v1, v2) + g * s_vg
        for n0 in range(0, N, BN):
            ns = n0 + tl.arange(0, BN)
            nmask = ns < N
            vt = tl.load(
                v_base + offs_o[:, None] * s_vo + ns[None, :] * s_vn, mask=omask[:, None] & nmask[None, :], other=0.0
            )  # [BO, BN] = V[ns, :]^T
            dxt = _dot(dq, vt, IEEE, DT)
            tl.store(dx_ptr + rows[:, None] * s_dxt + ns[None, :] * s_dxn, dxt.to(DT), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _lowrank_bwd_dxsum_kernel(
    dq_ptr,
    v0,
    v1,
    v2,
    dx_ptr,
    table_ptr,
    N,
    O,
    s_wp,
    s_wt,
    s_wo,
    s_vg,
    s_vn,
    s_vo,
    s_dxt,
    s_dxn,
    P: tl.constexpr,
    IEEE: tl.constexpr,
    BT: tl.constexpr,
    BO: tl.constexpr,
    BN: tl.constexpr,
):
    """``dx[rows, ns] = Σ_p dq_p V_p[m]ᵀ`` for several maps (Q, K, V) reading the same x: one token block by one
    ``BN`` slice of N per program. Splitting this from the dx kernel costs a reread of dq (O wide, just written,
    mostly from L2) but runs the maps' dq in parallel programs; the in-kernel loop over the maps spilled ~2 KB of
    registers per thread on sm_90 (cuobjdump, compiled here without a GPU)."""
    blk = tl.program_id(0)
    nb = tl.program_id(1)
    DT = dx_ptr.dtype.element_ty
    start, end, g = _block_row(table_ptr, blk)
    rows = start + tl.arange(0, BT)
    rmask = rows < end
    offs_o = tl.arange(0, BO)
    omask = offs_o < O
    ns = nb * BN + tl.arange(0, BN)
    nmask = ns < N
    acc = tl.zeros([BT, BN], dtype=tl.float32)
    for p in tl.static_range(P):  # small: a [BT, O] and an [O, BN] tile per map
        v_base = _pick(p, v0, v1, v2) + g * s_vg
        dq = tl.load(dq_ptr + p * s_wp + rows[:, None] * s_wt + offs_o[None, :] * s_wo, mask=rmask[:, None] & omask[None, :], other=0.0)
        vt = tl.load(v_base + offs_o[:, None] * s_vo + ns[None, :] * s_vn, mask=omask[:, None] & nmask[None, :], other=0.0)
        acc += _dot(dq, vt, IEEE, DT)
    tl.store(dx_ptr + rows[:, None] * s_dxt + ns[None, :] * s_dxn, acc.to(DT), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _lowrank_bwd_du_kernel(
    dy_ptr,
    w_ptr,
    u0,
    u1,
    u2,
    b0,
    b1,
    b2,
    du_ptr,
    db_ptr,
    T,
    M,
    O,
    CHUNK,
    s_dyp,
    s_dyt,
    s_dym,
    s_wp,
    s_wt,
    s_wo,
    s_um,
    s_uo,
    s_bm,
    s_dus,
    s_dup,
    s_dum,
    s_duo,
    s_dbs,
    s_dbp,
    s_dbm,
    GELU: tl.constexpr,
    IEEE: tl.constexpr,
    BT: tl.constexpr,
    BO: tl.constexpr,
    BM: tl.constexpr,
):
    """Partial ``dU[p, ms, :] = Σ_t dpre[t, ms]ᵀ w[t, :]`` and ``db[p, ms] = Σ_t dpre[t, ms]`` over one chunk of
    ``CHUNK`` tokens (a multiple of ``BT``); the caller sums the chunks (stage two)."""
    mb = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    DT = w_ptr.dtype.element_ty
    u_base = _pick(p, u0, u1, u2)
    b_base = _pick(p, b0, b1, b2)
    ms = mb * BM + tl.arange(0, BM)
    mmask = ms < M
    offs_o = tl.arange(0, BO)
    omask = offs_o < O
    if GELU:
        ut = tl.load(u_base + offs_o[:, None] * s_uo + ms[None, :] * s_um, mask=omask[:, None] & mmask[None, :], other=0.0)
        bias = tl.load(b_base + ms * s_bm, mask=mmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BM, BO], dtype=tl.float32)
    dbacc = tl.zeros([BM], dtype=tl.float32)
    for t0 in range(s * CHUNK, tl.minimum(s * CHUNK + CHUNK, T), BT):
        rows = tl.arange(0, BT).to(tl.int64) + t0  # int64 offsets, as _block_row gives the other kernels
        rmask = rows < T
        wt = tl.load(w_ptr + p * s_wp + rows[:, None] * s_wt + offs_o[None, :] * s_wo, mask=rmask[:, None] & omask[None, :], other=0.0)
        dyt = tl.load(dy_ptr + p * s_dyp + rows[:, None] * s_dyt + ms[None, :] * s_dym, mask=rmask[:, None] & mmask[None, :], other=0.0).to(
            tl.float32
        )
        if GELU:
            pre = _dot(wt, ut, IEEE, DT) + bias[None, :]
            dpre = dyt * _gelu_grad_tl(pre)  # masked rows: dy = 0, so dpre = 0
        else:
            dpre = dyt
        dbacc += tl.sum(dpre, axis=0)
        acc += _dot(tl.trans(dpre), wt, IEEE, DT)
    tl.store(du_ptr + s * s_dus + p * s_dup + ms[:, None] * s_dum + offs_o[None, :] * s_duo, acc, mask=mmask[:, None] & omask[None, :])
    tl.store(db_ptr + s * s_dbs + p * s_dbp + ms * s_dbm, dbacc, mask=mmask)


def _block_sizes(n: int, m: int, o: int, device: torch.device) -> tuple[int, int, int, int]:
    """Forward (BT, BK, BO, BM). Fixed, not autotuned: the GPU values are a reasonable first choice, unmeasured."""
    bo = max(16, triton.next_power_of_2(o))
    if device.type == "cuda":
        return 64, 32, bo, 64
    # interpreter: numpy per program, fewer bigger programs are faster; shapes are tiny anyway
    return 32, max(16, min(64, triton.next_power_of_2(n))), bo, max(16, min(64, triton.next_power_of_2(m)))


def _bwd_block_sizes(n: int, m: int, o: int, device: torch.device) -> tuple[int, int, int, int]:
    """Backward (BT, BO, BM, BN). The dx kernel keeps z, w, dw and dq ``[BT, O]`` fp32 tiles live at once, so its
    token block is half the forward's on the GPU (unmeasured)."""
    bo = max(16, triton.next_power_of_2(o))
    if device.type == "cuda":
        return 32, bo, 64, 64
    return 32, bo, max(16, min(64, triton.next_power_of_2(m))), max(16, min(64, triton.next_power_of_2(n)))


def _block_table(seg_lens: Sequence[int], seg_groups: Sequence[int], bt: int) -> list[int]:
    """Rows ``[first token, segment end, group]``, one per ``bt``-token block; a block never spans two segments."""
    table: list[int] = []
    start = 0
    for length, g in zip(seg_lens, seg_groups):
        for s in range(start, start + length, bt):
            table += [s, start + length, g]
        start += length
    return table


@functools.lru_cache(maxsize=1024)
def _cached_table(seg_lens: tuple[int, ...], seg_groups: tuple[int, ...], bt: int, device: torch.device) -> Tensor:
    return torch.tensor(_block_table(seg_lens, seg_groups, bt), dtype=torch.int32).view(-1, 3).to(device)


def block_table(seg_lens: Sequence[int], seg_groups: Sequence[int], bt: int, x: Tensor) -> Tensor:
    """The ``[blocks, 3]`` int32 block table on x's device, cached per (lengths, groups, block size, device): a
    model calls the same few layouts over and over, and each new table costs a host-to-device copy that waits for
    the stream. Not cached while torch.compile traces (the table becomes a graph constant) or for fake tensors."""
    lens, gs = tuple(seg_lens), tuple(seg_groups)
    if torch.compiler.is_compiling() or is_fake(x):
        return torch.tensor(_block_table(lens, gs, bt), dtype=torch.int32, device=x.device).view(-1, 3)
    return _cached_table(lens, gs, bt, x.device)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _m_splits(programs: int, m: int, bm: int, device: torch.device) -> int:
    """How many programs share the M loop of one (token block, map) in the forward. Each recomputes the O-wide
    down-projection, so split only while the grid does not fill the GPU (two programs per SM): short sequences
    (64-128 tokens per call at the paper's sizes) would otherwise run on a handful of the SMs. The interpreter
    always uses two splits where M allows, so that the CPU tests cover the split path."""
    slices = triton.cdiv(m, bm)
    if device.type != "cuda":
        return min(2, slices)
    return max(1, min(slices, triton.cdiv(2 * _sm_count(device), max(1, programs))))


def _launch(kernel):
    """The kernel behind ``wrap_triton`` (so torch.compile can trace the launch). Under TRITON_INTERPRET=1 Triton
    makes kernels ``InterpretedFunction``s, which torch 2.11's ``wrap_triton`` rejects (2.13 passes them through);
    those launch as they are: nothing traces the interpreter anyway."""
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def _slots(ts: Sequence[Tensor]) -> list[Tensor]:
    """The kernels' three pointer slots: the maps' tensors, padded by repeating the first (never read: p < P)."""
    return [*ts, *([ts[0]] * (MAX_MAPS - len(ts)))]


@triton_op("avmt::lowrank_fused", mutates_args={})
def _lowrank_fused(
    x: Tensor,
    Vs: list[Tensor],
    Rs: list[Tensor],
    Us: list[Tensor],
    bs: list[Tensor],
    table: Tensor,
    table_bwd: Tensor,
    seg_lens: list[int],
    seg_groups: list[int],
    gelu: bool,
    eps: float,
    triton_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, N]; per map (P of them, P <= 3): V [G, N, O] (x's dtype or fp32), R [G, O, O] (any float, used in
    fp32), U [M, O] (x's dtype or fp32), b [M]; all maps' tensors of one kind share shape and strides;
    table / table_bwd [blocks, 3] int32 (:func:`_block_table` with this device's forward / backward BT);
    ``triton_backward`` only picks the backward (it does not change the forward)
    -> (y [P, T, M] x's dtype, z [P, T, O] fp32, norm [P, T] fp32)."""
    t, n = x.shape
    p = len(Vs)
    _, _, o = Vs[0].shape
    m = Us[0].shape[0]
    y = torch.empty((p, t, m), device=x.device, dtype=x.dtype)
    z = torch.empty((p, t, o), device=x.device, dtype=torch.float32)
    norm = torch.empty((p, t), device=x.device, dtype=torch.float32)
    bt, bk, bo, bm = _block_sizes(n, m, o, x.device)
    if table.shape[0] == 0:  # zero tokens
        return y, z, norm
    V, R, U, B = _slots(Vs), _slots(Rs), _slots(Us), _slots(bs)
    splits = _m_splits(table.shape[0] * p, m, bm, x.device)
    m_per = triton.cdiv(triton.cdiv(m, bm), splits) * bm  # a whole number of BM slices per program
    _launch(_lowrank_fwd_kernel)[(table.shape[0], p, triton.cdiv(m, m_per))](
        x,
        *V,
        *R,
        *U,
        *B,
        y,
        z,
        norm,
        table,
        t,
        n,
        m,
        o,
        eps,
        x.stride(0),
        x.stride(1),
        V[0].stride(0),
        V[0].stride(1),
        V[0].stride(2),
        R[0].stride(0),
        R[0].stride(1),
        R[0].stride(2),
        U[0].stride(0),
        U[0].stride(1),
        B[0].stride(0),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        z.stride(0),
        z.stride(1),
        z.stride(2),
        norm.stride(0),
        m_per,
        GELU=gelu,
        IEEE=x.dtype == torch.float32,
        BT=bt,
        BK=bk,
        BO=bo,
        BM=bm,
        # the [BT, O] fp32 tile and the O x O rotation are register-heavy at O=128: 8 warps spread them (unmeasured)
        num_warps=8 if bo >= 128 else 4,
    )
    return y, z, norm


def _du_chunk(t: int, m: int, p: int, bt: int, bm: int, device: torch.device) -> int:
    """Tokens per program of the dU/db reduction (a multiple of ``bt``): enough chunks that the grid fills a GPU
    (~512 programs), but at least 8 token blocks each so the partial sums stay few (unmeasured)."""
    if device.type != "cuda":
        return 2 * bt  # interpreter: small chunks, so the CPU tests (up to 129 tokens) exercise the two-stage sum
    chunks = max(1, 512 // (triton.cdiv(m, bm) * p))
    per = max(8, triton.cdiv(triton.cdiv(t, chunks), bt))
    return per * bt


@triton_op("avmt::lowrank_fused_bwd", mutates_args={})
def _lowrank_fused_bwd(
    dy: Tensor,
    z: Tensor,
    norm: Tensor,
    Vs: list[Tensor],
    Rs: list[Tensor],
    Us: list[Tensor],
    bs: list[Tensor],
    table_bwd: Tensor,
    n: int,
    gelu: bool,
    eps: float,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Triton half of the backward. dy [P, T, M] (x's dtype); z [P, T, O], norm [P, T] fp32 (saved by the
    forward); weights as in :func:`_lowrank_fused`; n = N.
    -> (dx [T, N] (empty [0, N] unless need_dx), w [P, T, O], dw [P, T, O], dq [P, T, O] all in dy's dtype (the
    compute dtype), dU [P, M, O] fp32, db [P, M] fp32)."""
    p, t, m = dy.shape
    o = z.shape[-1]
    dev = dy.device
    bt, bo, bm, bn = _bwd_block_sizes(n, m, o, dev)
    ieee = dy.dtype == torch.float32
    dx = torch.empty((t if need_dx else 0, n), device=dev, dtype=dy.dtype)
    # w, dw, dq in the compute dtype: the dots and GEMMs that consume them (dU, dx, dV, dR) run in it
    w = torch.empty((p, t, o), device=dev, dtype=dy.dtype)
    dw = torch.empty((p, t, o), device=dev, dtype=dy.dtype)
    dq = torch.empty((p, t, o), device=dev, dtype=dy.dtype)
    chunk = _du_chunk(t, m, p, bt, bm, dev)
    chunks = triton.cdiv(t, chunk) if t else 0
    dU_part = torch.empty((chunks, p, m, o), device=dev, dtype=torch.float32)
    db_part = torch.empty((chunks, p, m), device=dev, dtype=torch.float32)
    if t == 0:
        return dx, w, dw, dq, dU_part.sum(0), db_part.sum(0)
    V, R, U, B = _slots(Vs), _slots(Rs), _slots(Us), _slots(bs)
    warps = 8 if bo >= 128 else 4
    fuse_dx = need_dx and p == 1
    _launch(_lowrank_bwd_dx_kernel)[(table_bwd.shape[0], p)](
        dy,
        z,
        norm,
        *V,
        *R,
        *U,
        *B,
        dx,
        w,
        dw,
        dq,
        table_bwd,
        t,
        n,
        m,
        o,
        eps,
        dy.stride(0),
        dy.stride(1),
        dy.stride(2),
        z.stride(0),
        z.stride(1),
        z.stride(2),
        norm.stride(0),
        V[0].stride(0),
        V[0].stride(1),
        V[0].stride(2),
        R[0].stride(0),
        R[0].stride(1),
        R[0].stride(2),
        U[0].stride(0),
        U[0].stride(1),
        B[0].stride(0),
        dx.stride(0),
        dx.stride(1),
        dw.stride(0),
        dw.stride(1),
        dw.stride(2),
        GELU=gelu,
        IEEE=ieee,
        FUSE_DX=fuse_dx,
        BT=bt,
        BO=bo,
        BM=bm,
        BN=bn,
        num_warps=warps,
    )
    if need_dx and not fuse_dx:  # several maps: sum their dq V^T in a second launch
        bn_sum = min(bn, 32)  # 32-wide N slices with 4 warps compile without spills on sm_90 (64 spilled)
        _launch(_lowrank_bwd_dxsum_kernel)[(table_bwd.shape[0], triton.cdiv(n, bn_sum))](
            dq,
            *V,
            dx,
            table_bwd,
            n,
            o,
            dq.stride(0),
            dq.stride(1),
            dq.stride(2),
            V[0].stride(0),
            V[0].stride(1),
            V[0].stride(2),
            dx.stride(0),
            dx.stride(1),
            P=p,
            IEEE=ieee,
            BT=bt,
            BO=bo,
            BN=bn_sum,
            num_warps=4,
        )
    _launch(_lowrank_bwd_du_kernel)[(triton.cdiv(m, bm), p, chunks)](
        dy,
        w,
        *U,
        *B,
        dU_part,
        db_part,
        t,
        m,
        o,
        chunk,
        dy.stride(0),
        dy.stride(1),
        dy.stride(2),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        U[0].stride(0),
        U[0].stride(1),
        B[0].stride(0),
        dU_part.stride(0),
        dU_part.stride(1),
        dU_part.stride(2),
        dU_part.stride(3),
        db_part.stride(0),
        db_part.stride(1),
        db_part.stride(2),
        GELU=gelu,
        IEEE=ieee,
        BT=bt,
        BO=bo,
        BM=bm,
        num_warps=warps,
    )
    return dx, w, dw, dq, dU_part.sum(0), db_part.sum(0)


def _gelu_grad(pre: Tensor) -> Tensor:
    """d/dy of the erf GELU."""
    cdf = 0.5 * (1.0 + torch.erf(pre * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * pre * pre) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + pre * pdf


def _setup_context(ctx, inputs, output) -> None:
    x, Vs, Rs, Us, bs, _table, table_bwd, seg_lens, seg_groups, gelu, eps, triton_backward = inputs
    _, z, norm = output
    p = len(Vs)
    ctx.save_for_backward(x, table_bwd, z, norm, *Vs, *Rs, *Us, *bs)
    ctx.p, ctx.seg_lens, ctx.seg_groups, ctx.gelu, ctx.eps = p, list(seg_lens), list(seg_groups), gelu, eps
    ctx.triton_backward = triton_backward


def _saved(ctx):
    x, table_bwd, z, norm, *rest = ctx.saved_tensors
    p = ctx.p
    return x, table_bwd, z, norm, rest[:p], rest[p : 2 * p], rest[2 * p : 3 * p], rest[3 * p :]


def _grads(ctx, dx, dV, dR, dU, db, x, Vs, Rs, Us, bs):
    """The op's gradient tuple, each in its input's dtype (fp32 params under autocast get fp32 gradients)."""
    return (
        None if dx is None else dx.to(x.dtype),
        [g.to(v.dtype) for g, v in zip(dV, Vs)],
        [g.to(r.dtype) for g, r in zip(dR, Rs)],
        [g.to(u.dtype) for g, u in zip(dU, Us)],
        [g.to(b.dtype) for g, b in zip(db, bs)],
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


def _backward(ctx, dy: Tensor, _dz: Tensor | None, _dnorm: Tensor | None):
    return (_backward_triton if ctx.triton_backward else _backward_torch)(ctx, dy)


def _backward_triton(ctx, dy: Tensor):
    """Triton kernels for dx, dU, db (and the O-wide w, dw, dq); cuBLAS for dV = xᵀ dq and dR = dwᵀ z per segment."""
    x, table_bwd, z, norm, Vs, Rs, Us, bs = _saved(ctx)
    need_dx = bool(ctx.needs_input_grad[0])
    dx, _w, dw, dq, dU, db = _lowrank_fused_bwd(
        dy.to(x.dtype).contiguous(),
        z,
        norm,
        Vs,
        Rs,
        Us,
        bs,
        table_bwd,
        x.shape[1],
        ctx.gelu,
        ctx.eps,
        need_dx,
    )
    p, (g_count, n, o) = ctx.p, Vs[0].shape
    dV = torch.zeros((p, g_count, n, o), dtype=torch.float32, device=x.device)
    dR = torch.zeros((p, g_count, o, o), dtype=torch.float32, device=x.device)
    # the GEMMs run in the compute dtype (x's): fp32 stays fp32; bf16/fp16 use tensor cores with fp32 accumulation
    # inside cuBLAS, as the reference's own backward does under autocast (an fp32 GEMM there would be the slowest
    # step of the backward); the per-segment results are summed in fp32
    zc = z.to(x.dtype)
    start = 0
    for length, g in zip(ctx.seg_lens, ctx.seg_groups):
        sl = slice(start, start + length)
        start += length
        if length == 0:
            continue
        # all P maps in one GEMM each: [N, L] @ [L, P*O] and a batched [P, O, L] @ [P, L, O]
        dV[:, g] += (x[sl].T @ dq[:, sl].transpose(0, 1).reshape(length, p * o)).view(n, p, o).transpose(0, 1).float()
        dR[:, g] += (dw[:, sl].transpose(1, 2) @ zc[:, sl]).float()
    return _grads(ctx, dx if need_dx else None, dV.unbind(0), dR.unbind(0), dU.unbind(0), db.unbind(0), x, Vs, Rs, Us, bs)


def _backward_torch(ctx, dy: Tensor):
    """The plain PyTorch backward (the reference beside the kernels): fp32 torch matmuls, per map and segment.

    With ``w = z Rᵀ`` and ``pre = w Uᵀ + b``: ``dpre = dy · act'(pre)``, ``dU = dpreᵀ w``, ``db = Σ dpre``,
    ``dw = dpre U``, ``dR = dwᵀ z``, ``dz = dw R``, ``dzr = (dz - z (z·dz)) / ||zr||`` (``dz / eps`` where the norm
    was clamped), ``dV = xᵀ dzr``, ``dx = Σ_p dzr V_pᵀ``. ``pre`` is recomputed from the saved ``z`` (one O-deep
    matmul) rather than stored (it is ``M`` wide).
    """
    x, _table_bwd, z, norm, Vs, Rs, Us, bs = _saved(ctx)
    dy = dy.float()
    xf = x.float()
    dx = torch.zeros_like(xf) if ctx.needs_input_grad[0] else None
    dV = [torch.zeros(v.shape, dtype=torch.float32, device=v.device) for v in Vs]
    dR = [torch.zeros(r.shape, dtype=torch.float32, device=r.device) for r in Rs]
    dU = [torch.zeros(u.shape, dtype=torch.float32, device=u.device) for u in Us]
    db = [torch.zeros(b.shape, dtype=torch.float32, device=b.device) for b in bs]
    start = 0
    for length, g in zip(ctx.seg_lens, ctx.seg_groups):
        sl = slice(start, start + length)
        start += length
        if length == 0:
            continue
        for p in range(ctx.p):
            r, u, v = Rs[p][g].float(), Us[p].float(), Vs[p][g].float()
            zs, ns, dys = z[p, sl], norm[p, sl], dy[p, sl]
            w = zs @ r.T
            if ctx.gelu:
                dpre = dys * _gelu_grad(torch.addmm(bs[p].float(), w, u.T))
            else:
                dpre = dys
            dU[p] += dpre.T @ w
            db[p] += dpre.sum(0)
            dw = dpre @ u
            dR[p][g] += dw.T @ zs
            dzn = dw @ r
            clamped = ns <= ctx.eps
            dzr = torch.where(
                clamped[:, None],
                dzn / ctx.eps,
                (dzn - zs * (zs * dzn).sum(-1, keepdim=True)) / torch.where(clamped, 1.0, ns)[:, None],
            )
            dV[p][g] += xf[sl].T @ dzr
            if dx is not None:
                dx[sl] += dzr @ v.T
    return _grads(ctx, dx, dV, dR, dU, db, x, Vs, Rs, Us, bs)


_lowrank_fused.register_autograd(_backward, setup_context=_setup_context)


def _check(x: Tensor, Vs: Sequence[Tensor], Rs: Sequence[Tensor], Us: Sequence[Tensor], bs: Sequence[Tensor]) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if not 1 <= len(Vs) <= MAX_MAPS or not len(Vs) == len(Rs) == len(Us) == len(bs):
        raise ValueError(f"1 to {MAX_MAPS} maps with one V, R, U and b each, got {len(Vs)}, {len(Rs)}, {len(Us)}, {len(bs)}")
    n = x.shape[-1]
    for name, ts in (("V", Vs), ("R", Rs), ("U", Us), ("b", bs)):
        for t in ts:
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all inputs must share one device")
    for v, r, u, b in zip(Vs, Rs, Us, bs):
        if v.dim() != 3 or v.shape[1] != n:
            raise ValueError(f"V must be [G, N={n}, O], got {tuple(v.shape)}")
        g, _, o = v.shape
        if tuple(r.shape) != (g, o, o):
            raise ValueError(f"R must be [G={g}, O={o}, O={o}], got {tuple(r.shape)}")
        if u.dim() != 2 or u.shape[1] != o:
            raise ValueError(f"U must be [M, O={o}], got {tuple(u.shape)}")
        if tuple(b.shape) != (u.shape[0],):
            raise ValueError(f"b must be [M={u.shape[0]}], got {tuple(b.shape)}")
        # float32 weights with low-precision x are fp32 parameters under autocast: the kernels cast them on load
        if v.dtype not in (x.dtype, torch.float32) or u.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"V ({v.dtype}) and U ({u.dtype}) must have x's dtype ({x.dtype}) or float32")
        if r.dtype not in _FLOATS or b.dtype not in _FLOATS:
            raise TypeError(f"R ({r.dtype}) and b ({b.dtype}) must be float32, bfloat16 or float16")
    shapes = {(tuple(v.shape), tuple(u.shape)) for v, u in zip(Vs, Us)}
    if len(shapes) != 1:
        raise ValueError(f"fused maps must have equal shapes, got {sorted(shapes)}")
    for name, ts in (("V", Vs), ("R", Rs), ("U", Us), ("b", bs)):
        if len({t.dtype for t in ts}) != 1:
            raise TypeError(f"the fused maps' {name} must share one dtype, got {[t.dtype for t in ts]}")


def _segments(tokens: int, groups: int, group: int | None, segments: Sequence[tuple[int, int]] | None) -> tuple[list[int], list[int]]:
    if segments is None:
        segments = [(tokens, 0 if group is None else group)]
    elif group is not None:
        raise ValueError("pass either group or segments, not both")
    lens, gs = [int(s[0]) for s in segments], [int(s[1]) for s in segments]
    if any(n < 0 for n in lens) or sum(lens) != tokens:
        raise ValueError(f"segment lengths {lens} must be non-negative and sum to the {tokens} tokens of x")
    if any(not 0 <= g < groups for g in gs):
        raise IndexError(f"segment groups {gs} out of range for maps with {groups} groups")
    return lens, gs


def lowrank_linear_multi(
    x: Tensor,
    Vs: Sequence[Tensor],
    Rs: Sequence[Tensor],
    Us: Sequence[Tensor],
    bs: Sequence[Tensor],
    *,
    group: int | None = None,
    segments: Sequence[tuple[int, int]] | None = None,
    gelu: bool = False,
    eps: float = 1e-6,
    backward: Backward = "triton",
) -> list[Tensor]:
    """``P`` (1 to 3) low-rank maps of the same ``x`` in one launch; returns ``P`` tensors ``[..., M]`` in x's dtype.

    Args:
        x: ``[..., N]`` float32/bfloat16/float16; the leading dims are flattened to ``T`` tokens.
        Vs: per map ``[G, N, O]`` (x's dtype, or float32: cast on load). Rs: per map ``[G, O, O]`` (any float; used
            in fp32). Us: per map ``[M, O]`` (x's dtype or float32). bs: per map ``[M]``.
        group: the group of every token (default 0), or
        segments: ``[(length, group), ...]`` over the flattened tokens, in order, lengths summing to ``T``.
        gelu: apply the erf GELU after the bias.
        eps: ``normalize(z) = z / max(||z||, eps)``.
        backward: ``"triton"`` (the fused backward kernels + cuBLAS weight reductions) or ``"torch"`` (the plain
            fp32 torch-matmul backward, the reference).
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward={backward!r} is invalid: expected one of {', '.join(BACKWARDS)}")
    _check(x, Vs, Rs, Us, bs)
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n)
    lens, gs = _segments(x2.shape[0], Vs[0].shape[0], group, segments)
    m, o = Us[0].shape[0], Vs[0].shape[-1]
    if len(Vs) * x2.shape[0] * max(16, o) >= 2**31:  # the dq-sum kernel's per-map offset p * T * O is 32-bit
        raise ValueError(f"{x2.shape[0]} tokens x {len(Vs)} maps x rank {o} is over 2^31: split the call")
    # the block tables are built here, outside the custom ops, so that the ops' bodies only allocate and launch
    bt, bt_bwd = _block_sizes(n, m, o, x.device)[0], _bwd_block_sizes(n, m, o, x.device)[0]
    table = block_table(lens, gs, bt, x2)
    table_bwd = table if bt_bwd == bt else block_table(lens, gs, bt_bwd, x2)
    # .contiguous() is a no-op for parameters and matrix_exp outputs; it gives every map one stride set
    Vs, Rs, Us, bs = ([t.contiguous() for t in ts] for ts in (Vs, Rs, Us, bs))
    y, _, _ = _lowrank_fused(x2, Vs, Rs, Us, bs, table, table_bwd, lens, gs, gelu, float(eps), backward == "triton")
    return [y[i].view(*lead, -1) for i in range(len(Vs))]


def lowrank_linear(
    x: Tensor,
    V: Tensor,
    R: Tensor,
    U: Tensor,
    b: Tensor,
    *,
    group: int | None = None,
    segments: Sequence[tuple[int, int]] | None = None,
    gelu: bool = False,
    eps: float = 1e-6,
    backward: Backward = "triton",
) -> Tensor:
    """``act(U · R_m · normalize(V_mᵀ x) + b)`` fused: x ``[..., N]``, V ``[G, N, O]``, R ``[G, O, O]``, U ``[M, O]``,
    b ``[M]``; returns ``[..., M]`` in x's dtype. See :func:`lowrank_linear_multi` for the other arguments."""
    return lowrank_linear_multi(x, [V], [R], [U], [b], group=group, segments=segments, gelu=gelu, eps=eps, backward=backward)[0]
