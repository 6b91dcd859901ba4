"""Fused low-rank map ``y = act(U · R_m · normalize(V_mᵀ x) + b)`` (SPEC §2) as one Triton launch.

One launch covers:

- ``P`` maps that read the same ``x`` (``P = 3`` for the attention Q, K, V projections, ``P = 1`` otherwise);
- several modality *segments*: contiguous token ranges, each with its own group ``m`` (its ``V_m`` and ``R_m``).

Forward kernel (per program: one block of ``BT`` tokens of one segment, one map ``p``):

1. ``z = x[BT, N] @ V[p, m][N, O]`` accumulated in fp32 over ``BK``-wide slices of ``N``;
2. the row norm, ``z / max(||z||, eps)``, and the rotation ``w = z @ R[p, m]ᵀ`` on the ``[BT, O]`` tile in fp32;
3. a loop over ``M`` in ``BM``-wide slices: ``y = act(w @ U[p]ᵀ + b[p])`` written out.

The ``O``-wide intermediate never leaves the chip, and ``x`` is read once per (token block, map). ``z`` (fp32,
normalised) and the row norms are written as side outputs only for the backward pass (``O`` is 6-24× smaller
than ``N``/``M`` at paper shapes).

Backward: plain torch matmuls (cuBLAS on GPU) over the saved ``z``, per segment; see :func:`_backward`. The
gradient of ``R_m`` flows on to ``A_m`` through ``torch.matrix_exp``'s own autograd, because ``R`` is an input.

The op is registered with ``torch.library.triton_op`` (``avmt::lowrank_fused``) so ``torch.compile`` can trace it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _lowrank_fwd_kernel(
    x_ptr, v_ptr, r_ptr, u_ptr, b_ptr, y_ptr, z_ptr, n_ptr, table_ptr,
    T, N, M, O, eps,
    s_xt, s_xn,
    s_vp, s_vg, s_vn, s_vo,
    s_rp, s_rg, s_ri, s_rj,
    s_up, s_um, s_uo,
    s_bp, s_bm,
    s_yp, s_yt, s_ym,
    s_zp, s_zt, s_zo,
    s_np,
    GELU: tl.constexpr, IEEE: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, BM: tl.constexpr,
):
    blk = tl.program_id(0)
    p = tl.program_id(1)
    # block table row: [first token, one past the last token of the segment, group]
    start = tl.load(table_ptr + 3 * blk)
    end = tl.load(table_ptr + 3 * blk + 1)
    g = tl.load(table_ptr + 3 * blk + 2)

    rows = start + tl.arange(0, BT)
    rmask = rows < end
    offs_o = tl.arange(0, BO)
    omask = offs_o < O  # O is padded up to BO (a power of two >= 16, tl.dot's minimum); padding loads as 0

    # 1. down-projection, fp32 accumulation
    acc = tl.zeros([BT, BO], dtype=tl.float32)
    v_base = v_ptr + p * s_vp + g * s_vg
    for k0 in range(0, N, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < N
        xt = tl.load(x_ptr + rows[:, None] * s_xt + ks[None, :] * s_xn, mask=rmask[:, None] & kmask[None, :], other=0.0)
        vt = tl.load(v_base + ks[:, None] * s_vn + offs_o[None, :] * s_vo, mask=kmask[:, None] & omask[None, :], other=0.0)
        if IEEE:  # fp32 inputs: no TF32, so the fused path stays within 2x of the fp32 reference
            acc = tl.dot(xt, vt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, vt, acc)

    # 2. row norm and rotation on chip (fp32; O x O is small next to N x O)
    norm = tl.sqrt(tl.sum(acc * acc, axis=1))
    z = acc / tl.maximum(norm, eps)[:, None]
    tl.store(z_ptr + p * s_zp + rows[:, None] * s_zt + offs_o[None, :] * s_zo, z, mask=rmask[:, None] & omask[None, :])
    tl.store(n_ptr + p * s_np + rows, norm, mask=rmask)
    # w = z @ R^T: load R transposed, rt[j, i] = R[i, j]
    rt = tl.load(
        r_ptr + p * s_rp + g * s_rg + offs_o[:, None] * s_rj + offs_o[None, :] * s_ri,
        mask=omask[:, None] & omask[None, :], other=0.0,
    )
    w = tl.dot(z, rt.to(tl.float32), input_precision="ieee")
    w = w.to(u_ptr.dtype.element_ty)  # expansion runs in the input dtype (bf16/fp16 tensor cores), fp32 accumulation

    # 3. expansion, bias, activation, slice by slice of M
    u_base = u_ptr + p * s_up
    for m0 in range(0, M, BM):
        ms = m0 + tl.arange(0, BM)
        mmask = ms < M
        ut = tl.load(u_base + offs_o[:, None] * s_uo + ms[None, :] * s_um, mask=omask[:, None] & mmask[None, :], other=0.0)
        if IEEE:
            y = tl.dot(w, ut, input_precision="ieee")
        else:
            y = tl.dot(w, ut)
        bias = tl.load(b_ptr + p * s_bp + ms * s_bm, mask=mmask, other=0.0).to(tl.float32)
        y = y + bias[None, :]
        if GELU:  # exact (erf) GELU, as the reference F.gelu
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        tl.store(y_ptr + p * s_yp + rows[:, None] * s_yt + ms[None, :] * s_ym, y.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & mmask[None, :])


def _block_sizes(n: int, m: int, o: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BT, BK, BO, BM). Fixed, not autotuned: the GPU values are a reasonable first choice, unmeasured."""
    bo = max(16, triton.next_power_of_2(o))
    if device.type == "cuda":
        return 64, 32, bo, 64
    # interpreter: numpy per program, fewer bigger programs are faster; shapes are tiny anyway
    return 32, max(16, min(64, triton.next_power_of_2(n))), bo, max(16, min(64, triton.next_power_of_2(m)))


