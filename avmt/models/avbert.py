"""The AVBERT model (docs/method.md §1-2): per-clip CNNs, then visual, audio and multimodal Transformers.

Layout of the inputs (one sample = a sequence of T time-aligned clips):

- ``video [B, T, 3, F, H, W]`` float, ``audio [B, T, 1, n_mels, frames]`` float (log-mel);
- ``clip_mask [B, T]`` bool, optional: True for real clips, False for padding when T varies in a batch.

Sharing is explicit: the model owns its *unique* Transformer layers in ``self.layers`` and a plan maps
each Transformer to the layer indices it applies, e.g. ``lowrank``/``all`` in mid fusion::

    plan = {"visual": (0,)*6, "audio": (0,)*6, "multimodal": (0,)*6}    # one layer, 18 applications

so shared weights are the same tensors by construction and appear once in ``state_dict()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from avmt.config import ModelConfig, TrainConfig
from avmt.models.cnn import AudioResNet, VisualResNet
from avmt.models.transformer import RotationCache, SequenceEmbedding, TransformerLayer

# The Transformers of each fusion mode, in the order of their low-rank modality group index.
TRANSFORMERS: dict[str, tuple[str, ...]] = {
    "mid": ("visual", "audio", "multimodal"),
    "late": ("visual", "audio"),
    "early": ("multimodal",),
}


def layer_plan(sharing: str, fusion: str, layers: int) -> tuple[int, dict[str, tuple[int, ...]]]:
    """(number of unique layers, {transformer: layer index per depth}) for a sharing scheme."""
    names = TRANSFORMERS[fusion]
    if sharing == "none":
        return len(names) * layers, {n: tuple(range(i * layers, (i + 1) * layers)) for i, n in enumerate(names)}
    if sharing == "layers":
        return len(names), {n: (i,) * layers for i, n in enumerate(names)}
    if sharing in ("all", "lowrank"):
        return 1, {n: (0,) * layers for n in names}
    raise ValueError(f"unknown sharing scheme {sharing!r}")


@dataclass
class EncoderOutput:
    """Transformer outputs; a field is None when the fusion mode has no such Transformer.

    ``visual``/``audio``: ``[B, 1+T, D]`` unimodal outputs ``y_0..y_T`` (index 0 is the BOS token).
    ``multimodal``: ``[B, 2(1+T), D]``: the visual half ``m^v_0..m^v_T`` then the audio half ``m^a_0..m^a_T``.
    Outputs at padded clip positions (``clip_mask`` False) are unspecified.
    """

    visual: Tensor | None
    audio: Tensor | None
    multimodal: Tensor | None


@dataclass
class AVBertOutput(EncoderOutput):
    """Everything the objectives need, from one forward of :class:`AVBert`.

    ``visual_features [B, T, 32*visual_width]`` / ``audio_features [B, T, 32*audio_width]``: pooled CNN
    features. ``visual_embeddings`` / ``audio_embeddings [B, T, D]``: the clip tokens x_t after the input
    projection + LayerNorm (the MEP targets). Padded clips (``clip_mask`` False) hold zeros in all four.
    """

    visual_features: Tensor | None = None
    audio_features: Tensor | None = None
    visual_embeddings: Tensor | None = None
    audio_embeddings: Tensor | None = None
    clip_mask: Tensor | None = None


class FeatureBatchNorm(nn.BatchNorm1d):
    """Standardise pooled CNN features ``[N, C]`` per channel over the N clips (no affine parameters).

    A single clip in training mode (nothing to take statistics over) is normalised with the running statistics.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)
        return super().forward(x)


class InputProjection(nn.Module):
    """(optional feature BatchNorm) + Linear + LayerNorm from a CNN feature ``[N, C]`` to a clip token ``[N, D]``."""

    def __init__(self, cin: int, dim: int, ln_eps: float, init_std: float, feature_norm: str = "none") -> None:
        super().__init__()
        self.norm = FeatureBatchNorm(cin) if feature_norm == "batchnorm" else nn.Identity()
        self.linear = nn.Linear(cin, dim)
        self.ln = nn.LayerNorm(dim, eps=ln_eps)
        nn.init.normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(self.linear(self.norm(x)))


