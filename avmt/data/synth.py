"""A synthetic audio-visual dataset with real audio-visual correspondence.

``python -m avmt.data.synth --out DIR [--count 60 --classes 8 --seconds 40 --size 128 --fps 16
--sample-rate 44100 --format mp4|webm --seed 0 --workers 2]``

Each video shows a *target* shape that moves and bounces off the frame borders; at every bounce it
flashes white and a sound event plays. The class fixes the target's colour (a saturated hue per class)
and shape (disk, square, diamond, ring), and the pitch and timbre (harmonic weights) of the event; every
class has its own hue and pitch (pitches up to 48 classes), shapes and timbres repeat. Distractors: a second,
smaller, silent grey shape moving independently (its grey level changes every frame), a background whose
tint flickers faintly every frame, background noise and
random "off-screen" beeps at times unrelated to any bounce. Nothing but the target and the distractor's
shape and path is constant over a video, so what its clips have in common is the class-linked content.

Files are written with PyAV: H.264 + AAC in ``.mp4`` (default) or VP9 + Opus in ``.webm``. Layout:
``DIR/<class_name>/<class_name>_<i>.<ext>`` plus ``DIR/labels.csv`` (path,label) -- readable by
``python -m avmt.data.prepare --csv DIR/labels.csv`` or ``--root DIR`` -- and ``DIR/synth.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from avmt.workers import WorkerDied, imap_bounded

# Bumped whenever render() changes what it draws, so caches of older datasets are not reused.
SYNTH_VERSION = 3
SHAPES = ("disk", "square", "diamond", "ring")
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


@dataclass(frozen=True)
class SynthSpec:
    """What one video looks like; every video derives its randomness from (seed, index)."""

    seconds: float = 40.0
    size: int = 128  # frames are size x size (must be even for yuv420p)
    fps: int = 16
    sample_rate: int = 44100
    num_classes: int = 8
    format: str = "mp4"  # mp4: H.264 + AAC; webm: VP9 + Opus
    seed: int = 0
    # video encoder threads; 0: the encoder's choice, whose output depends on the machine's core count (x264's frame
    # threads), 1: the same bytes on every machine (the loss-trajectory guard's data)
    encoder_threads: int = 0

    def __post_init__(self) -> None:
        if self.format not in ("mp4", "webm"):
            raise ValueError(f"format={self.format!r} is invalid: expected 'mp4' or 'webm'")
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size={self.size} is invalid: expected an even number >= 16")
        if self.seconds <= 0 or self.fps <= 0 or self.sample_rate < 8000 or self.num_classes < 1 or self.encoder_threads < 0:
            raise ValueError(f"invalid synth parameters: {self}")


def class_name(label: int) -> str:
    return f"class{label:02d}_{SHAPES[label % len(SHAPES)]}"


def class_sound(label: int, num_classes: int) -> tuple[float, np.ndarray]:
    """(pitch in Hz, weights of harmonics 1..4) of a class's sound event: pitches spread evenly over four
    octaves above 220 Hz (every class its own pitch up to 48 classes), four timbres in turn."""
    step = max(1, 48 // num_classes)  # semitones between neighbouring classes
    pitch = 220.0 * 2 ** (step * (label % num_classes % 48) / 12)
    timbres = np.array([[1.0, 0.0, 0.0, 0.0], [0.6, 0.4, 0.3, 0.0], [0.5, 0.0, 0.35, 0.25], [0.4, 0.5, 0.0, 0.4]])
    return pitch, timbres[label % len(timbres)]


def class_color(label: int, num_classes: int) -> np.ndarray:
    """RGB float32 ``[3]`` of a class's target: saturated, the hues evenly spaced around the colour wheel."""
    hue = (label % num_classes) / num_classes
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6  # HSV -> RGB with saturation 0.8, value 230
    return (230 * (1 - 0.8 * np.clip(np.minimum(k, 4 - k), 0, 1))).astype(np.float32)


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == "disk":
        return dy * dy + dx * dx <= r * r
    if kind == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= r * 1.2
    d2 = dy * dy + dx * dx
    return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)  # ring


