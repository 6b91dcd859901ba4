"""Sound and picture stay together (docs/data.md, "Time"): files written here with each defect of a real timeline
(audio packets lost, an audio clock running fast or slow, audio starting late, early or ending early, video frames
dropped, a variable frame rate, both streams starting late: an mp4 edit list), in mp4, mov, mkv and webm at 16, 44.1
and 48 kHz. Each has a white flash and a click at the same known moments. Through prepare (plain and --transcode) and
the loader's own frame and audio reads, every event's flash and click must be within one frame period (40 ms)."""

from __future__ import annotations

import dataclasses
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from avmt.config import DataConfig
from avmt.data.manifest import load_manifest
from avmt.data.media import read_frames
from avmt.data.prepare import prepare, repairs_of, scan_root
from avmt.data.sample import load_audio_clips, plan_sample
from avmt.data.transcode import TranscodeSettings

av = pytest.importorskip("av")

FPS, SECONDS, SIZE, SR = 25, 6.0, 48, 16000
EVENTS = (1.0, 2.52, 4.04)
PERIOD = 1.0 / FPS

# Two 2.8 s clips of 70 frames at 25 fps over the middle 5.6 s: the frames and the audio of a clip cover the same span.
CFG = DataConfig(
    num_clips=2,
    window_seconds=5.6,
    clip_seconds=2.8,
    frames=70,
    fps=25.0,
    crop_size=SIZE,
    scale_range=(SIZE, SIZE),
    sample_rate=SR,
    n_mels=16,
    mel_frames=16,
    spec_mask_rate=0.0,
)


@dataclasses.dataclass(frozen=True)
class Timeline:
    """One file's timeline. Times in seconds, on the video's clock (its first frame is 0)."""

    audio_start: float = 0.0  # the audio's first sample (negative: before the first frame)
    start: float = 0.0  # both streams' timestamps start here (an mp4/mov edit list, a stream cut from a longer one)
    audio_drop: tuple[float, float] | None = None  # audio packets lost in this span (their samples are gone)
    audio_clock: float = 1.0  # timestamp step per packet / its samples: > 1, gaps between packets; < 1, overlaps
    video_drop: tuple[tuple[float, float], ...] = ()  # video frames lost
    vfr: bool = False  # frames 30 and 50 ms apart in turn


CASES = {
    "clean": Timeline(),
    "audio_gap": Timeline(audio_drop=(1.5, 2.0)),
    "audio_starts_late": Timeline(audio_start=0.4),
    "audio_starts_early": Timeline(audio_start=-0.3),
    "audio_ends_early": Timeline(audio_drop=(5.0, 99.0)),
    "audio_clock_fast": Timeline(audio_clock=1000 / 1024),
    "audio_clock_slow": Timeline(audio_clock=1040 / 1024),
    "video_frames_dropped": Timeline(video_drop=((0.5, 0.9), (2.3, 2.5))),
    "variable_frame_rate": Timeline(vfr=True),
    "late_start": Timeline(start=0.5),
}

CONTAINERS = {  # container: (video codec, audio codec, source sample rate)
    "mp4": ("libx264", "aac", 44100),
    "mov": ("libx264", "aac", 16000),
    "mkv": ("libx264", "flac", 48000),
    "webm": ("libvpx-vp9", "libopus", 16000),
}


