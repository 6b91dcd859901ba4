"""Where a training sequence comes from in a video: window, clips, frame indices, audio samples, crop.

Layout (docs/method.md §5). A sequence is a window of ``W = window_seconds`` split into ``T = num_clips`` equal
segments of ``W / T`` seconds. Each segment holds one *clip span* of ``clip_seconds``: the clip's audio
window is the whole span and its ``F = frames`` video frames at ``fps`` are centred in the span
(paper: 2 s span, 32 frames at 16 fps = 2 s, so frames and audio cover exactly the same 2 s).

- train: the window start is uniform in the usable span, each clip span's offset inside its segment is
  uniform; eval: the window is centred in the usable span and each clip span is centred in its segment.
- Short-video rule (usable duration ``D < W``): the window shrinks to the whole usable span and the T
  clip spans are spread evenly over it, the first starting at its beginning and the last ending at its
  end (clips overlap when ``D < T * clip_seconds``); T stays fixed, so batches never need ``clip_mask``.
  If even ``D < clip_seconds`` (only possible when ``prepare --min-seconds`` is below a clip), every clip
  starts at the span start; frames past the end repeat the last frame and audio past the end is silence.
  The rule is the same in train and eval mode (no random window: there is no room for one).

Times are seconds from the video stream's first frame; a frame at time ``t`` is native frame
``floor(t * native_fps)`` (the frame on screen at ``t``), clamped to the last frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from avmt.config import DataConfig


@dataclass(frozen=True)
class SequencePlan:
    """Where the T clips of one sequence come from.

    ``clip_starts [T]`` float64 seconds (start of each clip span); ``frame_times [T, F]`` float64 seconds;
    ``frame_indices [T, F]`` int64 native frame indices; ``audio_starts [T]`` int64 sample offsets of the
    audio windows, each ``audio_length`` samples long; ``window`` (start, end) in seconds; ``short`` is True
    when the short-video rule applied.
    """

    clip_starts: np.ndarray
    frame_times: np.ndarray
    frame_indices: np.ndarray
    audio_starts: np.ndarray
    audio_length: int
    window: tuple[float, float]
    short: bool


@dataclass(frozen=True)
class View:
    """One deterministic test view (eval mode): temporal position ``clip`` of ``clips`` (the window slides from the
    span's start, 0, to its end, ``clips - 1``; ``clips=1``: centred) and spatial crop ``crop`` of ``crops`` along
    the frame's long side (0: left/top, ``crops - 1``: right/bottom; ``crops=1``: centred). The released code's
    test protocol is 10 temporal x 3 spatial views."""

    clip: int = 0
    clips: int = 1
    crop: int = 0
    crops: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.clip < self.clips and 0 <= self.crop < self.crops):
            raise ValueError(f"view {self}: expected 0 <= clip < clips and 0 <= crop < crops")


def _fraction(i: int, n: int) -> float:
    return 0.5 if n == 1 else i / (n - 1)


def plan_sequence(
    cfg: DataConfig,
    duration: float,
    native_fps: float,
    num_frames: int,
    train: bool,
    rng: np.random.Generator | None = None,
    span: tuple[float, float | None] = (0.0, None),
    view: View | None = None,
) -> SequencePlan:
    """Plan one sequence from a video whose usable content is ``span`` (default: all of ``duration``). ``view``
    (eval mode only) places the window at one of several temporal positions instead of the centre."""
    if train and rng is None:
        raise ValueError("train mode needs a numpy Generator for the random window and clip offsets")
    if duration <= 0 or native_fps <= 0 or num_frames <= 0:
        raise ValueError(f"cannot sample from a video with duration={duration}, fps={native_fps}, frames={num_frames}")
    t_clips, w, clip = cfg.num_clips, cfg.window_seconds, cfg.clip_seconds
    s0 = max(0.0, span[0] or 0.0)
    s1 = duration if span[1] is None else min(span[1], duration)
    d = s1 - s0
    if d <= 0:
        raise ValueError(f"usable span [{s0}, {s1}] of a {duration} s video is empty")
    seg = w / t_clips
    short = d < w - 1e-9
    if not short:
        w0 = s0 + (rng.uniform(0.0, d - w) if train else (d - w) * _fraction(view.clip, view.clips) if view else (d - w) / 2)
        slack = seg - clip
        offsets = rng.uniform(0.0, slack, t_clips) if train and slack > 0 else np.full(t_clips, slack / 2)
        starts = w0 + np.arange(t_clips) * seg + offsets
        window = (w0, w0 + w)
    elif d >= clip:
        step = (d - clip) / (t_clips - 1) if t_clips > 1 else 0.0
        starts = s0 + np.arange(t_clips) * step + (0.0 if t_clips > 1 else (d - clip) / 2)
        window = (s0, s1)
    else:
        starts = np.full(t_clips, s0)
        window = (s0, s1)
    audio_starts = np.round(starts * cfg.sample_rate).astype(np.int64)
    starts = audio_starts / cfg.sample_rate  # snap clip starts to the audio sample grid: exact alignment
    vis_offset = (clip - cfg.frames / cfg.fps) / 2
    frame_times = starts[:, None] + vis_offset + np.arange(cfg.frames)[None, :] / cfg.fps
    indices = np.floor(frame_times * native_fps + 1e-6).astype(np.int64)
    # Clamp to the span's last frame: with the short rule (D < clip) frames past the end repeat it.
    last = min(num_frames - 1, max(0, math.ceil(s1 * native_fps - 1e-6) - 1))
    indices = np.clip(indices, 0, last)
    return SequencePlan(starts, frame_times, indices, audio_starts, int(round(clip * cfg.sample_rate)), window, short)


@dataclass(frozen=True)
class CropPlan:
    """One spatial transform shared by every frame of a sequence: resize to ``size`` (h, w), then crop
    ``crop`` x ``crop`` at (``top``, ``left``), then flip horizontally if ``flip``."""

    size: tuple[int, int]
    top: int
    left: int
    crop: int
    flip: bool


def plan_crop(
    cfg: DataConfig, height: int, width: int, train: bool, rng: np.random.Generator | None = None, view: View | None = None
) -> CropPlan:
    """train: short side uniform in ``scale_range`` (integers, inclusive), random crop, flip with p=0.5;
    eval: short side ``scale_range[0]``, centre crop (``view``: crop ``view.crop`` of ``view.crops`` along the long
    side, centred along the short one), no flip."""
    if train and rng is None:
        raise ValueError("train mode needs a numpy Generator for the random crop")
    lo, hi = cfg.scale_range
    short = int(rng.integers(lo, hi + 1)) if train else lo
    if height <= width:
        size = (short, max(short, int(round(width * short / height))))
    else:
        size = (max(short, int(round(height * short / width))), short)
    c = cfg.crop_size
    if train:
        top, left = int(rng.integers(0, size[0] - c + 1)), int(rng.integers(0, size[1] - c + 1))
        flip = bool(rng.random() < 0.5)
    else:
        top, left, flip = (size[0] - c) // 2, (size[1] - c) // 2, False
        if view is not None and view.crops > 1:
            along = int(round((max(size) - c) * _fraction(view.crop, view.crops)))
            top, left = (along, left) if size[0] > size[1] else (top, along)
    return CropPlan(size, top, left, c, flip)


def sample_rng(seed: int, epoch: int, index: int, attempt: int = 0) -> np.random.Generator:
    """The generator for one draw of one sample: reproducible from (seed, epoch, index, attempt), the same in
    any worker process and in both loaders."""
    return np.random.default_rng([seed, epoch, index, attempt])


def shard_indices(n: int, epoch: int, seed: int, shuffle: bool, shard_id: int = 0, num_shards: int = 1) -> np.ndarray:
    """This shard's dataset indices for one epoch. All shards draw the same permutation (from seed, epoch),
    pad it by wrapping around to a multiple of ``num_shards`` and take every ``num_shards``-th index, so
    every shard gets the same count and together they cover every sample."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} is invalid for num_shards={num_shards}")
    if n <= 0:
        raise ValueError("cannot shard an empty dataset")
    order = np.random.default_rng([seed, epoch, 7919]).permutation(n) if shuffle else np.arange(n)
    total = math.ceil(n / num_shards) * num_shards
    order = np.resize(order, total)  # wrap-around padding
    return order[shard_id::num_shards]
