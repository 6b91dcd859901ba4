"""Media fixtures for the data tests, generated on the fly by avmt.data.synth (no binary media in git).

Each builder writes into a folder it is given and is cheap (a few tiny videos); tests cache them with
session-scoped fixtures through ``tmp_path_factory``.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from avmt.config import DataConfig
from avmt.data.prepare import prepare, scan_root
from avmt.data.synth import SynthSpec, generate, render, write_video

SIZE, FPS, SR = 64, 8, 16000

# The data geometry used with the fixtures: 4 clips of 2 s in an 8 s window, 4 frames at 4 fps, 48^2 crops.
# scale_range starts at the native 64, so eval mode does not resize (loaders compare decode, not resamplers).
TEST_CFG = DataConfig(
    num_clips=4,
    window_seconds=8.0,
    clip_seconds=2.0,
    frames=4,
    fps=4.0,
    crop_size=48,
    scale_range=(64, 80),
    sample_rate=SR,
    n_mels=32,
    mel_frames=32,
    spec_mask_rate=0.1,
)


def make_synth(out: Path, fmt: str, count: int = 4, seconds: float = 10.0, seed: int = 0) -> Path:
    spec = SynthSpec(seconds=seconds, size=SIZE, fps=FPS, sample_rate=SR, num_classes=3, format=fmt, seed=seed)
    generate(out, count, spec, workers=1, progress=False)
    for extra in ("labels.csv", "synth.json"):  # keep only class folders: every file there is an input
        (out / extra).unlink()
    return out


def make_bad_files(root: Path) -> dict[str, str]:
    """Write one file of each bad kind into ``root/bad/``; returns {path: expected reason}."""
    import av

    bad = root / "bad"
    bad.mkdir(parents=True)
    expected: dict[str, str] = {}
    frames, audio, _ = render(99, 0, SynthSpec(seconds=3.0, size=SIZE, fps=FPS, sample_rate=SR, num_classes=1, format="mp4"))

    p = bad / "empty.mp4"
    p.write_bytes(b"")
    expected[str(p)] = "empty"

    good = bad / "full.tmp"
    write_video(good.with_suffix(".mp4"), frames, audio, FPS, SR, "mp4")
    data = good.with_suffix(".mp4").read_bytes()
    good.with_suffix(".mp4").unlink()
    p = bad / "truncated.mp4"
    p.write_bytes(data[: len(data) // 2])
    expected[str(p)] = "truncated"

    full = bad / "full.webm"  # a cut webm still opens (header first) but its packets stop early
    write_video(full, frames, audio, FPS, SR, "webm")
    data = full.read_bytes()
    full.unlink()
    p = bad / "truncated.webm"
    p.write_bytes(data[: len(data) * 4 // 10])
    expected[str(p)] = "truncated"

    p = bad / "notes.mp4"
    p.write_text("this is a text file named like a video\n" * 20)
    expected[str(p)] = "not_a_video"

    p = bad / "sound_only.wav"  # a valid media file without any video stream
    with av.open(str(p), "w") as c:
        st = c.add_stream("pcm_s16le", rate=SR, layout="mono")
        pcm = (audio[None, :SR] * 20000).astype(np.int16)
        fr = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        fr.sample_rate, fr.pts, fr.time_base = SR, 0, Fraction(1, SR)
        for pkt in list(st.encode(fr)) + list(st.encode()):
            c.mux(pkt)
    expected[str(p)] = "not_a_video"

    p = bad / "silent.mp4"  # video only
    with av.open(str(p), "w") as c:
        vs = c.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = SIZE, SIZE, "yuv420p"
        for img in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
    expected[str(p)] = "no_audio"

    p = bad / "short.mp4"
    write_video(p, frames[:FPS], audio[:SR], FPS, SR, "mp4")  # 1 s < min_seconds
    expected[str(p)] = "too_short"

    p = bad / "garbage_codec.mkv"  # a well-formed container whose video packets are not a valid bitstream
    rng = np.random.default_rng(0)
    with av.open(str(p), "w", format="matroska") as c:
        vs = c.add_stream("mpeg4", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = SIZE, SIZE, "yuv420p"
        ast = c.add_stream("aac", rate=SR, layout="mono")
        for i in range(3 * FPS):
            pkt = av.Packet(rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
            pkt.stream, pkt.pts, pkt.dts, pkt.time_base = vs, i, i, Fraction(1, FPS)
            pkt.is_keyframe = True
            c.mux(pkt)
        fr = av.AudioFrame.from_ndarray(audio[None, : 3 * SR], format="fltp", layout="mono")
        fr.sample_rate, fr.pts, fr.time_base = SR, 0, Fraction(1, SR)
        for pkt in list(ast.encode(fr)) + list(ast.encode()):
            c.mux(pkt)
    expected[str(p)] = "undecodable"

    p = bad / "dangling.mp4"  # unreadable path: a link to nowhere
    os.symlink(bad / "does-not-exist.mp4", p)
    expected[str(p)] = "unreadable"
    return expected


def prepared(tmp_path_factory, fmt: str) -> Path:
    """Four 10 s videos and one of 5 s (shorter than TEST_CFG's 8 s window) in format ``fmt``, prepared."""
    root = tmp_path_factory.mktemp(f"videos_{fmt}")
    make_synth(root / "long", fmt, count=4, seconds=10.0)
    make_synth(root / "short", fmt, count=1, seconds=5.0, seed=1)  # shorter than the 8 s window
    out = root / "prepared"
    items = scan_root(root / "long") + scan_root(root / "short")
    s = prepare(items, out, sample_rate=SR, min_seconds=2.0, progress=False)
    assert s.kept == 5, s
    return out


def check_contract(batch: dict, cfg: DataConfig, b: int) -> None:
    """The loaders' batch contract: shapes and dtypes (video uint8, normalised by the model), finite audio."""
    t, f, c = cfg.num_clips, cfg.frames, cfg.crop_size
    assert batch["video"].shape == (b, t, 3, f, c, c) and batch["video"].dtype == torch.uint8  # normalised by the model
    assert batch["audio"].shape == (b, t, 1, cfg.n_mels, cfg.mel_frames) and batch["audio"].dtype == torch.float32
    assert batch["label"].shape == (b,) and batch["label"].dtype == torch.int64
    assert batch["index"].shape == (b,) and batch["index"].dtype == torch.int64
    assert torch.isfinite(batch["audio"]).all()


def write_flac(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono float32 ``samples`` in [-1, 1] as 16-bit FLAC: the audio side-car of manifests from earlier versions."""
    import av

    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)
    with av.open(str(path), "w", format="flac") as c:
        st = c.add_stream("flac", rate=sample_rate, layout="mono")
        st.codec_context.format = "s16"
        for s in range(0, len(pcm), 65536):
            fr = av.AudioFrame.from_ndarray(pcm[None, s : s + 65536], format="s16", layout="mono")
            fr.sample_rate = sample_rate
            fr.pts = s
            fr.time_base = Fraction(1, sample_rate)
            for p in st.encode(fr):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
