"""The optimiser, the learning-rate schedule and the precision rule of a training step: shared by the trainer,
the fine-tuning protocol and the benchmarks, which import them without importing the trainer."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from avmt.config import TrainConfig


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine down to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params: Iterable[torch.nn.Parameter], tc: TrainConfig) -> torch.optim.AdamW:
    """The paper's optimizer (docs/method.md §6): AdamW, with AMSGrad when ``train.amsgrad`` (3 state buffers per parameter)."""
    return torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay, amsgrad=tc.amsgrad)


def build_scheduler(opt: torch.optim.Optimizer, tc: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine (:func:`lr_factor`) over ``train.max_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))


def use_bf16(tc: TrainConfig, device: torch.device) -> bool:
    """Whether a training step runs under bf16 autocast: ``train.precision=bf16``, or ``auto`` on a CUDA device."""
    return tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
