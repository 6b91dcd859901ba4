"""Pretraining objectives (docs/method.md §3): masked embedding prediction (MEP) and correct pair prediction (CPP).

:class:`Pretraining` wraps an :class:`~avmt.models.AVBert` and adds the heads; the model itself is unchanged:
the objectives run ``model.embed_visual`` / ``embed_audio``, alter the clip tokens (swap audio, mask), then
``model.encode``. One call gives the total loss and per-term metrics::

    out = Pretraining(model, cfg.objective)(video, audio, clip_mask, generator=g)
    out.loss.backward(); out.metrics  # {"mep_visual_loss": ..., "mep_visual_acc": ..., "cpp_acc": ..., ...}

Under ``torch.distributed`` the negative candidate pool holds every rank's clips (gathered without gradient;
this rank's own rows keep theirs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from avmt.config import ObjectiveConfig
from avmt.models import AVBert, EncoderOutput
from avmt.sampling import sample_negatives


@dataclass
class PretrainingOutput:
    """``loss``: scalar total; ``metrics``: detached scalars (losses, accuracies, counts) per term."""

    loss: Tensor
    metrics: dict[str, Tensor]


class MEPHead(nn.Module):
    """Bilinear score ``s(x, o) = g(o)ᵀ W x`` with ``g`` a 2-layer MLP; ``query(o) = Wᵀ g(o)`` so ``s = query(o) · x``."""

    def __init__(self, dim: int, ln_eps: float) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=ln_eps), nn.Linear(dim, dim))
        self.bilinear = nn.Linear(dim, dim, bias=False)

    def query(self, o: Tensor) -> Tensor:
        """``o [N, D]`` -> ``[N, D]``."""
        return self.bilinear(self.g(o))


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` for an integer ``index`` of any shape, whose backward is deterministic on the CPU with several
    threads: the backward of ``x[index]`` accumulates repeated rows (the same negative drawn twice) in a
    thread-dependent order, ``index_select``'s does not. (On CUDA both use atomics: ``train.deterministic``.)"""
    return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])


def gather_pool(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``x [n, ...]`` over all ranks (ranks may differ in n) -> (pool, offset of this rank's rows).

    Other ranks' rows carry no gradient; this rank's rows are ``x`` itself, so its gradient flows. Without an
    initialised process group this returns ``(x, 0)``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = x.detach().new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:n] for p, n in zip(parts, counts)]
    parts[rank] = x
    return torch.cat(parts), sum(counts[:rank])


def swap_permutation(batch: int, swap_prob: float, generator: torch.Generator | None) -> Tensor:
    """CPU int64 ``[batch]``: ``perm[i]`` is the sample whose audio sample i gets; ``perm[i] != i`` for the swapped.

    Each sample is chosen with ``swap_prob``; the chosen ones get a derangement (one random cycle), so a swapped
    sample never keeps its own audio. A single chosen sample gets a random partner; a batch of 1 is never swapped.
    """
    perm = torch.arange(batch)
    if batch < 2 or swap_prob == 0:
        return perm
    chosen = torch.nonzero(torch.rand(batch, generator=generator) < swap_prob).flatten()
    if chosen.numel() == 1:
        others = torch.cat([torch.arange(0, int(chosen)), torch.arange(int(chosen) + 1, batch)])
        chosen = torch.cat([chosen, others[torch.randint(others.numel(), (1,), generator=generator)]])
    if chosen.numel() >= 2:
        cycle = chosen[torch.randperm(chosen.numel(), generator=generator)]
        perm[cycle] = cycle.roll(-1)
    return perm


def choose_masked(valid: Tensor, ratio: float, generator: torch.Generator | None) -> Tensor:
    """Bool ``[B, T]`` (CPU): ``round(ratio * real clips)`` (at least 1) random real clips of each sequence."""
    b, t = valid.shape
    n_mask = (valid.sum(1).double() * ratio).round().long().clamp_min(1)
    scores = torch.rand(b, t, generator=generator).masked_fill(~valid, 2.0)  # padding is never chosen
    rank = scores.argsort(1).argsort(1)
    return rank < n_mask[:, None]