class CNNRunner:
    """How a per-clip CNN runs over the ``N`` real clips of a batch (``train.cnn_chunk``, ``train.cnn_checkpoint``,
    ``train.clips_with_grad``; the defaults run every clip at once, with gradients, as a plain forward).

    - ``chunk > 0``: the clips go through the CNN ``chunk`` at a time. BatchNorm then normalises each chunk with
      that chunk's own statistics (not those of all N clips) and updates its running statistics once per chunk;
      small chunks cost accuracy (docs/experiments.md, 2026-12-01).
    - ``checkpoint``: each chunk (or the whole set) keeps only its input and output; its activations are recomputed
      in backward (non-reentrant ``torch.utils.checkpoint``, RNG state preserved). The recompute does not touch the
      BatchNorm running statistics: they are restored to their value before it, so they move once per forward.
    - ``clips_with_grad = K > 0``: in training with gradients, K clips per sequence (drawn with ``generator``) run
      with gradients and the others without; all tokens still feed the Transformers. The two groups are separate
      CNN calls, so BatchNorm normalises each group with its own statistics and updates its running statistics
      once per group; the MEP targets of the clips without gradients (their own tokens) are constants for the
      CNN. Sequences with fewer than K real clips run all of theirs with gradients.
    - ``channels_last``: the clips enter the CNN in channels-last layout (``channels_last_3d`` for video), to match
      weights converted by :meth:`AVBert.set_memory_options`; an experiment for bf16 convolutions on GPUs, measured by
      the GPU check's ``cnn_options`` part (docs/training.md).
    """

    def __init__(self, chunk: int = 0, checkpoint: bool = False, clips_with_grad: int = 0, channels_last: bool = False) -> None:
        if chunk < 0 or clips_with_grad < 0:
            raise ValueError(f"chunk and clips_with_grad must be >= 0, got {chunk} and {clips_with_grad}")
        self.chunk, self.checkpoint, self.clips_with_grad, self.channels_last = chunk, checkpoint, clips_with_grad, channels_last

    def __call__(self, cnn: nn.Module, clips: Tensor, mask: Tensor | None, generator: torch.Generator | None, b: int, t: int) -> Tensor:
        """``clips [N, ...]``: the real clips of a ``[b, t]`` batch in order (``mask [b, t]``, or None when every clip
        is real) -> features ``[N, C]``."""
        if not (self.clips_with_grad and cnn.training and torch.is_grad_enabled()):
            return self._run(cnn, clips)
        full = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=clips.device)
        chosen = _choose_clips(full, self.clips_with_grad, generator)
        with_grad = chosen.flatten() if mask is None else chosen[mask]  # [N] bool, in the order of clips
        # without padding the count is known without reading the device (no sync; works on fake tensors too)
        n_grad = b * min(self.clips_with_grad, t) if mask is None else int(with_grad.sum())
        order = with_grad.to(torch.int8).argsort(descending=True, stable=True)
        idx_grad, idx_rest = order[:n_grad], order[n_grad:]
        feats_grad = self._run(cnn, clips[idx_grad])
        with torch.no_grad():
            feats_rest = self._run(cnn, clips[idx_rest])
        out = feats_grad.new_empty(clips.shape[0], feats_grad.shape[1])
        return out.index_copy(0, idx_grad, feats_grad).index_copy(0, idx_rest, feats_rest.to(feats_grad.dtype))

    def _run(self, cnn: nn.Module, clips: Tensor) -> Tensor:
        if clips.shape[0] == 0:  # e.g. every clip of the batch drew "with gradients"
            return clips.new_zeros(0, cnn.out_features, dtype=clips.dtype if clips.is_floating_point() else torch.float32)
        if self.channels_last and clips.dim() in (4, 5):
            clips = clips.contiguous(memory_format=torch.channels_last if clips.dim() == 4 else torch.channels_last_3d)
        parts = clips.split(self.chunk) if self.chunk else (clips,)
        recompute = self.checkpoint and torch.is_grad_enabled()
        return torch.cat([checkpoint(_ForwardOnceBN(cnn), part, use_reentrant=False) if recompute else cnn(part) for part in parts])


