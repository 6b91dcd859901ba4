"""BERT post-LN Transformer layers with plain or low-rank modality-shared dense maps (docs/method.md §1-2).

Every dense map of a layer has the signature ``map(x, group, cache)``:

- ``x``: ``[..., N]`` float tensor; returns ``[..., M]`` of the same dtype.
- ``group``: the modality group of the tokens (visual=0, audio=1, multimodal=2 in mid fusion). Plain
  maps ignore it; low-rank maps pick their modality-specific ``V_m`` and ``R_m`` with it.
- ``cache``: a :class:`RotationCache` shared by one forward of the whole model, so that the
  orthogonal ``R_m`` of a shared layer is materialised once, not once per application.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avmt import kernels
from avmt.backends import LOWRANK_KERNELS


class DenseMap(nn.Linear):
    """A plain ``nn.Linear`` with the map signature; ``group`` and ``cache`` are ignored."""

    def __init__(self, in_features: int, out_features: int, init_std: float) -> None:
        super().__init__(in_features, out_features)
        nn.init.normal_(self.weight, std=init_std)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, group: int = 0, cache: RotationCache | None = None) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class LowRankLinear(nn.Module):
    """``F_m(x) = U · R_m · normalize(V_mᵀ x) + b``, the paper's low-rank shared map (docs/method.md §2).

    Parameters (N = in_features, M = out_features, O = rank, G = groups):

    - ``U [M, O]`` and ``bias [M]``: shared by every modality group;
    - ``V [G, N, O]``: modality-specific down-projection (no bias);
    - ``A [G, O, O]``: modality-specific; ``R_m = matrix_exp(A_m - A_mᵀ)`` is orthogonal for any A_m.

    Count: ``M·O + M + G·(N·O + O·O)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        groups: int,
        init_std: float,
        eps: float,
        kernel: str = "reference",
        kernel_backward: str = "triton",
    ) -> None:
        super().__init__()
        if kernel not in LOWRANK_KERNELS:
            raise ValueError(f"kernel={kernel!r} is invalid: expected one of {', '.join(LOWRANK_KERNELS)}")
        if kernel_backward not in kernels.BACKWARDS:
            raise ValueError(f"kernel_backward={kernel_backward!r} is invalid: expected one of {', '.join(kernels.BACKWARDS)}")
        self.in_features, self.out_features, self.rank, self.groups, self.eps = in_features, out_features, rank, groups, eps
        self.kernel = kernel  # "auto" | "triton" | "reference" (model.kernel); resolved per call from the input
        self.kernel_backward = kernel_backward  # backward of the Triton path (model.kernel_backward): "triton" | "torch"
        self.U = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.V = nn.Parameter(torch.empty(groups, in_features, rank))
        self.A = nn.Parameter(torch.empty(groups, rank, rank))
        # normalize() makes ||R z|| = 1, so U's std is scaled by sqrt(N) to give outputs the variance a dense
        # N->M map initialised with N(0, init_std) gives on unit-variance inputs.
        nn.init.normal_(self.U, std=init_std * math.sqrt(in_features))
        nn.init.zeros_(self.bias)
        nn.init.normal_(self.V, std=init_std)
        nn.init.normal_(self.A, std=init_std)  # R_m starts near the identity, a little different per group

    def rotations(self) -> Tensor:
        """All ``R_m`` as one ``[G, O, O]`` tensor (orthogonal, same dtype as ``A``)."""
        return torch.matrix_exp(self.A - self.A.transpose(-1, -2))

    def forward(self, x: Tensor, group: int = 0, cache: RotationCache | None = None, gelu: bool = False) -> Tensor:
        """``x [..., N] -> [..., M]``; ``gelu=True`` applies the erf GELU after the bias (fused on the Triton path)."""
        return LowRankLinear.apply_maps((self,), x, group, cache, gelu)[0]

    @staticmethod
    def apply_maps(
        maps: tuple[LowRankLinear, ...],
        x: Tensor,
        group: int,
        cache: RotationCache | None = None,
        gelu: bool = False,
    ) -> list[Tensor]:
        """Several maps of the same shape and settings on one ``x [..., N]`` (Q, K, V: one Triton launch); the
        parameters go to :func:`avmt.kernels.lowrank_maps` as they are, neither stacked nor cast."""
        first = maps[0]
        if not 0 <= group < first.groups:
            raise IndexError(f"group {group} out of range for a low-rank map with {first.groups} groups")
        rots = [cache.rotations(m) if cache is not None else m.rotations() for m in maps]
        return kernels.lowrank_maps(
            x,
            [m.V for m in maps],
            rots,
            [m.U for m in maps],
            [m.bias for m in maps],
            group=group,
            gelu=gelu,
            eps=first.eps,
            kernel=first.kernel,
            backward=first.kernel_backward,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, groups={self.groups}"


class RotationCache:
    """Holds the materialised ``R_m`` of every low-rank map for one forward pass of the model.

    The model creates one per forward and passes it down; each map's rotations are computed on first use
    and reused by every later application of the same (shared) map. Autograd accumulates the gradient of
    all uses into the single ``matrix_exp``.
    """

    def __init__(self) -> None:
        self._store: dict[LowRankLinear, Tensor] = {}

    def rotations(self, module: LowRankLinear) -> Tensor:
        r = self._store.get(module)
        if r is None:
            r = self._store[module] = module.rotations()
        return r

    def __len__(self) -> int:
        return len(self._store)


def make_map(
    in_features: int,
    out_features: int,
    *,
    lowrank: bool,
    rank: int,
    groups: int,
    init_std: float,
    eps: float,
    kernel: str = "reference",
    kernel_backward: str = "triton",
) -> nn.Module:
    """A dense map ``in_features -> out_features``: low-rank factorised (with its kernel backend) or plain."""
    if lowrank:
        return LowRankLinear(in_features, out_features, rank, groups, init_std, eps, kernel, kernel_backward)
    return DenseMap(in_features, out_features, init_std)


class TransformerLayer(nn.Module):
    """BERT post-LN layer: ``h = LN(x + Drop(O(Attn(Q x, K x, V x))))``, ``y = LN(h + Drop(W2 GELU(W1 h)))``.

    Input/output ``[B, S, D]``. ``key_mask [B, S]`` (bool, True = real token) hides padding from attention.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        *,
        dropout: float,
        attention_dropout: float,
        ln_eps: float,
        init_std: float,
        lowrank: bool = False,
        rank: int = 128,
        groups: int = 1,
        lowrank_eps: float = 1e-6,
        kernel: str = "reference",
        kernel_backward: str = "triton",
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.lowrank = lowrank
        self.attention_dropout = attention_dropout

        def dense(n: int, m: int) -> nn.Module:
            return make_map(
                n,
                m,
                lowrank=lowrank,
                rank=rank,
                groups=groups,
                init_std=init_std,
                eps=lowrank_eps,
                kernel=kernel,
                kernel_backward=kernel_backward,
            )

        self.query, self.key, self.value, self.attn_out = (dense(dim, dim) for _ in range(4))
        self.ffn_in, self.ffn_out = dense(dim, ffn_dim), dense(ffn_dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=ln_eps)
        self.ffn_norm = nn.LayerNorm(dim, eps=ln_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, group: int = 0, key_mask: Tensor | None = None, cache: RotationCache | None = None) -> Tensor:
        b, s, d = x.shape
        maps = (self.query, self.key, self.value)
        # low-rank: Q, K, V in one call (one Triton launch that reads x once per token block)
        qkv = LowRankLinear.apply_maps(maps, x, group, cache) if self.lowrank else [m(x, group, cache) for m in maps]
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in qkv)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.attention_dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(b, s, d)
        h = self.attn_norm(x + self.dropout(self.attn_out(a, group, cache)))
        # low-rank maps fuse the GELU into the FFN-in kernel; the reference applies the same F.gelu after the map
        inner = self.ffn_in(h, group, cache, gelu=True) if self.lowrank else F.gelu(self.ffn_in(h, group, cache))
        f = self.ffn_out(inner, group, cache)
        return self.ffn_norm(h + self.dropout(f))


class SequenceEmbedding(nn.Module):
    """``Dropout(LayerNorm(h + P[pos] (+ E_type[type])))``, the embedding module in front of each Transformer.

    ``h [B, S, D]``, ``positions [S]`` (long), ``types [S]`` (long, only if built with ``types > 0``).
    """

    def __init__(self, max_positions: int, dim: int, types: int, *, ln_eps: float, dropout: float, init_std: float) -> None:
        super().__init__()
        self.positions = nn.Embedding(max_positions, dim)
        self.types = nn.Embedding(types, dim) if types > 0 else None
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.dropout = nn.Dropout(dropout)
        for emb in (self.positions, self.types):
            if emb is not None:
                nn.init.normal_(emb.weight, std=init_std)

    def forward(self, h: Tensor, positions: Tensor, types: Tensor | None = None) -> Tensor:
        h = h + self.positions(positions)
        if self.types is not None:
            if types is None:
                raise ValueError("this embedding has type embeddings: pass types")
            h = h + self.types(types)
        return self.dropout(self.norm(h))
