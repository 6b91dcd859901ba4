"""Media helpers shared by ``prepare`` and the loaders: probing, windowed frame decoding, the audio side-car.

Every container is opened with ``with av.open(...)`` so it is closed even when decoding fails
(FFmpeg contexts hold native memory that the garbage collector does not see).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import numpy as np

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a write failed because of the disk, not the file being processed


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` is a write that failed for lack of space (or quota): what stops a whole job, unlike a bad file."""
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


class MediaError(Exception):
    """A media file cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _stream_seconds(stream, container_duration: float | None) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container_duration


_REGION_FORMATS = ("yuv420p", "yuvj420p")  # 8-bit 4:2:0: what H.264/VP9 files decode to, and what the transcodes are


class FrameConverter:
    """Decoded frame -> ``[h, w, 3]`` uint8 RGB array: the frame rescaled to ``height`` x ``width`` (None: as decoded),
    then cut to ``box`` = (top, left, h, w) if given.

    Only what ``box`` keeps is rescaled: its preimage in the decoded frame (start snapped to even pixels, so that the
    4:2:0 chroma stays aligned; end rounded) is copied out and rescaled straight to the box's size. Against rescaling
    the whole frame and cutting afterwards, the region is off by at most one source pixel and its scale by the
    rounding of its size (<1% for a 112-px crop of a 160-px frame), and a 112-px crop of a 256x144 rescale costs a
    third of the pixels (a paper sequence: 0.03 s instead of 0.10 s of swscale on one core). Without a rescale, or for
    pixel formats other than 8-bit 4:2:0, the whole frame is converted and the box cut exactly.

    The rescale runs in FFmpeg's swscale (bilinear; its filter widens when downscaling, so it antialiases) in the
    stream's own pixel format, and the smaller frame is then converted to RGB: two swscale contexts, because one
    that scales and converts at once is ~4x slower. The pixels differ from torch's antialiased resize of the RGB frame
    by about a level of 255 on average. Each context is cached for the converter's life (``frame.to_ndarray`` builds
    one per frame, ~10x slower); swscale runs single-threaded, as loader workers already run one per core.
    """

    def __init__(self, height: int | None = None, width: int | None = None, box: tuple[int, int, int, int] | None = None):
        from av.video.reformatter import VideoReformatter

        self.height, self.width, self.box = height, width, box
        self._scaler, self._to_rgb = VideoReformatter(), VideoReformatter()
        self._geometry: tuple[int, int, str] | None = None  # (width, height, format) of the frames the plan is for
        self._region: tuple[int, int, int, int] | None = None  # (top, left, h, w) of the source to rescale to the box
        self._buffer: Any = None  # a reused frame holding the region
        self._copies: list[tuple[np.ndarray, tuple[slice, slice]]] = []  # per plane: (buffer view, source slices)

    def _plan(self, frame) -> None:
        self._geometry = (frame.width, frame.height, frame.format.name)
        th, tw = self.height or frame.height, self.width or frame.width
        top, left, bh, bw = self.box or (0, 0, th, tw)
        if (th, tw) == (frame.height, frame.width) or frame.format.name not in _REGION_FORMATS:
            self._region = None  # nothing to rescale, or no plane layout this knows how to cut: the exact path
            return
        sy, sx = frame.height / th, frame.width / tw

        def span(start: int, size: int, scale: float, limit: int) -> tuple[int, int]:
            a = min(2 * int(round(start * scale / 2)), (limit - 2) // 2 * 2)
            b = min(limit, max(a + 2, int(round((start + size) * scale))))
            return a, b - a

        (r0, rh), (c0, rw) = span(top, bh, sy, frame.height), span(left, bw, sx, frame.width)
        self._region = (r0, c0, rh, rw)
        if (rh, rw) != (frame.height, frame.width):
            import av

            self._buffer = av.VideoFrame(rw, rh, frame.format.name)
            chroma = (r0 // 2, c0 // 2, (rh + 1) // 2, (rw + 1) // 2)
            self._copies = [
                (_plane(self._buffer, i)[:h, :w], (slice(a, a + h), slice(b, b + w)))
                for i, (a, b, h, w) in enumerate(((r0, c0, rh, rw), chroma, chroma))
            ]

    def __call__(self, frame) -> np.ndarray:
        if self._geometry != (frame.width, frame.height, frame.format.name):
            self._plan(frame)
        if self._region is None:
            if (self.width or frame.width) != frame.width or (self.height or frame.height) != frame.height:
                frame = self._scaler.reformat(frame, width=self.width, height=self.height, threads=1)
            img = self._to_rgb.reformat(frame, format="rgb24", threads=1).to_ndarray()
            if self.box is None:
                return img
            top, left, h, w = self.box
            return img[top : top + h, left : left + w]
        src = frame
        if self._buffer is not None:
            src = self._buffer
            for i, (dst, cut) in enumerate(self._copies):
                dst[...] = _plane(frame, i)[cut]
            src.colorspace, src.color_range = frame.colorspace, frame.color_range
        h, w = (self.box[2], self.box[3]) if self.box else (self.height or frame.height, self.width or frame.width)
        small = self._scaler.reformat(src, width=w, height=h, threads=1)
        return self._to_rgb.reformat(small, format="rgb24", threads=1).to_ndarray()


def _plane(frame, i: int) -> np.ndarray:
    """Plane ``i`` of a frame as a writable ``[rows, line_size]`` uint8 view (no copy)."""
    p = frame.planes[i]
    return np.frombuffer(p, np.uint8).reshape(-1, p.line_size)


def read_frames(
    path: str | Path,
    indices: np.ndarray,
    fps: float,
    height: int | None = None,
    width: int | None = None,
    box: tuple[int, int, int, int] | None = None,
    seek_gap_seconds: float = 2.0,
    threads: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode the frames with native indices ``indices`` (an int array of any shape, any order, repeats allowed) of a
    constant-frame-rate video into ``[*indices.shape, H, W, 3]`` uint8 RGB.

    ``height``/``width``/``box``: rescale, then keep only a region (see :class:`FrameConverter`). ``threads``:
    decoder threads, 0 = FFmpeg's choice (frame and slice threads: fastest alone), 1 = none (right in a loader
    worker, where one worker per core already fills the cores: threads there cost ~20% more CPU per sequence).
    ``out``: a writable uint8 array of that shape, any strides (a view into a batch, transposed or flipped), that the
    frames are written into as they are converted and that is returned; without it one is allocated.

    Frames are placed by their timestamps on a grid at ``fps`` (the record's ``fps``): index ``k`` is the frame on
    screen at ``k / fps`` seconds after the stream's first frame, i.e. the newest frame whose
    ``(pts - start_time) * time_base`` is at or before it. For a constant-rate file that is frame ``k`` itself; where
    frames were dropped, or the rate varies, it is the frame still shown. Indices past the last frame repeat it.
    Only the needed parts are decoded: the decoder seeks to the keyframe before each group of wanted frames and
    skips forward when the next wanted frame is less than ``seek_gap_seconds`` ahead.
    """
    import av

    convert = FrameConverter(height, width, box)
    want = np.asarray(indices, dtype=np.int64)
    order, inverse = np.unique(want.reshape(-1), return_inverse=True)
    slots: list[list[tuple[int, ...]]] = [[] for _ in order]  # where each wanted frame goes in ``out``
    for k, *slot in zip(inverse.tolist(), *(a.tolist() for a in np.unravel_index(np.arange(want.size), want.shape))):
        slots[k].append(tuple(slot))

    def put(k: int, img: np.ndarray) -> None:
        nonlocal out
        if out is None:
            out = np.empty((*want.shape, *img.shape), np.uint8)
        elif out.shape != (*want.shape, *img.shape):
            raise ValueError(f"out has shape {list(out.shape)}, the frames need {[*want.shape, *img.shape]}")
        for slot in slots[k]:
            out[slot] = img

    with av.open(str(path)) as container:
        vs = container.streams.video[0]
        vs.thread_count = threads
        if threads != 1:
            vs.thread_type = "AUTO"
        tb = vs.time_base
        tbf = float(tb)
        start = vs.start_time or 0
        pos = 0  # next position in ``order`` to fill
        shown: list[Any] = [None, None]  # the newest frame decoded so far and its RGB image (converted when first needed)

        def image() -> np.ndarray:
            if shown[1] is None:
                shown[1] = convert(shown[0])
            return shown[1]

        while pos < len(order):
            container.seek(start + int(int(order[pos]) / fps / tb), stream=vs, backward=True, any_frame=False)
            placed = reseek = False
            for frame in container.decode(vs):
                if frame.pts is None:
                    continue
                slot = (frame.pts - start) * tbf * fps  # where this frame starts on the grid
                # every wanted slot before it shows the newest frame before it (or this one, if it is the first)
                while pos < len(order) and order[pos] < slot - 1e-3:
                    if shown[0] is None:
                        shown[0] = frame
                    put(pos, image())
                    pos, placed = pos + 1, True
                shown[0], shown[1] = frame, None
                if pos >= len(order):
                    break
                if placed and (order[pos] - slot) / fps > seek_gap_seconds:
                    reseek = True  # far ahead: a seek is cheaper than decoding the gap (never right after a seek)
                    break
            if not reseek:
                break  # end of stream
        if shown[0] is None:
            raise MediaError("undecodable", f"no frame could be decoded from {path}")
        for k in range(pos, len(order)):
            put(k, image())  # at or past the last frame: it stays on screen
    return out


