"""Prepare-time transcoding: one re-encode per video to the size and frame rate training reads.

A paper-preset sequence needs nearly every frame of its 30 s window, so seeking saves little: what decides the
decode cost is the stored resolution (a 720p file decodes ~19x slower than the same content at a 128-px short
side) and the keyframe interval. :func:`transcode_video` writes H.264 in mp4 (which DALI's GPU decoder reads too)
with the short side scaled to ``short_side`` (aspect kept, even sizes), a constant ``fps`` (frames repeated or
dropped from the source timestamps), a keyframe every ``keyframe_seconds`` and no audio (the audio side-car holds
it). The output goes to ``DST.part.mp4`` first and is renamed when complete, so a kill never leaves a file that
looks finished.
"""

from __future__ import annotations

import dataclasses
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

from avmt.data.media import MediaError, is_disk_full


@dataclasses.dataclass(frozen=True)
class TranscodeSettings:
    """What the transcoded files are: short side (px), constant frame rate, keyframe interval (s), x264 CRF, preset and
    tune."""

    short_side: int
    fps: float
    keyframe_seconds: float = 1.0
    crf: int = 23  # x264's own default: decodes faster and is smaller than 20 (measured: docs/data.md, "Benchmark")
    preset: str = "veryfast"
    # x264 --tune: fastdecode (CAVLC, no deblocking or weighted prediction) decodes the loader's frames ~28% faster
    # for ~20% more bytes (measured on the loader benchmark's videos); "" for none
    tune: str = "fastdecode"

    def __post_init__(self) -> None:
        if (
            self.short_side < 2
            or not (math.isfinite(self.fps) and self.fps > 0)
            or not self.keyframe_seconds > 0
            or not 0 <= self.crf <= 51
        ):
            raise ValueError(f"transcode settings {self}: expected short_side >= 2, fps > 0, keyframe_seconds > 0, 0 <= crf <= 51")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side ``short_side`` (never upscaled), aspect kept, both even (yuv420p)."""
    scale = min(1.0, short_side / min(width, height))
    even = lambda v: max(2, int(round(v * scale / 2)) * 2)  # noqa: E731
    return even(width), even(height)


def transcode_video(src: str | Path, dst: str | Path, settings: TranscodeSettings) -> dict[str, Any]:
    """Re-encode the video stream of ``src`` into ``dst`` (mp4, H.264; see the module docstring). Returns the video
    fields of the manifest record for ``dst``: ``fps``, ``num_frames``, ``width``, ``height``, ``video_codec``,
    ``video_seconds``. Raises :class:`MediaError` (reason ``transcode``) on any failure of this file, and the
    ``OSError`` itself when the disk is full (:func:`avmt.data.media.is_disk_full`); either way no ``dst`` and no
    part file are left."""
    import av

    dst = Path(dst)
    part = dst.with_name(dst.name + ".part.mp4")
    fps = Fraction(settings.fps).limit_denominator(1001)
    try:
        with av.open(str(src)) as inp:
            vs = inp.streams.video[0]
            vs.thread_type = "AUTO"
            width, height = output_size(vs.codec_context.width, vs.codec_context.height, settings.short_side)
            start = float((vs.start_time or 0) * vs.time_base)
            with av.open(str(part), "w", format="mp4", options={"movflags": "+faststart"}) as out:
                gop = max(1, round(settings.keyframe_seconds * float(fps)))
                os_ = out.add_stream("libx264", rate=fps)
                os_.width, os_.height, os_.pix_fmt = width, height, "yuv420p"
                # a keyframe exactly every gop frames (no scene-cut keyframes), no B-frames (decode order = display order)
                ctx = os_.codec_context
                ctx.gop_size, ctx.max_b_frames = gop, 0
                ctx.options = {
                    "crf": str(settings.crf),
                    "preset": settings.preset,
                    **({"tune": settings.tune} if settings.tune else {}),
                    "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
                }
                src_step = 1 / float(vs.average_rate or vs.guessed_rate or fps)
                n_out, held, t = 0, None, 0.0
                for frame in inp.decode(vs):
                    if frame.pts is None:
                        continue
                    t = float(frame.pts * vs.time_base) - start
                    # constant frame rate: output frame k shows the newest source frame at or before k / fps
                    while held is not None and n_out / float(fps) < t:
                        n_out = _encode(out, os_, held, n_out)
                    held = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
                while held is not None and n_out / float(fps) < t + src_step - 1e-9:  # the last frame's own span
                    n_out = _encode(out, os_, held, n_out)
                for packet in os_.encode(None):
                    out.mux(packet)
        if n_out == 0:
            raise MediaError("transcode", "no video frame decoded")
        os.replace(part, dst)
    except MediaError:
        part.unlink(missing_ok=True)
        raise
    except OSError as e:
        part.unlink(missing_ok=True)
        if is_disk_full(e):
            raise  # the disk, not this file: the caller stops (prepare: the whole run, resumable)
        raise MediaError("transcode", f"{type(e).__name__}: {e}") from None
    except Exception as e:  # FFmpeg errors: the file is rejected with the reason
        part.unlink(missing_ok=True)
        raise MediaError("transcode", f"{type(e).__name__}: {e}") from None
    except BaseException:  # prepare's time limit, a KeyboardInterrupt: no half-written file either
        part.unlink(missing_ok=True)
        raise
    return {
        "fps": float(fps),
        "num_frames": n_out,
        "width": width,
        "height": height,
        "video_codec": "h264",
        "video_seconds": round(n_out / float(fps), 6),
    }


def _encode(out: Any, stream: Any, frame: Any, index: int) -> int:
    """Encode ``frame`` as output frame ``index`` (pts in units of 1/fps); returns the next index."""
    frame.pts, frame.time_base = index, 1 / Fraction(stream.average_rate)
    frame.pict_type = 0  # AV_PICTURE_TYPE_NONE: the source's keyframes would otherwise force keyframes here too
    for packet in stream.encode(frame):
        out.mux(packet)
    return index + 1