class Pretraining(nn.Module):
    """AVBERT pretraining: ``forward(video, audio, clip_mask=None, generator=None) -> PretrainingOutput``.

    Heads: a learned mask embedding per modality, an MEP head per (Transformer, target modality), and the CPP
    classifier (2-layer MLP on the BOS outputs). All randomness (swaps, masks, negative seeds) is drawn from
    ``generator`` (a CPU ``torch.Generator``; the global RNG if None), so a run is reproducible from its state.
    """

    def __init__(self, model: AVBert, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        d, eps = model.cfg.dim, model.cfg.ln_eps
        self.has_unimodal = "visual" in model.transformers
        self.has_multimodal = "multimodal" in model.transformers
        self.cpp_input = cfg.cpp_input if cfg.cpp_input != "auto" else ("multimodal" if self.has_multimodal else "unimodal")
        if self.cpp_input == "multimodal" and not self.has_multimodal or self.cpp_input == "unimodal" and not self.has_unimodal:
            raise ValueError(
                f"objective.cpp_input={cfg.cpp_input!r} needs a {self.cpp_input} Transformer; model.fusion={model.cfg.fusion!r} has none"
            )
        self.mask_embedding = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * model.cfg.init_std) for m in ("visual", "audio")})
        heads = {}
        for m in ("visual", "audio"):
            if self.has_unimodal:
                heads[m] = MEPHead(d, eps)
            if self.has_multimodal:
                heads[f"multimodal_{m}"] = MEPHead(d, eps)
        self.mep_heads = nn.ModuleDict(heads)
        self.cpp_head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))

    # -- masking -------------------------------------------------------------------------------------------------
    def mask_tokens(self, tokens: Tensor, valid: Tensor, modality: str, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(tokens with the 80/10/10 rule applied at the masked clips, masked bool [B, T] on the tokens' device)."""
        b, t, _ = tokens.shape
        masked = choose_masked(valid.cpu(), self.cfg.mask_ratio, generator)
        rule = torch.rand(b, t, generator=generator)
        use_mask = masked & (rule < self.cfg.mask_token)
        use_other = masked & (rule >= self.cfg.mask_token) & (rule < self.cfg.mask_token + self.cfg.mask_random)
        out = tokens.clone()
        out[use_mask.to(tokens.device)] = self.mask_embedding[modality].to(tokens.dtype)
        if use_other.any():
            real = torch.nonzero(valid.cpu().flatten()).flatten()
            own = torch.nonzero(use_other.flatten()).flatten()
            if real.numel() > 1:  # another real clip of the batch, never the clip itself
                pick = torch.randint(real.numel() - 1, (own.numel(),), generator=generator)
                own_pos = torch.searchsorted(real, own)
                other = real[pick + (pick >= own_pos).long()]
                flat = out.view(b * t, -1)
                flat[own.to(tokens.device)] = tokens.reshape(b * t, -1).index_select(0, other.to(tokens.device))  # see _rows
        return out, masked.to(tokens.device)

    # -- MEP -----------------------------------------------------------------------------------------------------
    def _negatives(
        self, anchors_local: Tensor, sample_feats: Tensor, tokens: Tensor, valid: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Candidate pool and K negatives for the masked clips of one modality.

        Returns (pool tokens [Np, D] (this rank's rows with gradient), negative indices [Na, K] into the pool
        (-1 = none), global pool row of each anchor [Na]). ``anchors_local`` are local row ids of the anchors.
        """
        b, t = valid.shape
        local_tokens = tokens[valid]  # [n_local, D], the real clips in (b, t) order
        # non-finite features would make the sampler refuse the batch inside the forward; the loss still turns
        # non-finite through the tokens, so the trainer counts and skips the step as it does for any other
        local_feats = torch.nan_to_num(sample_feats[valid].detach(), nan=0.0, posinf=0.0, neginf=0.0)
        seq = torch.arange(b, device=tokens.device)[:, None].expand(b, t)[valid]
        pool_tokens, offset = gather_pool(local_tokens)
        pool_feats, _ = gather_pool(local_feats)
        batch_sizes, _ = gather_pool(torch.tensor([b], device=tokens.device))  # [world]
        pool_group, _ = gather_pool(seq + batch_sizes[: _rank()].sum())  # sequence ids unique across ranks
        anchor_rows = anchors_local + offset
        neg = sample_negatives(
            pool_feats[anchor_rows],
            pool_feats,
            self.cfg.negatives,
            mode=self.cfg.sampling,
            trim=self.cfg.trim,
            anchor_index=anchor_rows,
            group=pool_group,
            generator=generator,
            backend=self.cfg.sampling_backend,
        )
        return pool_tokens, neg, anchor_rows

    @staticmethod
    def _infonce(head: MEPHead, outputs: Tensor, pool_tokens: Tensor, anchor_rows: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        """InfoNCE over the positive (column 0) and the negatives; -1 negatives are masked. -> (loss, accuracy)."""
        q = head.query(outputs)
        pos = (q * _rows(pool_tokens, anchor_rows)).sum(-1, keepdim=True)
        negs = torch.einsum("nd,nkd->nk", q, _rows(pool_tokens, neg.clamp_min(0))).masked_fill(neg < 0, float("-inf"))
        logits = torch.cat([pos, negs], dim=1).float()
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(1) == 0).float().mean()
        return loss, acc

    def cpp_logits(self, enc: EncoderOutput) -> Tensor:
        """CPP logits ``[B]`` float32 (> 0: the audio sequence is the visual one's) from ``model.encode``'s output."""
        if self.cpp_input == "multimodal":
            t = (enc.multimodal.shape[1] - 2) // 2  # [BOS_v, T visual, BOS_a, T audio]
            bos = torch.cat([enc.multimodal[:, 0], enc.multimodal[:, 1 + t]], dim=1)
        else:
            bos = torch.cat([enc.visual[:, 0], enc.audio[:, 0]], dim=1)
        return self.cpp_head(bos).squeeze(1).float()

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(
        self, video: Tensor, audio: Tensor, clip_mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> PretrainingOutput:
        model, cfg = self.model, self.cfg
        b, t = video.shape[:2]
        if audio.shape[:2] != (b, t):
            raise ValueError(f"video and audio must have the same [B, T], got {(b, t)} and {tuple(audio.shape[:2])}")
        valid = clip_mask if clip_mask is not None else torch.ones(b, t, dtype=torch.bool, device=video.device)
        v_feat, v_tok = model.embed_visual(video, clip_mask, generator)
        a_feat, a_tok = model.embed_audio(audio, clip_mask, generator)

        perm = swap_permutation(b, cfg.swap_prob, generator).to(video.device)
        matched = perm == torch.arange(b, device=video.device)
        a_feat, a_tok, a_valid = a_feat[perm], a_tok[perm], valid[perm]

        feats = {"visual": v_feat, "audio": a_feat} if cfg.sampling_space == "features" else {"visual": v_tok, "audio": a_tok}
        tokens, valids = {"visual": v_tok, "audio": a_tok}, {"visual": valid, "audio": a_valid}
        masked_in, masked = {}, {}
        for m in ("visual", "audio"):
            masked_in[m], masked[m] = self.mask_tokens(tokens[m], valids[m], m, generator)
        enc = model.encode(
            masked_in["visual"], masked_in["audio"], None if clip_mask is None else valid, None if clip_mask is None else a_valid
        )

        weights = {"visual": cfg.mep_visual, "audio": cfg.mep_audio, "multimodal": cfg.mep_multimodal}
        metrics: dict[str, Tensor] = {}
        total = v_tok.new_zeros(())
        mm_losses, mm_accs, mm_counts = [], [], []
        for half, m in enumerate(("visual", "audio")):
            # local row of every real clip, for the anchors (masked clips) in (b, t) order
            row_of = torch.cumsum(valids[m].flatten().long(), 0).view(b, t) - 1
            anchors = row_of[masked[m]]
            pool_tokens, neg, anchor_rows = self._negatives(anchors, feats[m], tokens[m], valids[m], generator)
            bi, ti = torch.nonzero(masked[m], as_tuple=True)
            if self.has_unimodal:
                unimodal = enc.visual if m == "visual" else enc.audio
                loss, acc = self._infonce(self.mep_heads[m], unimodal[bi, 1 + ti], pool_tokens, anchor_rows, neg)
                metrics[f"mep_{m}_loss"], metrics[f"mep_{m}_acc"] = loss.detach(), acc.detach()
                total = total + weights[m] * loss
            if self.has_multimodal:
                keep = matched[bi]  # MEP on the multimodal Transformer: matched pairs only
                if keep.any():
                    out = enc.multimodal[bi[keep], half * (1 + t) + 1 + ti[keep]]
                    loss, acc = self._infonce(self.mep_heads[f"multimodal_{m}"], out, pool_tokens, anchor_rows[keep], neg[keep])
                    mm_losses.append(loss)
                    mm_accs.append(acc.detach())
                    mm_counts.append(int(keep.sum()))
                elif dist.is_available() and dist.is_initialized():
                    # no matched pair in this rank's batch: the multimodal Transformer's output (which the CPP may not read,
                    # objective.cpp_input=unimodal) and the head still take part, with a zero, since DDP needs every
                    # parameter in every backward (else find_unused_parameters: an extra graph pass every step)
                    head = self.mep_heads[f"multimodal_{m}"]
                    total = total + 0.0 * (enc.multimodal.sum() + sum(p.sum() for p in head.parameters()))
        if mm_losses:
            loss = sum(mm_losses) / len(mm_losses)
            metrics["mep_multimodal_loss"] = loss.detach()
            metrics["mep_multimodal_acc"] = sum(a * n for a, n in zip(mm_accs, mm_counts)) / sum(mm_counts)
            total = total + weights["multimodal"] * loss

        logit = self.cpp_logits(enc)
        label = matched.float()
        cpp_loss = F.binary_cross_entropy_with_logits(logit, label)
        metrics["cpp_loss"] = cpp_loss.detach()
        metrics["cpp_acc"] = ((logit > 0).float() == label).float().mean()
        metrics["cpp_swapped"] = (~matched).float().mean()
        total = total + cfg.cpp * cpp_loss
        metrics["loss"] = total.detach()
        return PretrainingOutput(loss=total, metrics=metrics)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