def write_pcm(path: str | Path, samples: np.ndarray) -> None:
    """Write mono float32 ``samples`` in [-1, 1] as 16-bit PCM in a ``.npy`` file (what prepare's side-car is: a
    window is then a memory-mapped slice, ~2 ms for 30 s at 44.1 kHz against ~36 ms to decode it from FLAC)."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)
    with open(path, "wb") as f:
        # the bytes go through Python's file object: np.save's fast path reports a full disk without an errno
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(pcm))
        f.write(pcm.tobytes())


def read_audio(path: str | Path, start: int, length: int) -> np.ndarray:
    """Mono samples ``[start, start + length)`` of an audio side-car as float32 ``[length]``; samples outside the file
    are zeros. A ``.npy`` (16-bit PCM, :func:`write_pcm`) is memory-mapped and sliced; any other file (the FLAC of
    manifests from earlier versions) is decoded with PyAV from a seek to ``start``, never whole."""
    if str(path).endswith(".npy"):
        pcm = np.load(path, mmap_mode="r")
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"{path}: expected a 1-D int16 PCM array, got {pcm.dtype} {pcm.shape}")
        out = np.zeros(length, np.float32)
        a, b = max(0, start), min(len(pcm), start + length)
        if a < b:
            out[a - start : b - start] = pcm[a:b]
            out[a - start : b - start] *= 1.0 / 32768.0
        return out
    import av

    out = np.zeros(length, np.float32)
    end = start + length
    with av.open(str(path)) as container:
        st = container.streams.audio[0]
        sr = st.codec_context.sample_rate
        tb = st.time_base
        num, den = tb.numerator * sr, tb.denominator  # sample of a pts = pts * num / den (integers: no Fraction per frame)
        if start > 0:
            container.seek(int(start / sr / tb), stream=st, backward=True, any_frame=False)
        for frame in container.decode(st):
            f0 = (frame.pts * num + den // 2) // den if frame.pts is not None else 0
            data = frame.to_ndarray()
            data = data.reshape(-1) if data.shape[0] == 1 else data.mean(axis=0)  # packed mono or planar
            f1 = f0 + len(data)
            if f1 <= start:
                continue
            a, b = max(f0, start), min(f1, end)
            if a < b:
                chunk = data[a - f0 : b - f0]
                if chunk.dtype.kind == "i":
                    out[a - start : b - start] = chunk
                    out[a - start : b - start] *= 1.0 / float(np.iinfo(chunk.dtype).max + 1)
                else:
                    out[a - start : b - start] = chunk
            if f1 >= end:
                break
    return out


# The share of a file's duration that repairs may cover before the file is refused as out_of_sync (prepare --max-repair).
MAX_REPAIR = 0.25


def _check_repairs(sync: dict[str, Any], seconds: float, max_repair: float) -> None:
    """Raise ``out_of_sync`` when the silence that had to be put in (audio starting late, gaps, ending early) or the
    audio dropped as overlapping (timestamps going back) exceeds ``max_repair`` of ``seconds``: such a file's sound
    and picture cannot be trusted to go together."""
    silence = max(0.0, sync.get("audio_start_s", 0.0)) + sync["audio_gap_s"] + sync.get("audio_end_pad_s", 0.0)
    for what, amount in (("silence put in for missing audio", silence), ("audio dropped as overlapping", sync["audio_overlap_s"])):
        if amount > max_repair * seconds:
            raise MediaError(
                "out_of_sync",
                f"{what}: {amount:.2f} s of {seconds:.2f} s, more than --max-repair {max_repair:g} of it "
                f"(audio starts at {sync.get('audio_start_s', 0.0):+.3f} s, {sync['audio_gaps']} gap(s) of {sync['audio_gap_s']:.3f} s, "
                f"{sync['audio_overlap_s']:.3f} s overlapping)",
            )


SIGNATURES = (b"ftyp", b"\x1a\x45\xdf\xa3", b"RIFF", b"OggS", b"FLV", b"\x00\x00\x01\xba")


def probe_and_extract(
    path: str | Path,
    sample_rate: int,
    min_seconds: float,
    need: tuple[str, ...] = ("video", "audio"),
    optional: tuple[str, ...] = (),
    max_repair: float = MAX_REPAIR,
) -> tuple[dict, np.ndarray | None]:
    """Check that ``path`` is a usable media file with the streams ``need`` (``video``, ``audio``; ``optional`` ones
    are used when present) and return (metadata, mono audio at ``sample_rate``, or None without audio).

    Raises :class:`MediaError` with reason ``empty``, ``unreadable``, ``not_a_video``, ``truncated``,
    ``no_audio``, ``undecodable``, ``too_short`` or ``out_of_sync``. Audio is placed by its timestamps
    (:func:`_extract_audio`): with a video, sample 0 is the sound at the video stream's first frame, and the side-car
    covers the whole video (an audio stream that ends early is padded with silence). ``meta["sync"]`` records what
    was repaired (docs/data.md, "Time"); a file whose repairs exceed ``max_repair`` of its duration is refused as
    ``out_of_sync`` (:func:`_check_repairs`). ``meta["modalities"]`` lists the streams kept, in the order video,
    audio; ``duration`` is the shortest of them.
    """
    import av

    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(12)
    except OSError as e:
        raise MediaError("unreadable", f"{e.strerror or e}") from None
    if size == 0:
        raise MediaError("empty", "zero-byte file")
    try:
        container = av.open(str(p))
    except av.FFmpegError as e:
        known = any(sig in head[:12] for sig in SIGNATURES)
        raise MediaError(
            "truncated" if known else "not_a_video",
            f"cannot open as media ({e}); "
            + ("the header is a known container, so the file is cut or damaged" if known else "no known container header"),
        ) from None
    with container:
        use_video = bool(container.streams.video) and ("video" in need or "video" in optional)
        use_audio = bool(container.streams.audio) and ("audio" in need or "audio" in optional)
        if "video" in need and not container.streams.video:
            raise MediaError("not_a_video", "no video stream")
        if "audio" in need and not container.streams.audio:
            raise MediaError("no_audio", "no audio stream")
        if not (use_video or use_audio):
            raise MediaError("not_a_video", f"none of the streams {', '.join(need + optional)}")
        cdur = container.duration / 1e6 if container.duration else None
        meta: dict[str, Any] = {}
        vstart_s = 0.0
        if use_video:
            meta |= _probe_video(container, cdur)
            vs = container.streams.video[0]
            vstart_s = float((vs.start_time or 0) * vs.time_base)
        audio = None
        if use_audio:
            try:  # placed by its timestamps, sample 0 at the video's first frame (audio alone: its own first sample)
                audio, ameta = _extract_audio(container, sample_rate, vstart_s if use_video else None)
            except MediaError as e:
                if "audio" in need:
                    raise
                use_audio, meta["audio_skipped"] = False, e.detail  # optional and unusable: kept without it, noted
        if use_audio:
            sync = ameta.pop("sync")
            if use_video:  # the side-car covers the whole video: an audio stream that ends early is padded with silence
                want = int(round(meta["video_seconds"] * sample_rate))
                sync["audio_end_pad_s"] = round(max(0, want - len(audio)) / sample_rate, 6)
                if len(audio) < want:
                    audio = np.concatenate([audio, np.zeros(want - len(audio), np.float32)])
                sync["video_start_s"] = round(vstart_s, 6)
                sync |= meta.pop("video_sync")
            meta |= ameta | {"audio_seconds": round(len(audio) / sample_rate, 6), "audio_samples": len(audio), "sync": sync}
            _check_repairs(sync, meta.get("video_seconds", meta["audio_seconds"]), max_repair)
        elif use_video:
            meta["sync"] = {"video_start_s": round(vstart_s, 6)} | meta.pop("video_sync")
        seconds = [meta[k] for k in ("video_seconds", "audio_seconds") if k in meta]
        duration = min(seconds)
        if duration < min_seconds:
            raise MediaError("too_short", f"{duration:.2f} s < minimum {min_seconds:g} s")
        meta["duration"] = round(duration, 6)
        meta["modalities"] = [m for m, used in (("video", use_video), ("audio", use_audio)) if used]
    return meta, audio


def _probe_video(container: Any, cdur: float | None) -> dict[str, Any]:
    """The video fields of the manifest record (packets counted without decoding; the first frames decoded)."""
    import av

    vs = container.streams.video[0]
    # The grid's rate: the stream's base rate (FFmpeg's guess of the rate all timestamps fall on) when it is at least the
    # average, which frames dropped from a constant-rate file pull down; the average when the guess is far finer (a
    # rate of thousands from a time base: a grid that fine gains nothing).
    rate = vs.average_rate or vs.guessed_rate
    if not rate:
        raise MediaError("undecodable", "video stream has no frame rate")
    if vs.guessed_rate and rate <= vs.guessed_rate <= 4 * rate:
        rate = vs.guessed_rate
    fps = float(rate)
    times: list[float] = []  # each frame's time from the stream's first one, in seconds
    last_end = 0.0
    vstart = vs.start_time or 0
    try:
        for pkt in container.demux(vs):
            if pkt.size == 0 or pkt.pts is None:
                continue
            t = float((pkt.pts - vstart) * vs.time_base)
            times.append(t)
            last_end = max(last_end, t + (float(pkt.duration * vs.time_base) if pkt.duration else 1.0 / fps))
    except av.FFmpegError as e:
        raise MediaError("truncated", f"demuxing stopped at {last_end:.2f} s: {e}") from None
    n_packets = len(times)
    # Lenient on purpose: container durations often include a longer audio track. A file cut near its
    # end passes and is kept with the duration of the packets it really has.
    declared = _stream_seconds(vs, cdur)
    if declared and last_end < 0.9 * declared - 1.0:
        raise MediaError("truncated", f"video packets end at {last_end:.2f} s but the header says {declared:.2f} s")
    # Decode the first frames: catches undecodable codecs.
    container.seek(0)
    ok = 0
    try:
        for _frame in container.decode(vs):
            ok += 1
            if ok >= 2:
                break
    except av.FFmpegError as e:
        raise MediaError("undecodable", f"video codec {vs.codec_context.name!r}: {e}") from None
    if ok == 0:
        raise MediaError("undecodable", f"video codec {vs.codec_context.name!r}: no frame decoded")
    container.seek(0)
    # The frame grid at ``fps`` (what the clip plan indexes): slot k shows the newest frame at or before k / fps. Slots
    # without a frame of their own (dropped frames, a variable rate) show the one before; frames that share a slot
    # with a later one are never shown on the grid.
    num_frames = max(1, int(round(last_end * fps)))
    slots = len({int(np.floor(t * fps + 1e-3)) for t in times})
    video_sync = {"video_frames": n_packets, "video_missing_frames": max(0, num_frames - slots), "video_unshown_frames": n_packets - slots}
    return {
        "video_seconds": round(last_end, 6),
        "fps": fps,
        "num_frames": num_frames,
        "video_sync": video_sync,
        "width": vs.codec_context.width,
        "height": vs.codec_context.height,
        "video_codec": vs.codec_context.name,
    }


# Audio frames whose timestamp is further than this from where the samples before them end start a new segment: a
# gap (filled with silence) or an overlap (trimmed). Below it, timestamps are taken to be jitter and the samples run on
# (a drift smaller than this is corrected at the next discontinuity, so it never accumulates past it).
AUDIO_SYNC_TOLERANCE_S = 0.010


def _extract_audio(container: Any, sample_rate: int, t0: float | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The audio stream as mono float32 at ``sample_rate``, placed by its timestamps: sample ``j`` is the sound at
    time ``t0 + j / sample_rate`` (``t0`` in seconds; None: the stream's own first timestamp). Returns it with the
    audio fields of the record and the repairs (see :func:`probe_and_extract`).

    The decoded frames are cut into segments wherever a frame's timestamp is more than
    :data:`AUDIO_SYNC_TOLERANCE_S` from the end of the samples before it; each segment is resampled on its own and
    written where its first timestamp says: a gap between segments is silence, a segment that starts before the end of
    what is written loses its overlapping head, samples before ``t0`` are dropped, and a stream that starts after
    ``t0`` is preceded by silence. Within a segment the position follows the sample count, so resampling cannot drift."""
    import av

    ast = container.streams.audio[0]
    # from the audio's own first packet: a seek on the video stream would land on its first keyframe and lose the
    # audio before it (a stream that starts before the video, as a muxer that shifts timestamps to >= 0 writes it)
    container.seek(ast.start_time or 0, stream=ast, backward=True, any_frame=True)
    segments: list[tuple[float, np.ndarray]] = []  # (start in seconds, resampled samples)
    resampler, seg_start, seg_seconds, chunks = None, 0.0, 0.0, []

    def close_segment() -> None:
        if resampler is not None:
            for r in resampler.resample(None):
                chunks.append(r.to_ndarray().reshape(-1))
            if chunks:
                segments.append((seg_start, np.concatenate(chunks).astype(np.float32)))

    try:
        for fr in container.decode(ast):
            t = float(fr.pts * fr.time_base) if fr.pts is not None else None
            if resampler is not None and t is not None and abs(t - (seg_start + seg_seconds)) > AUDIO_SYNC_TOLERANCE_S:
                close_segment()
                resampler = None
            if resampler is None:
                resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
                seg_start, seg_seconds, chunks = (t if t is not None else (segments[-1][0] if segments else 0.0)), 0.0, []
            for r in resampler.resample(fr):
                chunks.append(r.to_ndarray().reshape(-1))
            seg_seconds += fr.samples / fr.sample_rate
        close_segment()
    except av.FFmpegError as e:
        raise MediaError("undecodable", f"audio codec {ast.codec_context.name!r}: {e}") from None
    if not segments:
        raise MediaError("undecodable", f"audio codec {ast.codec_context.name!r}: no samples decoded")
    t0 = segments[0][0] if t0 is None else t0
    placed: list[tuple[int, np.ndarray]] = []
    end = gaps = gap = overlap = lead = 0  # in samples: the end of what is placed so far, and the repairs
    for n, (start_s, data) in enumerate(segments):
        at = int(round((start_s - t0) * sample_rate))
        if n == 0:
            lead = min(len(data), max(0, -at))  # before the video's first frame: not in the side-car
        elif at > end:
            gaps, gap = gaps + 1, gap + at - end
        else:
            overlap += min(len(data), end - at)
        cut = max(0, -at, end - at)  # the head before t0, or over what is already placed
        if cut < len(data):
            placed.append((at + cut, data[cut:]))
            end = at + len(data)
    length = max((a + len(d) for a, d in placed), default=0)
    audio = np.zeros(length, np.float32)
    for a, d in placed:
        audio[a : a + len(d)] = d
    first = segments[0][0] - t0
    meta = {
        "audio_codec": ast.codec_context.name,
        "audio_streams": len(container.streams.audio),
        "source_sample_rate": ast.codec_context.sample_rate,
        "source_channels": ast.codec_context.channels,
        "sample_rate": sample_rate,
    }
    sync = {
        "audio_start_s": round(first, 6),  # > 0: the audio starts after the video (silence before it); < 0: before it (dropped)
        "audio_gaps": gaps,
        "audio_gap_s": round(gap / sample_rate, 6),
        "audio_overlap_s": round(overlap / sample_rate, 6),
        "audio_dropped_before_start_s": round(lead / sample_rate, 6),
    }
    return audio, meta | {"sync": sync}