def _trajectory(rng: np.random.Generator, n: int, fps: float, size: int, r: float) -> tuple[np.ndarray, list[int]]:
    """Positions ``[n, 2]`` of a shape bouncing inside the frame and the frame indices of its bounces."""
    pos = rng.uniform(r, size - r, 2)
    speed = rng.uniform(0.35, 0.7) * size  # pixels per second
    angle = rng.uniform(0, 2 * np.pi)
    vel = speed * np.array([np.sin(angle), np.cos(angle)])
    out, bounces = np.zeros((n, 2)), []
    for i in range(n):
        pos = pos + vel / fps
        hit = False
        for a in range(2):
            if pos[a] < r or pos[a] > size - r:
                vel[a] = -vel[a]
                pos[a] = np.clip(pos[a], r, size - r)
                hit = True
        if hit:
            bounces.append(i)
        out[i] = pos
    return out, bounces


def render(index: int, label: int, spec: SynthSpec) -> tuple[np.ndarray, np.ndarray, dict]:
    """Frames ``[n, size, size, 3]`` uint8, audio ``[samples]`` float32 in [-1, 1] and event metadata."""
    rng = np.random.default_rng([spec.seed, index])
    n = int(round(spec.seconds * spec.fps))
    s = spec.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    r = s * rng.uniform(0.16, 0.2)
    target, bounces = _trajectory(rng, n, spec.fps, s, r)
    distractor_kind = SHAPES[rng.integers(len(SHAPES))]
    d_r = r * rng.uniform(0.5, 0.7)
    distractor, _ = _trajectory(rng, n, spec.fps, s, d_r)
    color = class_color(label, spec.num_classes)
    # Nothing but the target and the distractor's shape and path stays the same across a video's frames: a constant
    # per-video background or distractor colour would let a model tell videos apart without looking at the target.
    d_levels = rng.uniform(70, 150, n).astype(np.float32)  # grey, a new level every frame
    frames = np.empty((n, s, s, 3), np.uint8)
    flash_len = max(1, int(round(0.15 * spec.fps)))
    flashing = np.zeros(n, bool)
    for b in bounces:
        flashing[b : b + flash_len] = True
    kind = SHAPES[label % len(SHAPES)]
    for i in range(n):
        img = 40.0 + rng.normal(0, 2, 3).astype(np.float32)  # background: a faint random tint every frame (flicker)
        img = np.broadcast_to(img, (s, s, 3)).copy()
        img[_shape_mask(distractor_kind, yy, xx, *distractor[i], d_r)] = d_levels[i]
        img[_shape_mask(kind, yy, xx, *target[i], r)] = 255.0 if flashing[i] else color
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)

    sr = spec.sample_rate
    audio = rng.normal(0, 0.02, int(round(spec.seconds * sr))).astype(np.float32)  # background noise
    pitch, harmonics = class_sound(label, spec.num_classes)
    ev_len = int(0.25 * sr)
    t = np.arange(ev_len) / sr
    env = np.exp(-t * 14.0)
    # harmonics at or above Nyquist would fold back as other pitches: leave them out
    event = sum(w * np.sin(2 * np.pi * pitch * (h + 1) * t) for h, w in enumerate(harmonics) if w and pitch * (h + 1) < sr / 2) * env
    event_times = [b / spec.fps for b in bounces]
    for et in event_times:
        a = int(et * sr)
        seg = audio[a : a + ev_len]
        seg += 0.5 * event[: len(seg)].astype(np.float32)
    beeps = rng.uniform(0, spec.seconds, max(1, int(spec.seconds / 4)))  # off-screen distractor sounds
    for bt in beeps:
        f = rng.uniform(150, 1500)
        a = int(bt * sr)
        seg = audio[a : a + ev_len // 2]
        seg += (0.25 * np.sin(2 * np.pi * f * t[: len(seg)]) * env[: len(seg)]).astype(np.float32)
    np.clip(audio, -1, 1, out=audio)
    return frames, audio, {"events": event_times, "distractor_beeps": sorted(float(b) for b in beeps)}


def write_video(path: Path, frames: np.ndarray, audio: np.ndarray, fps: int, sample_rate: int, fmt: str, encoder_threads: int = 0) -> None:
    """Encode ``frames [n, H, W, 3]`` uint8 and mono ``audio [samples]`` float32 into ``path`` with PyAV
    (``encoder_threads``: see :class:`SynthSpec`)."""
    import av

    vcodec, acodec = ("libx264", "aac") if fmt == "mp4" else ("libvpx-vp9", "libopus")
    out_rate = sample_rate if fmt == "mp4" or sample_rate in OPUS_RATES else 48000  # Opus has fixed rates
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), "w", format=fmt) as container:
        vs = container.add_stream(vcodec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.options = (
            {"crf": "23", "g": str(fps)}
            if fmt == "mp4"
            else {"crf": "32", "b:v": "0", "g": str(fps), "deadline": "realtime", "cpu-used": "8"}
        ) | ({"threads": str(encoder_threads)} if encoder_threads else {})
        aud = container.add_stream(acodec, rate=out_rate, layout="mono")
        for img in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(pkt)
        for pkt in vs.encode():
            container.mux(pkt)
        resampler = av.AudioResampler(format=aud.codec_context.format.name, layout="mono", rate=out_rate)
        chunk = 4096
        for start in range(0, len(audio), chunk):
            frame = av.AudioFrame.from_ndarray(audio[None, start : start + chunk], format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            frame.time_base = Fraction(1, sample_rate)
            for rf in resampler.resample(frame):
                for pkt in aud.encode(rf):
                    container.mux(pkt)
        for rf in resampler.resample(None):
            for pkt in aud.encode(rf):
                container.mux(pkt)
        for pkt in aud.encode():
            container.mux(pkt)
    os.replace(tmp, path)


def _make_one(args: tuple[int, int, str, SynthSpec]) -> dict:
    index, label, path, spec = args
    frames, audio, meta = render(index, label, spec)
    write_video(Path(path), frames, audio, spec.fps, spec.sample_rate, spec.format, spec.encoder_threads)
    return {"path": path, "label": label, "class_name": class_name(label), "index": index, **meta}


def generate(out: str | Path, count: int, spec: SynthSpec, workers: int = 1, progress: bool = True) -> list[dict]:
    """Write ``count`` videos (labels cycle over the classes) under ``out``; returns their records.

    Existing complete files are kept (a re-run resumes). Writes ``labels.csv`` and ``synth.json``.
    """
    from tqdm import tqdm

    out = Path(out)
    ext = spec.format
    jobs = []
    for i in range(count):
        label = i % spec.num_classes
        path = out / class_name(label) / f"{class_name(label)}_{i:05d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((i, label, str(path), spec))
    records: list[dict] = []
    todo = [j for j in jobs if not Path(j[2]).exists()]
    done = [{"path": j[2], "label": j[1], "class_name": class_name(j[1]), "index": j[0]} for j in jobs if Path(j[2]).exists()]
    bar = tqdm(total=len(jobs), initial=len(done), desc="synth", unit="video", disable=not progress)
    if workers > 1 and len(todo) > 1:  # spawned workers (avmt.workers): nothing of this process's FFmpeg state is inherited
        for _, rec in imap_bounded(_make_one, todo, workers):
            if isinstance(rec, WorkerDied):
                raise RuntimeError(f"synth: {rec.describe()} while writing a video")
            records.append(rec)
            bar.update()
    else:
        for j in todo:
            records.append(_make_one(j))
            bar.update()
    bar.close()
    records = sorted(records + done, key=lambda r: r["index"])
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for r in records:
            w.writerow([os.path.relpath(r["path"], out), r["class_name"]])
    (out / "synth.json").write_text(json.dumps({"spec": asdict(spec), "count": count, "videos": records}, indent=1))
    return records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m avmt.data.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--count", type=int, default=60)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--seconds", type=float, default=40.0, help="duration (default 40 s: longer than the paper's 30 s window)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--sample-rate", type=int, default=44100)
    p.add_argument("--format", choices=("mp4", "webm"), default="mp4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    a = p.parse_args(argv)
    spec = SynthSpec(a.seconds, a.size, a.fps, a.sample_rate, a.classes, a.format, a.seed)
    recs = generate(a.out, a.count, spec, a.workers)
    print(f"wrote {len(recs)} videos ({a.classes} classes) to {a.out}; manifest {a.out / 'labels.csv'}")


if __name__ == "__main__":
    main()
