"""Sequence sampling: alignment, bounds, determinism, the short-video rule, crops and sharding."""

import dataclasses

import numpy as np
import pytest

from avmt.config import PRESETS
from avmt.data.clips import plan_crop, plan_sequence, shard_indices

CFG = PRESETS["paper"].data  # 15 clips x 32 frames at 16 fps, 2 s clips, 30 s window, 44.1 kHz


def check_plan(plan, cfg, duration, fps, n_frames):
    sr, clip = cfg.sample_rate, cfg.clip_seconds
    assert plan.frame_indices.shape == (cfg.num_clips, cfg.frames)
    assert (plan.frame_indices >= 0).all() and (plan.frame_indices < n_frames).all()
    assert (plan.audio_starts >= 0).all()
    # Every frame lies inside its clip's audio window (alignment), and both inside the file.
    a0 = plan.audio_starts[:, None] / sr
    a1 = a0 + plan.audio_length / sr
    assert (plan.frame_times >= a0 - 1e-9).all() and (plan.frame_times < a1 + 1e-9).all()
    assert plan.audio_length == round(clip * sr)
    if not plan.short:
        assert ((plan.audio_starts + plan.audio_length) <= round(duration * sr) + 1).all()
        assert (plan.frame_times < duration).all()
        # The frame index is the frame on screen at the frame time.
        np.testing.assert_array_equal(plan.frame_indices, np.floor(plan.frame_times * fps + 1e-6))
        # Clip t lies in segment t of the window (up to the snap of clip starts to the audio sample grid).
        seg = cfg.window_seconds / cfg.num_clips
        seg0 = plan.window[0] + np.arange(cfg.num_clips) * seg
        tol = 0.5 / sr + 1e-9
        assert (plan.clip_starts >= seg0 - tol).all() and (plan.clip_starts + clip <= seg0 + seg + tol).all()
        assert plan.window[0] >= 0 and plan.window[1] <= duration + 1e-9


@pytest.mark.parametrize("duration,fps", [(30.0, 25.0), (47.3, 29.97), (300.0, 16.0)])
def test_train_plans_are_aligned_and_inside_the_file(duration, fps):
    n = int(duration * fps)
    rng = np.random.default_rng(0)
    starts = []
    for _ in range(50):
        plan = plan_sequence(CFG, duration, fps, n, train=True, rng=rng)
        check_plan(plan, CFG, duration, fps, n)
        starts.append(plan.window[0])
    if duration > 30:
        assert np.ptp(starts) > 0  # the window moves in train mode


def test_eval_is_deterministic_and_centred():
    a = plan_sequence(CFG, 40.0, 25.0, 1000, train=False)
    b = plan_sequence(CFG, 40.0, 25.0, 1000, train=False)
    np.testing.assert_array_equal(a.frame_indices, b.frame_indices)
    np.testing.assert_array_equal(a.audio_starts, b.audio_starts)
    assert a.window == (5.0, 35.0)
    np.testing.assert_allclose(a.clip_starts, 5.0 + 2.0 * np.arange(15))
    check_plan(a, CFG, 40.0, 25.0, 1000)
    with pytest.raises(ValueError, match="Generator"):
        plan_sequence(CFG, 40.0, 25.0, 1000, train=True)


def test_span_restricts_the_window():
    plan = plan_sequence(CFG, 100.0, 10.0, 1000, train=True, rng=np.random.default_rng(1), span=(50.0, 85.0))
    assert plan.window[0] >= 50.0 and plan.window[1] <= 85.0
    assert (plan.frame_times >= 50.0).all() and (plan.frame_times < 85.0).all()


@pytest.mark.parametrize("train", [False, True])
def test_short_video_rule_spreads_clips_evenly(train):
    cfg = dataclasses.replace(CFG, num_clips=4, window_seconds=8.0, frames=8, fps=4.0)
    plan = plan_sequence(cfg, 5.0, 8.0, 40, train=train, rng=np.random.default_rng(0))
    assert plan.short
    np.testing.assert_allclose(plan.clip_starts, [0.0, 1.0, 2.0, 3.0])  # first at 0, last ending at 5.0
    assert plan.audio_starts[-1] + plan.audio_length == 5 * cfg.sample_rate
    check_plan(plan, cfg, 5.0, 8.0, 40)
    tiny = plan_sequence(cfg, 1.2, 8.0, 9, train=train, rng=np.random.default_rng(0))  # shorter than one clip
    np.testing.assert_allclose(tiny.clip_starts, 0.0)
    assert tiny.frame_indices.max() == 8 and (tiny.frame_indices[:, -1] == 8).all()  # last frame repeated


def test_crop_plans():
    rng = np.random.default_rng(0)
    seen_flip = set()
    for _ in range(100):
        c = plan_crop(CFG, 240, 320, train=True, rng=rng)
        h, w = c.size
        assert 128 <= h <= 160 and w == round(320 * h / 240)
        assert 0 <= c.top <= h - 112 and 0 <= c.left <= w - 112
        seen_flip.add(c.flip)
    assert seen_flip == {True, False}
    e = plan_crop(CFG, 360, 202, train=False)
    assert e.size == (round(360 * 128 / 202), 128) and not e.flip
    assert (e.top, e.left) == ((e.size[0] - 112) // 2, 8)


def test_shards_partition_every_epoch():
    shards = [shard_indices(10, 3, 0, True, s, 3) for s in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert set(np.concatenate(shards)) == set(range(10))
    assert not np.array_equal(shard_indices(10, 0, 0, True), shard_indices(10, 1, 0, True))
    np.testing.assert_array_equal(shard_indices(5, 0, 0, False), np.arange(5))
    with pytest.raises(ValueError, match="shard_id"):
        shard_indices(5, 0, 0, False, 3, 3)


def test_long_sequences_up_to_240_clips():
    """8-minute sequences: 240 clips of 2 s in a 480 s window, planned inside a 10-minute video and, by the
    short-video rule, spread over a 5-minute one."""
    cfg = dataclasses.replace(CFG, num_clips=240, window_seconds=480.0)
    rng = np.random.default_rng(0)
    for duration in (600.0, 300.0):
        n = int(duration * 25)
        plan = plan_sequence(cfg, duration, 25.0, n, train=True, rng=rng)
        check_plan(plan, cfg, duration, 25.0, n)
        assert plan.short == (duration < 480) and np.all(np.diff(plan.clip_starts) > 0)