def _block_table(seg_lens: Sequence[int], seg_groups: Sequence[int], bt: int) -> list[int]:
    table: list[int] = []
    start = 0
    for length, g in zip(seg_lens, seg_groups):
        for s in range(start, start + length, bt):
            table += [s, start + length, g]
        start += length
    return table


@triton_op("avmt::lowrank_fused", mutates_args={})
def _lowrank_fused(
    x: Tensor, V: Tensor, R: Tensor, U: Tensor, b: Tensor, table: Tensor, seg_lens: list[int], seg_groups: list[int],
    gelu: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, N]; V [P, G, N, O]; R [P, G, O, O] fp32; U [P, M, O]; b [P, M]; table [blocks, 3] int32 (from
    :func:`_block_table` with this device's BT) -> (y [P, T, M], z [P, T, O] fp32, norm [P, T] fp32)."""
    t, n = x.shape
    p, _, _, o = V.shape
    m = U.shape[1]
    y = torch.empty((p, t, m), device=x.device, dtype=x.dtype)
    z = torch.empty((p, t, o), device=x.device, dtype=torch.float32)
    norm = torch.empty((p, t), device=x.device, dtype=torch.float32)
    bt, bk, bo, bm = _block_sizes(n, m, o, x.device)
    if table.shape[0] == 0:  # zero tokens
        return y, z, norm
    grid = (table.shape[0], p)
    wrap_triton(_lowrank_fwd_kernel)[grid](
        x, V, R, U, b, y, z, norm, table,
        t, n, m, o, eps,
        x.stride(0), x.stride(1),
        V.stride(0), V.stride(1), V.stride(2), V.stride(3),
        R.stride(0), R.stride(1), R.stride(2), R.stride(3),
        U.stride(0), U.stride(1), U.stride(2),
        b.stride(0), b.stride(1),
        y.stride(0), y.stride(1), y.stride(2),
        z.stride(0), z.stride(1), z.stride(2),
        norm.stride(0),
        GELU=gelu, IEEE=x.dtype == torch.float32, BT=bt, BK=bk, BO=bo, BM=bm,
        # the [BT, O] fp32 tile and the O x O rotation are register-heavy at O=128: 8 warps spread them (unmeasured)
        num_warps=8 if bo >= 128 else 4,
    )
    return y, z, norm


def _gelu_grad(pre: Tensor) -> Tensor:
    """d/dy of the erf GELU."""
    cdf = 0.5 * (1.0 + torch.erf(pre * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * pre * pre) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + pre * pdf


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, V, R, U, b, _table, seg_lens, seg_groups, gelu, eps = inputs
    _, z, norm = output
    ctx.save_for_backward(x, V, R, U, b, z, norm)
    ctx.seg_lens, ctx.seg_groups, ctx.gelu, ctx.eps = list(seg_lens), list(seg_groups), gelu, eps


def _backward(ctx, dy: Tensor, _dz: Tensor | None, _dnorm: Tensor | None):  # noqa: ANN001, ANN202
    """All gradients in fp32 torch matmuls (cuBLAS on GPU), per map and per segment.

    With ``w = z Rᵀ`` and ``pre = w Uᵀ + b``: ``dpre = dy · act'(pre)``, ``dU = dpreᵀ w``, ``db = Σ dpre``,
    ``dw = dpre U``, ``dR = dwᵀ z``, ``dz = dw R``, ``dzr = (dz - z (z·dz)) / ||zr||`` (``dz / eps`` where the norm
    was clamped), ``dV = xᵀ dzr``, ``dx = Σ_p dzr V_pᵀ``. ``pre`` is recomputed from the saved ``z`` (one O-deep
    matmul) rather than stored (it is ``M`` wide).
    """
    x, V, R, U, b, z, norm = ctx.saved_tensors
    p_maps = V.shape[0]
    dy = dy.float()
    xf = x.float()
    dx = torch.zeros_like(xf) if ctx.needs_input_grad[0] else None
    dV = torch.zeros(V.shape, dtype=torch.float32, device=V.device)
    dR = torch.zeros(R.shape, dtype=torch.float32, device=R.device)
    dU = torch.zeros(U.shape, dtype=torch.float32, device=U.device)
    db = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
    start = 0
    for length, g in zip(ctx.seg_lens, ctx.seg_groups):
        sl = slice(start, start + length)
        start += length
        if length == 0:
            continue
        for p in range(p_maps):
            r, u, v = R[p, g].float(), U[p].float(), V[p, g].float()
            zs, ns, dys = z[p, sl], norm[p, sl], dy[p, sl]
            w = zs @ r.T
            if ctx.gelu:
                dpre = dys * _gelu_grad(torch.addmm(b[p].float(), w, u.T))
            else:
                dpre = dys
            dU[p] += dpre.T @ w
            db[p] += dpre.sum(0)
            dw = dpre @ u
            dR[p, g] += dw.T @ zs
            dzn = dw @ r
            clamped = ns <= ctx.eps
            dzr = torch.where(
                clamped[:, None], dzn / ctx.eps,
                (dzn - zs * (zs * dzn).sum(-1, keepdim=True)) / torch.where(clamped, 1.0, ns)[:, None],
            )
            dV[p, g] += xf[sl].T @ dzr
            if dx is not None:
                dx[sl] += dzr @ v.T
    return (
        None if dx is None else dx.to(x.dtype), dV.to(V.dtype), dR.to(R.dtype), dU.to(U.dtype), db.to(b.dtype),
        None, None, None, None, None,
    )


_lowrank_fused.register_autograd(_backward, setup_context=_setup_context)


def _check(x: Tensor, Vs: Sequence[Tensor], Rs: Sequence[Tensor], Us: Sequence[Tensor], bs: Sequence[Tensor]) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
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
        if v.dtype != x.dtype or u.dtype != x.dtype:
            raise TypeError(f"V ({v.dtype}) and U ({u.dtype}) must have x's dtype ({x.dtype})")
    shapes = {(tuple(v.shape), tuple(u.shape)) for v, u in zip(Vs, Us)}
    if len(shapes) != 1:
        raise ValueError(f"fused maps must have equal shapes, got {sorted(shapes)}")


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
    x: Tensor, Vs: Sequence[Tensor], Rs: Sequence[Tensor], Us: Sequence[Tensor], bs: Sequence[Tensor], *,
    group: int | None = None, segments: Sequence[tuple[int, int]] | None = None, gelu: bool = False, eps: float = 1e-6,
) -> list[Tensor]:
    """``P`` low-rank maps of the same ``x`` in one launch; returns ``P`` tensors ``[..., M]`` in x's dtype.

    Args:
        x: ``[..., N]`` float32/bfloat16/float16; the leading dims are flattened to ``T`` tokens.
        Vs: per map ``[G, N, O]`` (x's dtype). Rs: per map ``[G, O, O]`` (any float; used in fp32).
        Us: per map ``[M, O]`` (x's dtype). bs: per map ``[M]``.
        group: the group of every token (default 0), or
        segments: ``[(length, group), ...]`` over the flattened tokens, in order, lengths summing to ``T``.
        gelu: apply the erf GELU after the bias.
        eps: ``normalize(z) = z / max(||z||, eps)``.
    """
    _check(x, Vs, Rs, Us, bs)
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n)
    lens, gs = _segments(x2.shape[0], Vs[0].shape[0], group, segments)
    stack = (lambda ts: ts[0].unsqueeze(0)) if len(Vs) == 1 else torch.stack
    # the block table is built here, outside the custom op, so that the op's body only allocates and launches
    bt = _block_sizes(n, Us[0].shape[0], Vs[0].shape[-1], x.device)[0]
    table = torch.tensor(_block_table(lens, gs, bt), dtype=torch.int32, device=x.device).view(-1, 3)
    y, _, _ = _lowrank_fused(
        x2, stack(list(Vs)), stack([r.float() for r in Rs]), stack(list(Us)), stack(list(bs)), table, lens, gs, gelu, float(eps),
    )
    return [y[i].view(*lead, -1) for i in range(len(Vs))]


