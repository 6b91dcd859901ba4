"""Benchmark support: memory of a training step per sharing scheme (:mod:`avmt.bench.memory`), the largest batch
that fits (:mod:`avmt.bench.search`) and the report (``python -m avmt.bench report``, :mod:`avmt.bench.report`)."""

from __future__ import annotations

import torch
from torch import Tensor

from avmt.config import DataConfig


def random_clips(data: DataConfig, batch: int, device: torch.device | str, clips: int | None = None) -> tuple[Tensor, Tensor]:
    """Random inputs of a training step: video ``[batch, T, 3, frames, crop, crop]`` and log-mel audio
    ``[batch, T, 1, n_mels, mel_frames]``, float32 on ``device``; ``T = clips`` or ``data.num_clips``."""
    t = clips if clips is not None else data.num_clips
    video = torch.randn(batch, t, 3, data.frames, data.crop_size, data.crop_size, device=device)
    audio = torch.randn(batch, t, 1, data.n_mels, data.mel_frames, device=device)
    return video, audio
