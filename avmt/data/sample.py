"""What both loaders do per sample, in one place: the sequence and crop plan of a record, its audio windows, and
the retry-and-replace loop (a sample that fails is logged, counted and replaced by another row drawn from a seeded
generator; ``max_retries`` failures in a row raise :class:`SampleError`, naming the last error)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from avmt.config import DataConfig
from avmt.data.clips import CropPlan, SequencePlan, View, plan_crop, plan_sequence, sample_rng
from avmt.data.manifest import Record, modalities_of
from avmt.data.media import read_audio

log = logging.getLogger("avmt.data")

T = TypeVar("T")


def plan_sample(
    rec: Record, cfg: DataConfig, train: bool, rng: np.random.Generator | None, view: View | None = None
) -> tuple[SequencePlan, CropPlan | None]:
    """The sequence and crop plan of manifest record ``rec`` (the same in both loaders for the same rng and view).
    A record without video has no crop plan (None); its frame grid is a nominal one at ``data.fps``, unused."""
    has_video = "video" in modalities_of(rec)
    fps = rec["fps"] if has_video else cfg.fps
    frames = rec["num_frames"] if has_video else max(1, math.ceil(rec["duration"] * fps))
    span = (rec.get("start", 0.0), rec.get("end"))
    seq = plan_sequence(cfg, rec["duration"], fps, frames, train, rng, span, view)
    crop = plan_crop(cfg, rec["height"], rec["width"], train, rng, view) if has_video else None
    return seq, crop


def load_audio_clips(rec: Record, plan: SequencePlan, sample_rate: int) -> np.ndarray:
    """The T audio windows of ``plan`` from the record's audio side-car: ``[T, audio_length]`` float32.

    One seek + one contiguous read covering all windows, then slicing (clips of a sequence are close)."""
    if rec["sample_rate"] != sample_rate:
        raise ValueError(f"{rec['audio']} was prepared at {rec['sample_rate']} Hz but data.sample_rate={sample_rate}: re-run prepare")
    lo = int(plan.audio_starts.min())
    hi = int(plan.audio_starts.max()) + plan.audio_length
    wave = read_audio(rec["audio"], lo, hi - lo)
    return np.stack([wave[s - lo : s - lo + plan.audio_length] for s in plan.audio_starts])


class SampleError(RuntimeError):
    """A sample and every replacement drawn for it failed to load (raised where the sample is loaded: a DataLoader
    worker, DALI's host thread)."""


def replacement_index(seed: int, epoch: int, i: int, attempt: int, n: int) -> int:
    """The row that replaces row ``i``'s ``attempt``-th failure (seeded: the same in every worker and loader)."""
    return int(np.random.default_rng([seed, epoch, i, attempt, 1]).integers(n))


def load_with_retries(
    load: Callable[[int, np.random.Generator | None], T],
    i: int,
    records: Sequence[Record],
    seed: int,
    epoch: int,
    train: bool,
    max_retries: int,
) -> tuple[T, int]:
    """``load(row, rng)`` for sample ``i``, replacing failing rows; returns (its result, how many attempts failed).
    ``rng`` is ``sample_rng(seed, epoch, i, attempt)`` in training (None in eval mode)."""
    idx, last_error = i, None
    for attempt in range(max_retries):
        rng = sample_rng(seed, epoch, i, attempt) if train else None
        try:
            return load(idx, rng), attempt
        except Exception as e:
            last_error = e
            log.warning("sample %d (%s) failed: %s: %s; replacing it", idx, records[idx]["path"], type(e).__name__, e)
            idx = replacement_index(seed, epoch, i, attempt, len(records))
    raise SampleError(f"{max_retries} samples in a row failed to load, the last with {type(last_error).__name__}: {last_error}")
