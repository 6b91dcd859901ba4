"""The three transfer datasets in their exact shipped layouts, tiny and generated (no media in git): UCF101 (AVI,
half without sound, classInd + 3 splits), ESC-50 (5 s 44.1 kHz wav, meta/esc50.csv, 5 folds), Kinetics-Sounds
(train/test/<label>/<id>_<start>_<end>.mp4, and its CSV)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import SR, make_synth

UCF_CLASSES = ("ApplyEyeMakeup", "Basketball", "YoYo")


def to_avi(src: Path, dst: Path, audio: bool) -> None:
    """``src`` re-encoded as UCF101 ships: AVI with MPEG-4 part 2 video (UCF101 is XviD) and, if ``audio``, PCM
    sound (``audio=False`` drops it, as about half of UCF101 has none)."""
    av = pytest.importorskip("av")  # collected without PyAV (the GPU image); skipped where it is needed
    dst.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="avi") as out:
        vin = inp.streams.video[0]
        vout = out.add_stream("mpeg4", rate=vin.average_rate)
        vout.width, vout.height, vout.pix_fmt = vin.codec_context.width, vin.codec_context.height, "yuv420p"
        aout = out.add_stream("pcm_s16le", rate=SR, layout="mono") if audio else None
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SR)
        for packet in inp.demux(vin, inp.streams.audio[0]):  # one interleaved pass, as a real file is written
            for frame in packet.decode():
                if packet.stream is vin:
                    frame.pict_type = 0
                    out.mux(vout.encode(frame))
                elif aout is not None:
                    for r in resampler.resample(frame):
                        r.pts = None
                        out.mux(aout.encode(r))
        out.mux(vout.encode(None))
        if aout is not None:
            out.mux(aout.encode(None))


def make_ucf101(base: Path):
    """3 classes x 4 videos (groups 1-4) in UCF101's layout, the even ones without audio, and its splits folder:
    split k tests group k (UCF101 splits by group too, so no group is in train and test of one split)."""
    src = sorted(make_synth(base / "synth", "mp4", count=12, seconds=3.0).rglob("*.mp4"))
    root, splits = base / "UCF-101", base / "ucfTrainTestlist"
    splits.mkdir()
    (splits / "classInd.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(UCF_CLASSES, 1)))
    names = []
    for n, s in enumerate(src):
        cls, group = UCF_CLASSES[n % 3], n // 3 + 1
        name = f"{cls}/v_{cls}_g{group:02d}_c01.avi"
        to_avi(s, root / name, audio=n % 2 == 1)
        names.append((name, group))
    for k in (1, 2, 3):
        train = [f"{nm} {UCF_CLASSES.index(nm.split('/')[0]) + 1}\n" for nm, g in names if g != k]
        (splits / f"trainlist{k:02d}.txt").write_text("".join(train))
        (splits / f"testlist{k:02d}.txt").write_text("".join(f"{nm}\n" for nm, g in names if g == k))
    return root, splits


def write_wav(path: Path, seconds: float, rate: int, freq: float) -> None:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def make_esc50(base: Path):
    """ESC-50's layout: 5 folds x 2 classes of 5 s, 44.1 kHz mono wav clips and meta/esc50.csv."""
    root = base / "ESC-50-master"
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for target, category in ((0, "dog"), (1, "rooster")):
            name = f"{fold}-{1000 + fold}-A-{target}.wav"
            write_wav(root / "audio" / name, 5.0, 44100, 300.0 + 500 * target + 20 * fold)
            rows.append(f"{name},{fold},{target},{category},True,{1000 + fold},A")
    (root / "meta").mkdir()
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return root


def make_kinetics(base: Path):
    """Kinetics-Sounds' released layout: ROOT/{train,test}/<label>/<youtube_id>_<start>_<end>.mp4."""
    src = sorted(make_synth(base / "synth", "mp4", count=6, seconds=3.0).rglob("*.mp4"))
    root = base / "kinetics-sounds"
    rows = ["youtube_id,time_start,time_end,label,split"]
    for n, s in enumerate(src):
        split, label = ("train" if n < 4 else "test"), ("playing drums" if n % 2 else "dog barking")
        vid = f"yt{n:09d}"
        dst = root / split / label / f"{vid}_{10 * n:06d}_{10 * n + 10:06d}.mp4"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(s.read_bytes())
        rows.append(f"{vid},{10 * n},{10 * n + 10},{label},{split}")
    rows.append("ytmissing00,0,10,dog barking,test")
    (base / "kinetics_sounds.csv").write_text("\n".join(rows) + "\n")
    return root, base / "kinetics_sounds.csv"