def write_file(path: Path, fmt: str, tl: Timeline) -> None:
    """A file of ``fmt`` with timeline ``tl``: a dark frame with a white one on screen at each event, and silence with
    a 5 ms click at each event (on the file's own timestamps: with a fast or slow audio clock the click's sample is
    where the timestamps put that moment). Every video frame is a keyframe, so a lost one leaves the rest intact."""
    vcodec, acodec, rate = CONTAINERS[fmt]
    with av.open(str(path), "w", format={"mkv": "matroska"}.get(fmt, fmt)) as out:
        vs = out.add_stream(vcodec, rate=FPS)
        vs.width = vs.height = SIZE
        vs.pix_fmt = "yuv420p"
        vs.codec_context.gop_size = 1
        vs.codec_context.time_base = Fraction(1, 1000)
        vs.codec_context.options = (
            {"preset": "ultrafast", "x264-params": "keyint=1"} if vcodec == "libx264" else {"deadline": "realtime", "cpu-used": "8"}
        )
        aus = out.add_stream(acodec, rate=rate)
        aus.layout = "mono"
        if tl.vfr:
            times = np.concatenate([[0.0], np.cumsum(np.tile([0.03, 0.05], int(SECONDS / 0.04) + 1))])
        else:
            times = np.arange(int(SECONDS * FPS)) / FPS
        times = times[times < SECONDS]
        flash = {int(np.searchsorted(times, e, side="right")) - 1 for e in EVENTS}
        packets = []
        for i, t in enumerate(times):
            if any(a <= t < b for a, b in tl.video_drop):
                assert i not in flash
                continue
            img = np.full((SIZE, SIZE, 3), 250 if i in flash else 20, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = int(round((t + tl.start) * 1000)), Fraction(1, 1000)
            packets += vs.encode(frame)
        packets += vs.encode(None)
        # audio: sample n of the wave plays at audio_start + n / rate * audio_clock (the timestamps' clock)
        n_samples = int((SECONDS - tl.audio_start) / tl.audio_clock * rate)
        wave = np.zeros(n_samples, np.float32)
        for e in EVENTS:
            a = int(round((e - tl.audio_start) / tl.audio_clock * rate))
            wave[a : a + int(0.005 * rate)] = 0.8
        step = aus.codec_context.frame_size or 1024
        for k in range(0, n_samples - step, step):
            t = tl.audio_start + k / rate * tl.audio_clock
            frame = av.AudioFrame.from_ndarray(wave[None, k : k + step].copy(), format="flt", layout="mono")
            frame.sample_rate, frame.time_base = rate, Fraction(1, rate)
            frame.pts = int(round((t + tl.start) * rate))
            for p in aus.encode(frame):
                pt = float(p.pts * p.time_base) - tl.start if p.pts is not None else t
                if not (tl.audio_drop and tl.audio_drop[0] <= pt < tl.audio_drop[1]):
                    packets.append(p)
        for p in aus.encode(None):
            pt = float(p.pts * p.time_base) - tl.start if p.pts is not None else SECONDS
            if not (tl.audio_drop and tl.audio_drop[0] <= pt < tl.audio_drop[1]):
                packets.append(p)
        for p in sorted(packets, key=lambda p: float(p.dts * p.time_base) if p.dts is not None else 0.0):
            out.mux(p)


def events_in(rec: dict) -> tuple[list[float], list[float]]:
    """(flash times, click times) in seconds from the video's first frame, as the loader sees one eval sequence: its
    planned frames read with ``read_frames`` and its audio windows read from the side-car."""
    seq, _ = plan_sample(rec, CFG, False, None)
    frames = read_frames(rec["path"], seq.frame_indices, rec["fps"])  # [T, F, H, W, 3]
    wave = load_audio_clips(rec, seq, SR)  # [T, L]
    bright = frames.mean(axis=(2, 3, 4)) > 128
    flash = seq.frame_times[bright]
    flashes = [t for k, t in enumerate(sorted(flash)) if k == 0 or t - sorted(flash)[k - 1] > 0.2]
    clicks = []
    for c in range(len(seq.audio_starts)):
        loud = np.flatnonzero(np.abs(wave[c]) > 0.3)
        for k, j in enumerate(loud):
            if k == 0 or j - loud[k - 1] > 0.2 * SR:
                clicks.append((seq.audio_starts[c] + j) / SR)
    return flashes, clicks


@pytest.fixture(scope="module", params=sorted(CONTAINERS))
def prepared(request, tmp_path_factory):
    """Every case in one container, prepared plain and with --transcode (2 workers)."""
    fmt = request.param
    root = tmp_path_factory.mktemp(f"sync-{fmt}")
    for name, tl in CASES.items():
        (root / "in" / name).mkdir(parents=True)
        write_file(root / "in" / name / f"{name}.{fmt}", fmt, tl)
    items = scan_root(root / "in")
    plain = prepare(items, root / "plain", SR, 2.0, workers=2, progress=False)
    tc = prepare(items, root / "tc", SR, 2.0, workers=2, progress=False, transcode=TranscodeSettings(SIZE, FPS))
    return fmt, root, plain, tc


@pytest.mark.parametrize("path", ["plain", "tc"])
def test_every_event_flash_and_click_are_within_one_frame(prepared, path):
    fmt, root, plain, tc = prepared
    summary = plain if path == "plain" else tc
    assert summary.kept == len(CASES), (root / path / "rejected.jsonl").read_text()
    bad = []
    for rec in load_manifest(root / path / "manifest.jsonl"):
        flashes, clicks = events_in(rec)
        case = rec["label"]
        if len(flashes) != len(EVENTS) or len(clicks) != len(EVENTS):
            bad.append(f"{case}: flashes {flashes}, clicks {clicks}")
            continue
        for e, f, c in zip(EVENTS, flashes, clicks):
            if not (abs(f - c) <= PERIOD + 1e-6 and abs(f - e) <= PERIOD + 1e-6 and abs(c - e) <= PERIOD + 1e-6):
                bad.append(f"{case}: event {e} s: flash {f:.4f} s, click {c:.4f} s")
    assert not bad, f"{fmt} {path}: " + "; ".join(bad)


def test_the_records_say_what_was_repaired(prepared):
    fmt, root, plain, _ = prepared
    recs = {r["label"]: r for r in load_manifest(root / "plain" / "manifest.jsonl")}
    assert repairs_of(recs["clean"]) == {}
    assert recs["audio_gap"]["sync"]["audio_gaps"] == 1 and 0.3 < recs["audio_gap"]["sync"]["audio_gap_s"] < 0.7
    # the first decoded sample: 0.4 s, or earlier by the AAC priming frame (1024 samples: 64 ms at 16 kHz, mov)
    assert recs["audio_starts_late"]["sync"]["audio_start_s"] == pytest.approx(0.4, abs=0.07)
    early = recs["audio_starts_early"]["sync"]
    assert early["audio_start_s"] <= 0.001  # never padded: the audio before the first frame is dropped, or (mp4, mov) the
    # muxer's edit list hides it already
    assert early["audio_dropped_before_start_s"] == (pytest.approx(0.3, abs=0.03) if fmt in ("mkv", "webm") else 0.0)
    assert 0.8 < recs["audio_ends_early"]["sync"]["audio_end_pad_s"] < 1.2
    assert recs["audio_clock_fast"]["sync"]["audio_overlap_s"] > 0.05  # 2.3% of 6 s, trimmed 10 ms at a time
    assert recs["audio_clock_slow"]["sync"]["audio_gap_s"] > 0.05
    assert recs["video_frames_dropped"]["sync"]["video_missing_frames"] == 15  # 10 + 5 frames at 25 fps
    assert recs["late_start"]["sync"]["video_start_s"] == pytest.approx(0.5, abs=0.01)
    assert repairs_of(recs["late_start"]).keys() <= {"audio_before_video_s"}  # both streams moved: nothing to repair
    assert plain.repaired >= 6 and plain.repairs["audio_gap_s"] > 0.3


def test_a_file_with_too_much_missing_audio_is_refused(tmp_path):
    (tmp_path / "in" / "a").mkdir(parents=True)
    write_file(tmp_path / "in" / "a" / "mostly_silent.mkv", "mkv", Timeline(audio_drop=(1.2, 99.0)))  # 80% gone
    s = prepare(scan_root(tmp_path / "in"), tmp_path / "out", SR, 2.0, workers=0, progress=False)
    assert s.kept == 0 and s.reasons == {"out_of_sync": 1}
    rec = json.loads((tmp_path / "out" / "rejected.jsonl").read_text())
    assert "silence put in for missing audio" in rec["detail"] and "--max-repair 0.25" in rec["detail"]
    s = prepare(scan_root(tmp_path / "in"), tmp_path / "out", SR, 2.0, workers=0, progress=False, max_repair=0.9)
    assert s.kept == 1 and s.processed == 1  # another threshold redoes the file


def test_ten_minutes_of_audio_do_not_drift(tmp_path):
    """A 10-minute 44.1 kHz track resampled to 16 kHz: its last click lands where its first does, to the sample
    (within a segment the position follows the sample count)."""
    rate, minutes = 44100, 10
    path = tmp_path / "long.mkv"
    clicks = np.array([1.0, 299.5, 598.25])
    wave = np.zeros(int(minutes * 60 * rate), np.float32)
    for t in clicks:
        wave[int(round(t * rate)) : int(round(t * rate)) + 200] = 0.8
    with av.open(str(path), "w", format="matroska") as out:
        st = out.add_stream("flac", rate=rate)
        st.layout = "mono"
        for k in range(0, len(wave), 4608):
            frame = av.AudioFrame.from_ndarray(wave[None, k : k + 4608].copy(), format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, k, Fraction(1, rate)
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    from avmt.data.media import probe_and_extract

    meta, audio = probe_and_extract(path, SR, 1.0, need=("audio",))
    loud = np.flatnonzero(np.abs(audio) > 0.3)
    onsets = loud[np.concatenate([[True], np.diff(loud) > SR])] / SR
    np.testing.assert_allclose(onsets, clicks, atol=2 / SR)
    assert meta["sync"]["audio_gaps"] == 0 and meta["sync"]["audio_overlap_s"] == 0.0
