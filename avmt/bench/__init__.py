"""Benchmark support: memory of a training step per sharing scheme (:mod:`avmt.bench.memory`), the largest batch
that fits (:mod:`avmt.bench.search`), the one-shot GPU check (``python -m avmt.bench gpu``, :mod:`avmt.bench.gpu`)
and the report (``python -m avmt.bench report``, :mod:`avmt.bench.report`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from avmt.config import Config, DataConfig


def random_clips(data: DataConfig, batch: int, device: torch.device | str, clips: int | None = None) -> tuple[Tensor, Tensor]:
    """Random inputs of a training step as the loaders give them: video ``[batch, T, 3, frames, crop, crop]`` uint8 RGB
    and log-mel audio ``[batch, T, 1, n_mels, mel_frames]`` float32, on ``device``; ``T = clips`` or
    ``data.num_clips``."""
    t = clips if clips is not None else data.num_clips
    video = torch.randint(0, 256, (batch, t, 3, data.frames, data.crop_size, data.crop_size), dtype=torch.uint8, device=device)
    audio = torch.randn(batch, t, 1, data.n_mels, data.mel_frames, device=device)
    return video, audio


class TrainingStep(NamedTuple):
    """A fresh model, its objectives and optimizer, and ``step()``, from :func:`training_step`."""

    step: Callable[[], Tensor]
    model: torch.nn.Module
    pretraining: torch.nn.Module
    optimizer: torch.optim.Optimizer


def training_step(cfg: Config, batch: int, device: torch.device | str, seed: int = 0) -> TrainingStep:
    """The step ``avmt.train`` runs per batch, on random clips of the config's shape: ``Pretraining`` forward under
    bf16 autocast when training would use it, backward, ``AdamW.step()``, ``zero_grad``, with the config's memory
    options (``train.activation_checkpointing``, ``train.cnn_*``, ``train.clips_with_grad``). ``step()`` returns the
    detached loss (``float()`` of it waits for a GPU); it also works on fake tensors (``FakeTensorMode``)."""
    from avmt.models import AVBert
    from avmt.objectives import Pretraining
    from avmt.optim import build_optimizer, use_bf16

    device = torch.device(device)
    torch.manual_seed(seed)
    tc = cfg.train
    with device:
        model = AVBert(cfg.model).set_memory_options(tc)
        pre = Pretraining(model, cfg.objective)
    pre.train()
    opt = build_optimizer(pre.parameters(), tc)
    gen = torch.Generator().manual_seed(seed)
    video, audio = random_clips(cfg.data, batch, device)
    bf16 = use_bf16(tc, device)

    def step() -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = pre(video, audio, generator=gen).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return TrainingStep(step, model, pre, opt)