class _ForwardOnceBN:
    """``cnn(x)`` whose second and later calls (the checkpoint's recompute in backward) leave every BatchNorm's running
    statistics as they were, so that they move once per real forward."""

    def __init__(self, cnn: nn.Module) -> None:
        self.cnn, self.calls = cnn, 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == 1:
            return self.cnn(x)
        bns = [m for m in self.cnn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
        try:
            return self.cnn(x)
        finally:  # also when the checkpoint stops the recompute early (it raises once it has what backward needs)
            with torch.no_grad():
                for m, (mean, var, count) in zip(bns, saved):
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)


def _choose_clips(mask: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """``[B, T]`` bool: k of each sequence's real clips (``mask``), uniformly at random (all of them if fewer)."""
    scores = torch.rand(mask.shape, generator=generator).to(mask.device)  # a CPU generator, as elsewhere
    scores = scores.masked_fill(~mask, 2.0)  # padding never chosen
    rank = scores.argsort(dim=1).argsort(dim=1)
    return (rank < k) & mask


class AVBert(nn.Module):
    """AVBERT: ``forward(video, audio, clip_mask=None) -> AVBertOutput``.

    ``embed_visual``/``embed_audio`` (CNN + projection) and ``encode`` (the Transformers) are public so an
    objective can alter the clip tokens in between (masking, swapping audio) without touching the model.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.visual_cnn = VisualResNet(
            cfg.visual_width, cfg.visual_depths, cfg.visual_temporal_kernels, bn_eps=cfg.bn_eps, zero_init_residual=cfg.zero_init_residual
        )
        self.audio_cnn = AudioResNet(
            cfg.audio_width, cfg.audio_depths, cfg.audio_separable_stages, bn_eps=cfg.bn_eps, zero_init_residual=cfg.zero_init_residual
        )
        self.visual_proj = InputProjection(self.visual_cnn.out_features, d, cfg.ln_eps, cfg.init_std, cfg.feature_norm)
        self.audio_proj = InputProjection(self.audio_cnn.out_features, d, cfg.ln_eps, cfg.init_std, cfg.feature_norm)
        self.visual_bos = nn.Parameter(torch.randn(d) * cfg.init_std)
        self.audio_bos = nn.Parameter(torch.randn(d) * cfg.init_std)

        self.checkpoint_layers = False  # recompute each Transformer layer in backward (set by the trainer)
        self.cnn = CNNRunner()  # how the per-clip CNNs run: chunks, recompute, clips with gradients (set by the trainer)
        self.transformers = TRANSFORMERS[cfg.fusion]
        n_layers, self.plan = layer_plan(cfg.sharing, cfg.fusion, cfg.layers)
        lowrank = cfg.sharing == "lowrank"
        self.layers = nn.ModuleList(
            TransformerLayer(
                d,
                cfg.heads,
                cfg.ffn_dim,
                dropout=cfg.dropout,
                attention_dropout=cfg.attention_dropout,
                ln_eps=cfg.ln_eps,
                init_std=cfg.init_std,
                lowrank=lowrank,
                rank=cfg.rank,
                groups=len(self.transformers),
                lowrank_eps=cfg.lowrank_eps,
                kernel=cfg.kernel,
                kernel_backward=cfg.kernel_backward,
            )
            for _ in range(n_layers)
        )
        # one embedding module per Transformer; the multimodal one adds a modality (type) embedding
        self.embeddings = nn.ModuleDict(
            {
                name: SequenceEmbedding(
                    cfg.max_clips + 1, d, 2 if name == "multimodal" else 0, ln_eps=cfg.ln_eps, dropout=cfg.dropout, init_std=cfg.init_std
                )
                for name in self.transformers
            }
        )

    def set_memory_options(self, train: TrainConfig) -> AVBert:
        """What trades compute for memory in training, from the ``train`` config: ``activation_checkpointing``
        (recompute the Transformer layers), ``cnn_chunk`` / ``cnn_checkpoint`` / ``clips_with_grad`` (how the per-clip
        CNNs run, :class:`CNNRunner`) and ``cnn_channels_last`` (the CNNs' weights and inputs in channels-last memory
        layout). Returns ``self``."""
        self.checkpoint_layers = train.activation_checkpointing
        self.cnn = CNNRunner(train.cnn_chunk, train.cnn_checkpoint, train.clips_with_grad, train.cnn_channels_last)
        if train.cnn_channels_last:
            self.visual_cnn.to(memory_format=torch.channels_last_3d)
            self.audio_cnn.to(memory_format=torch.channels_last)
        return self

    # -- parts, for parameter accounting -----------------------------------------------------------------
    def parts(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        """The model split into the parts the paper counts separately; every parameter is in exactly one."""
        return {
            "transformer": [self.layers],
            "cnn": [self.visual_cnn, self.audio_cnn],
            "projection": [self.visual_proj, self.audio_proj],
            "embedding": [self.embeddings, self.visual_bos, self.audio_bos],
        }

    def transformer_layers(self, name: str) -> list[TransformerLayer]:
        """The layer objects the Transformer ``name`` applies, in order (shared layers repeat)."""
        return [self.layers[i] for i in self.plan[name]]

    # -- clip tokens ---------------------------------------------------------------------------------------
    def _per_clip(
        self, cnn: nn.Module, proj: nn.Module, clips: Tensor, clip_mask: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Run ``cnn`` on the real clips of ``clips [B, T, ...]``; returns features [B,T,C] and tokens [B,T,D]."""
        b, t = clips.shape[:2]
        flat = clips.flatten(0, 1) if clip_mask is None else clips[clip_mask]
        feats = self.cnn(cnn, flat, clip_mask, generator, b, t)
        tokens = proj(feats)
        if clip_mask is None:
            return feats.unflatten(0, (b, t)), tokens.unflatten(0, (b, t))
        feats_full = feats.new_zeros(b, t, feats.shape[-1]).masked_scatter(clip_mask[..., None], feats)
        tokens_full = tokens.new_zeros(b, t, tokens.shape[-1]).masked_scatter(clip_mask[..., None], tokens)
        return feats_full, tokens_full

    def embed_visual(
        self, video: Tensor, clip_mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``video [B, T, 3, F, H, W]`` uint8 RGB (normalised on its device, per CNN chunk) or float already normalised
        -> (features ``[B, T, 32*visual_width]``, tokens ``[B, T, D]``). ``generator``
        draws the clips that get gradients when ``self.cnn.clips_with_grad`` is set (default: the global RNG)."""
        _check_clips("video", video, 6, "[B, T, 3, frames, height, width]", 3, self.cfg.max_clips, clip_mask)
        return self._per_clip(self.visual_cnn, self.visual_proj, video, clip_mask, generator)

    def embed_audio(
        self, audio: Tensor, clip_mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``audio [B, T, 1, n_mels, frames]`` -> (features ``[B, T, 32*audio_width]``, tokens ``[B, T, D]``)."""
        _check_clips("audio", audio, 5, "[B, T, 1, n_mels, frames]", 1, self.cfg.max_clips, clip_mask)
        return self._per_clip(self.audio_cnn, self.audio_proj, audio, clip_mask, generator)

    # -- Transformers --------------------------------------------------------------------------------------
    def _run(self, name: str, h: Tensor, positions: Tensor, types: Tensor | None, key_mask: Tensor | None, cache: RotationCache) -> Tensor:
        h = self.embeddings[name](h, positions, types)
        group = self.transformers.index(name)
        for layer in self.transformer_layers(name):
            if self.checkpoint_layers and torch.is_grad_enabled():
                h = checkpoint(layer, h, group, key_mask, cache, use_reentrant=False)
            else:
                h = layer(h, group, key_mask, cache)
        return h

    def _with_bos(self, bos: Tensor, tokens: Tensor) -> Tensor:
        return torch.cat([bos.to(tokens.dtype).expand(tokens.shape[0], 1, -1), tokens], dim=1)

    def encode(
        self, visual_tokens: Tensor, audio_tokens: Tensor, clip_mask: Tensor | None = None, audio_clip_mask: Tensor | None = None
    ) -> EncoderOutput:
        """Run the Transformers on clip tokens ``[B, T, D]`` (both modalities, same B and T).

        ``clip_mask [B, T]`` marks the real clips; ``audio_clip_mask`` overrides it for the audio tokens (when
        an objective pairs a video with another sample's audio).
        """
        if visual_tokens.shape != audio_tokens.shape or visual_tokens.dim() != 3 or visual_tokens.shape[-1] != self.cfg.dim:
            raise ValueError(
                f"visual and audio tokens must both be [B, T, {self.cfg.dim}], "
                f"got {tuple(visual_tokens.shape)} and {tuple(audio_tokens.shape)}"
            )
        b, t, _ = visual_tokens.shape
        device = visual_tokens.device
        pos = torch.arange(t + 1, device=device)
        if audio_clip_mask is None:
            audio_clip_mask = clip_mask
        elif clip_mask is None:
            clip_mask = torch.ones_like(audio_clip_mask)
        v_mask = a_mask = None
        if clip_mask is not None:  # BOS is always a real token
            v_mask = torch.cat([clip_mask.new_ones(b, 1), clip_mask], dim=1)
            a_mask = torch.cat([clip_mask.new_ones(b, 1), audio_clip_mask], dim=1)
        cache = RotationCache()  # R_m of the shared low-rank maps: materialised once for this whole forward
        v_seq = self._with_bos(self.visual_bos, visual_tokens)
        a_seq = self._with_bos(self.audio_bos, audio_tokens)
        y_v = y_a = m = None
        if "visual" in self.transformers:
            y_v = self._run("visual", v_seq, pos, None, v_mask, cache)
            y_a = self._run("audio", a_seq, pos, None, a_mask, cache)
        if "multimodal" in self.transformers:
            # mid fusion: the unimodal outputs; early fusion: the BOS-prefixed clip tokens themselves
            joint = torch.cat([y_v, y_a] if y_v is not None else [v_seq, a_seq], dim=1)
            types = torch.arange(2, device=device).repeat_interleave(t + 1)
            joint_mask = None if v_mask is None else torch.cat([v_mask, a_mask], dim=1)
            m = self._run("multimodal", joint, pos.repeat(2), types, joint_mask, cache)  # audio positions restart at 0
        return EncoderOutput(visual=y_v, audio=y_a, multimodal=m)

    def forward(self, video: Tensor, audio: Tensor, clip_mask: Tensor | None = None) -> AVBertOutput:
        if video.shape[:2] != audio.shape[:2]:
            raise ValueError(f"video and audio must have the same [B, T], got {tuple(video.shape[:2])} and {tuple(audio.shape[:2])}")
        v_feat, v_tok = self.embed_visual(video, clip_mask)
        a_feat, a_tok = self.embed_audio(audio, clip_mask)
        enc = self.encode(v_tok, a_tok, clip_mask)
        return AVBertOutput(
            visual=enc.visual,
            audio=enc.audio,
            multimodal=enc.multimodal,
            visual_features=v_feat,
            audio_features=a_feat,
            visual_embeddings=v_tok,
            audio_embeddings=a_tok,
            clip_mask=clip_mask,
        )


def _check_clips(name: str, x: Tensor, ndim: int, layout: str, channels: int, max_clips: int, clip_mask: Tensor | None) -> None:
    if x.dim() != ndim or x.shape[2] != channels:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or (name == "video" and x.dtype == torch.uint8)):
        raise ValueError(f"{name} must be a floating-point tensor{' or uint8 RGB' if name == 'video' else ''}, got {x.dtype}")
    b, t = x.shape[:2]
    if not 1 <= t <= max_clips:
        raise ValueError(f"{name} has T={t} clips; this model accepts 1..{max_clips} (model.max_clips)")
    if clip_mask is not None:
        if clip_mask.dtype != torch.bool or tuple(clip_mask.shape) != (b, t):
            raise ValueError(f"clip_mask must be a bool tensor of shape [B, T] = {(b, t)}, got {clip_mask.dtype} {tuple(clip_mask.shape)}")
        if not bool(clip_mask.any(dim=1).all()):
            raise ValueError("clip_mask has a sample with no real clip; every sample needs at least one")