def lowrank_linear(
    x: Tensor, V: Tensor, R: Tensor, U: Tensor, b: Tensor, *,
    group: int | None = None, segments: Sequence[tuple[int, int]] | None = None, gelu: bool = False, eps: float = 1e-6,
) -> Tensor:
    """``act(U · R_m · normalize(V_mᵀ x) + b)`` fused: x ``[..., N]``, V ``[G, N, O]``, R ``[G, O, O]``, U ``[M, O]``,
    b ``[M]``; returns ``[..., M]`` in x's dtype. See :func:`lowrank_linear_multi` for ``group``/``segments``."""
    return lowrank_linear_multi(x, [V], [R], [U], [b], group=group, segments=segments, gelu=gelu, eps=eps)[0]


def lowrank_qkv(
    x: Tensor, Vs: Sequence[Tensor], Rs: Sequence[Tensor], Us: Sequence[Tensor], bs: Sequence[Tensor], heads: int, *,
    group: int | None = None, segments: Sequence[tuple[int, int]] | None = None, eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K, V projections of ``x [B, S, D]`` in one launch, returned as ``[B, heads, S, D/heads]`` views
    (the layout ``F.scaled_dot_product_attention`` takes)."""
    if len(Vs) != 3:
        raise ValueError(f"lowrank_qkv needs exactly 3 maps, got {len(Vs)}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, S, D], got {tuple(x.shape)}")
    b_, s, _ = x.shape
    outs = lowrank_linear_multi(x, Vs, Rs, Us, bs, group=group, segments=segments, eps=eps)
    m = outs[0].shape[-1]
    if m % heads:
        raise ValueError(f"output width {m} is not divisible by heads={heads}")
    q, k, v = (o.view(b_, s, heads, m // heads).transpose(1, 2) for o in outs)
    return q, k, v
