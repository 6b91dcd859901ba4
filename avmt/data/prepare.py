"""Prepare a folder of videos for training: probe every file, extract its audio, record kept and rejected files.

``python -m avmt.data.prepare (--root DIR | --csv FILE | --format F ...) --out OUT [--sample-rate 44100]
[--min-seconds 2] [--workers 4] [--probe-timeout 300] [--transcode [--short-side N] [--fps F] [--crf 23] [--preset paper]]``

- ``--format ucf101 --root DIR --splits DIR``, ``--format esc50 --root DIR``, ``--format kinetics-sounds --root DIR
  [--csv FILE]``: the transfer datasets as they ship (:mod:`avmt.data.layouts`); records carry their split or fold
  and the modalities they have (``modalities``: UCF101 videos may lack audio, ESC-50 is audio only).

- ``--root DIR``: every file under ``DIR/<label>/`` (any depth below the class folder) is an input; files
  directly in ``DIR`` are rejected with reason ``no_label``.
- ``--csv FILE``: rows ``path,label[,start,end]`` (a header row starting with ``path`` is skipped; relative
  paths are relative to the CSV's folder). ``start``/``end`` (seconds) restrict the usable span.

Outputs in ``OUT``: ``manifest.jsonl`` (one JSON object per kept file: ``id``, ``path``, ``label``,
``label_index``, ``audio`` = the mono 16-bit PCM side-car (``.npy``) at the target rate under ``OUT/audio/``, ``start``/``end``
of the usable span and the probe metadata from :func:`avmt.data.media.probe_and_extract`), ``rejected.jsonl``
(``path``, ``label``, ``reason``, ``detail``) and ``labels.json`` (label -> index, sorted names). Every input
ends in exactly one of the two files. Reasons: ``empty``, ``unreadable``, ``not_a_video``, ``truncated``,
``no_audio``, ``undecodable``, ``too_short``, ``out_of_sync``, ``no_label``, ``bad_span``, ``not_regular_file``, ``timeout``,
``transcode``, ``error`` (anything unexpected).

``--transcode [--short-side N] [--fps F] [--crf Q] [--preset P]``: also re-encode every kept video once into ``OUT/video/``
(:mod:`avmt.data.transcode`; defaults: the preset's largest train scale and ``data.fps``); its record's ``path`` is
then the transcoded file and ``source`` the original.

Resumable: results are appended as they finish; a re-run keeps every record whose file size and mtime
are unchanged (and whose audio side-car exists) and only processes the rest. A full disk stops the run (it is not
the file's fault, so no file is rejected for it): the finished records stay, partial audio/video files are removed,
and the same command continues once there is space.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avmt.data.media import MAX_REPAIR, MediaError, is_disk_full, probe_and_extract, write_pcm
from avmt.data.transcode import TranscodeSettings, transcode_video
from avmt.workers import TaskTimeout, WorkerDied, imap_bounded

REASONS = (
    "empty",
    "unreadable",
    "not_a_video",
    "truncated",
    "no_audio",
    "undecodable",
    "too_short",
    "out_of_sync",
    "no_label",
    "bad_span",
    "not_regular_file",
    "timeout",
    "transcode",
    "error",
)


@dataclass
class Item:
    """One input file: its path (as given), label and optional usable span in seconds. ``need``: the streams it must
    have, ``optional``: those kept when present (:func:`avmt.data.media.probe_and_extract`). ``label_index``: fixed
    by the dataset's own class list (None: from the sorted label names). ``fields``: copied into its record as they
    are (a dataset layout's split or fold)."""

    path: str
    label: str | None
    start: float | None = None
    end: float | None = None
    need: tuple[str, ...] = ("video", "audio")
    optional: tuple[str, ...] = ()
    label_index: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Summary:
    total: int = 0
    kept: int = 0
    rejected: int = 0
    processed: int = 0  # files probed in this run (the rest were already done)
    # with --transcode, over every kept record: bytes of the originals and of their transcoded copies, the seconds
    # the transcodes took (the worker's own clock) and the hours of video
    source_bytes: int = 0
    transcoded_bytes: int = 0
    transcode_seconds: float = 0.0
    video_hours: float = 0.0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    # over every kept record: how many had their timeline repaired, and each repair's total (see docs/data.md, "Time")
    repaired: int = 0
    repairs: dict[str, float] = field(default_factory=dict)


def scan_root(root: str | Path) -> list[Item]:
    """Every file under ``root``; the first folder level below ``root`` is the label."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a directory")
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            items.append(Item(str(Path(dirpath) / name), rel.parts[0] if rel.parts else None))
    return items


def scan_csv(csv_path: str | Path) -> list[Item]:
    """Rows ``path,label[,start,end]`` of a CSV file."""
    csv_path = Path(csv_path)
    items = []
    with open(csv_path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or (n == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) not in (2, 4):
                raise ValueError(f"{csv_path}:{n}: expected path,label[,start,end], got {len(row)} columns: {row}")
            p = Path(row[0].strip())
            p = p if p.is_absolute() else csv_path.parent / p
            start, end = None, None
            if len(row) == 4 and (row[2].strip() or row[3].strip()):
                try:
                    start, end = float(row[2]), float(row[3])
                except ValueError:
                    raise ValueError(f"{csv_path}:{n}: start,end must be numbers, got {row[2]!r},{row[3]!r}") from None
                if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
                    raise ValueError(f"{csv_path}:{n}: start,end must be finite with 0 <= start < end, got {start:g},{end:g}")
            items.append(Item(str(p), row[1].strip() or None, start, end))
    return items


def _file_key(path: str) -> str:
    return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def _not_regular(path: str) -> str | None:
    """Why ``path`` is not a regular file (a FIFO, a device, a socket, a folder: opening one can block forever), from
    ``stat`` alone; None for a regular file or one that cannot be stat'ed (the probe reports that)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "a folder" if stat.S_ISDIR(mode) else "not a regular file")
    return f"{kind}, not a regular file (not opened)"


class _ProbeTimeout(BaseException):
    """Raised by SIGALRM inside a probe or transcode; a BaseException so that no ``except Exception`` on the way
    mistakes it for a media error."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_ProbeTimeout` if the block runs longer than ``seconds`` (SIGALRM: main thread of a process)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _ProbeTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _base(item: Item) -> dict:
    """The fields every record of ``item`` starts with (what a re-run compares to decide whether it is done)."""
    st = _stat(item.path)
    return {
        "path": item.path,
        "label": item.label,
        "span": [item.start, item.end],
        "size": st[0] if st else None,
        "mtime_ns": st[1] if st else None,
    } | item.fields


def _stopped(item: Item, out: Path, outcome: TaskTimeout | WorkerDied, limit: float) -> dict:
    """The rejected record of a file whose worker was stopped at the wall-clock limit or died, its partial outputs
    removed (the worker could not clean up)."""
    key = _file_key(item.path)
    for part in (out / "audio" / f"{key}.part.npy", out / "video" / f"{key}.mp4.part.mp4"):
        part.unlink(missing_ok=True)
    if isinstance(outcome, TaskTimeout):
        why = f"still running after {limit:.3g} s of wall-clock time (--probe-timeout); its worker was stopped and replaced"
        return _base(item) | {"reason": "timeout", "detail": why}
    return _base(item) | {"reason": "error", "detail": f"{outcome.describe()} while processing this file; it was replaced"}


def wall_clock_limit(timeout_s: float, transcode: bool) -> float | None:
    """The wall-clock bound of one file in a worker (None for ``timeout_s`` 0): its steps' limits (probe and audio,
    then the transcode) and a margin, past which the worker is killed. Inside the worker each step is bounded by
    SIGALRM, which cannot interrupt a decoder blocked in C code: this bound can."""
    return (2 if transcode else 1) * timeout_s * 1.1 + 1.0 if timeout_s > 0 else None


def _process(args: tuple[Item, str, int, float, float, TranscodeSettings | None, float]) -> dict:
    """Probe one file, write its audio side-car (and its transcoded video); returns a kept record (``reason`` None) or a
    rejected one."""
    item, out, sample_rate, min_seconds, timeout_s, transcode, max_repair = args
    base = _base(item) | {"max_repair": max_repair}
    if item.label is None:
        return base | {"reason": "no_label", "detail": "file is not inside a class folder and has no CSV label"}
    why = _not_regular(item.path)
    if why is not None:
        return base | {"reason": "not_regular_file", "detail": why}
    try:
        with _time_limit(timeout_s):
            meta, audio = probe_and_extract(item.path, sample_rate, min_seconds, item.need, item.optional, max_repair)
        start = item.start or 0.0
        end = min(item.end, meta["duration"]) if item.end is not None else meta["duration"]
        if not 0 <= start < end or end - start < min_seconds:
            return base | {
                "reason": "bad_span",
                "detail": f"span [{item.start}, {item.end}] gives {max(0.0, end - start):.2f} s usable out of "
                f"{meta['duration']:.2f} s (minimum {min_seconds:g} s)",
            }
        key = _file_key(item.path)
        side = None
        if audio is not None:
            side = Path(out) / "audio" / f"{key}.npy"
            tmp = side.with_name(f"{key}.part.npy")
            try:
                write_pcm(tmp, audio)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, side)
        rec = base | {"reason": None, "id": key, "audio": str(side) if side else None, "start": start, "end": end, **meta}
        if transcode is None or "video" not in meta["modalities"]:
            return rec
        t0 = time.perf_counter()
        with _time_limit(timeout_s):
            video = transcode_video(item.path, Path(out) / "video" / f"{key}.mp4", transcode)
        source = {k: meta[k] for k in ("fps", "num_frames", "width", "height", "video_codec")} | {"path": item.path, "size": base["size"]}
        return (
            rec
            | video
            | {"path": str(Path(out) / "video" / f"{key}.mp4"), "source": source, "transcode": transcode.to_dict()}
            | {"transcode_seconds": round(time.perf_counter() - t0, 3)}
        )
    except _ProbeTimeout:
        return base | {
            "reason": "timeout",
            "detail": f"probing, decoding or transcoding took longer than {timeout_s:g} s (--probe-timeout)",
        }
    except MediaError as e:
        return base | {"reason": e.reason, "detail": e.detail}
    except Exception as e:
        if is_disk_full(e):
            raise  # not this file's fault: rejecting it (and every file after it) would stick across re-runs
        return base | {"reason": "error", "detail": f"{type(e).__name__}: {e}"}


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted run: that file is simply processed again
    return out


def prepare(
    items: list[Item],
    out: str | Path,
    sample_rate: int = 44100,
    min_seconds: float = 2.0,
    workers: int = 1,
    progress: bool = True,
    timeout_s: float = 300.0,
    transcode: TranscodeSettings | None = None,
    max_repair: float = MAX_REPAIR,
) -> Summary:
    """Process ``items`` into ``out`` (see the module docstring); returns the counts of this run. ``workers``: worker
    processes (:func:`avmt.workers.imap_bounded`; 0: in this process, where a decoder stuck in C code cannot be
    stopped). ``timeout_s`` bounds each file's probe and audio extraction, and its transcode (0: no bound); in a
    worker, a file still running at :func:`wall_clock_limit` is rejected as ``timeout`` and its worker replaced.
    Paths are recorded absolute, so the manifest works from any folder. ``transcode``: also re-encode every kept video into ``out/video/``
    (:mod:`avmt.data.transcode`); the record's ``path`` is then the transcoded file, ``source`` the original's path,
    size and video fields, ``transcode`` the settings (a re-run with other settings redoes the file)."""
    from tqdm import tqdm

    out = Path(out).resolve()
    items = [dataclasses.replace(it, path=os.path.abspath(it.path)) for it in items]
    (out / "audio").mkdir(parents=True, exist_ok=True)
    man_path, rej_path = out / "manifest.jsonl", out / "rejected.jsonl"
    previous: dict[str, dict] = {}
    for rec in _load(man_path) + _load(rej_path):
        previous[_input_path(rec)] = rec
    summary = Summary(total=len(items))
    done: dict[str, dict] = {}
    todo: list[Item] = []
    seen: set[str] = set()
    for it in items:
        if it.path in seen:
            raise ValueError(f"input {it.path} is listed twice")
        seen.add(it.path)
        rec = previous.get(it.path)
        st = _stat(it.path) or (None, None)  # an unreadable path stays done until it becomes readable
        fresh = (
            rec is not None
            and rec.get("label") == it.label
            and rec.get("size") == st[0]
            and rec.get("mtime_ns") == st[1]
            and rec.get("span") == [it.start, it.end]
            and rec.get("max_repair") == max_repair  # records from before timelines were repaired have none: redone
            and all(rec.get(k) == v for k, v in it.fields.items())
            and (rec.get("audio") is None or rec.get("sample_rate") == sample_rate)  # another --sample-rate: redo
            and (
                rec.get("reason") is not None
                or (
                    (rec.get("audio") is None or Path(rec["audio"]).exists())
                    and rec.get("transcode") == (transcode.to_dict() if transcode and "video" in _modalities(rec) else None)
                    and Path(rec["path"]).exists()
                )
            )
        )
        if fresh:
            done[it.path] = rec
        else:
            todo.append(it)
    summary.skipped = len(done)
    jobs = [(it, str(out), sample_rate, min_seconds, timeout_s, transcode, max_repair) for it in todo]
    if transcode is not None:
        (out / "video").mkdir(exist_ok=True)
    bar = tqdm(total=len(items), initial=len(done), desc="prepare", unit="file", disable=not progress)
    with open(man_path, "a") as fm, open(rej_path, "a") as fr:

        def record(rec: dict) -> None:
            done[_input_path(rec)] = rec
            (fr if rec.get("reason") else fm).write(json.dumps(rec) + "\n")
            (fr if rec.get("reason") else fm).flush()
            summary.processed += 1
            bar.update()

        try:
            if workers > 0:  # worker processes, each file bounded in wall-clock time (avmt.workers)
                limit = wall_clock_limit(timeout_s, transcode is not None)
                for n, rec in imap_bounded(_process, jobs, workers, limit):
                    if isinstance(rec, (TaskTimeout, WorkerDied)):
                        rec = _stopped(todo[n], out, rec, limit or 0.0) | {"max_repair": max_repair}
                    record(rec)
            else:
                for j in jobs:
                    record(_process(j))
        except OSError as e:
            if not is_disk_full(e):
                raise
            bar.close()
            free = shutil.disk_usage(out).free
            raise OSError(
                e.errno,
                f"No space left on device ({free / 2**20:.1f} MiB free) after {summary.processed} of "
                f"{len(jobs)} files; the {summary.processed} finished records are kept and no partial file is: free space "
                "and run the same command again to continue",
            ) from None
    bar.close()
    # Rewrite both files in input order, one record per input, and the label table.
    fixed = {it.label: it.label_index for it in items if it.label_index is not None}
    if fixed:  # the dataset's own class list (every item of such a layout carries its index)
        index = dict(sorted(fixed.items(), key=lambda kv: kv[1]))
    else:
        index = {name: i for i, name in enumerate(sorted({r["label"] for r in done.values() if r.get("reason") is None}))}
    kept = [done[it.path] | {"label_index": index[done[it.path]["label"]]} for it in items if done[it.path].get("reason") is None]
    rejected = [done[it.path] for it in items if done[it.path].get("reason") is not None]
    for path, recs in ((man_path, kept), (rej_path, rejected)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            "".join(json.dumps({k: v for k, v in r.items() if k != "reason"} if r.get("reason") is None else r) + "\n" for r in recs)
        )
        os.replace(tmp, path)
    (out / "labels.json").write_text(json.dumps(index, indent=1))
    summary.kept, summary.rejected = len(kept), len(rejected)
    for r in rejected:
        summary.reasons[r.get("reason")] = summary.reasons.get(r.get("reason"), 0) + 1
    for r in kept:
        fixes = repairs_of(r)
        summary.repaired += bool(fixes)
        for k, v in fixes.items():
            summary.repairs[k] = summary.repairs.get(k, 0.0) + v
    transcoded = [r for r in kept if r.get("transcode")]
    if transcoded:
        summary.source_bytes = sum(r["source"]["size"] or 0 for r in transcoded)
        summary.transcoded_bytes = sum(Path(r["path"]).stat().st_size for r in transcoded)
        summary.transcode_seconds = sum(r.get("transcode_seconds", 0.0) for r in transcoded)
        summary.video_hours = sum(r["source"]["num_frames"] / r["source"]["fps"] for r in transcoded) / 3600
    return summary


# Start and end offsets up to this are not reported as repairs: encoders' priming and frame sizes (an Opus or AAC frame)
_START_TOLERANCE_S = 0.050


def repairs_of(rec: dict) -> dict[str, float]:
    """The timeline repairs of one record, those that are not zero: seconds of audio silence put in before the audio
    started, in gaps and after it ended, audio dropped as overlapping, and video grid slots without a frame of their
    own (dropped frames, a variable rate) or frames never shown on the grid."""
    sync = rec.get("sync") or {}
    start = sync.get("audio_start_s", 0.0)
    fixes = {
        "audio_late_start_s": start if start > _START_TOLERANCE_S else 0.0,
        "audio_gap_s": sync.get("audio_gap_s", 0.0),
        "audio_end_pad_s": sync.get("audio_end_pad_s", 0.0) if sync.get("audio_end_pad_s", 0.0) > _START_TOLERANCE_S else 0.0,
        "audio_overlap_s": sync.get("audio_overlap_s", 0.0),
        "audio_before_video_s": sync.get("audio_dropped_before_start_s", 0.0) if -start > _START_TOLERANCE_S else 0.0,
        "video_missing_frames": float(sync.get("video_missing_frames", 0)),
        "video_unshown_frames": float(sync.get("video_unshown_frames", 0)),
    }
    return {k: v for k, v in fixes.items() if v}


def _modalities(rec: dict) -> list[str]:
    return rec.get("modalities") or ["video", "audio"]  # records of earlier versions: both


def _input_path(rec: dict) -> str:
    """The input file a record is about (a transcoded record's ``path`` is its output)."""
    return (rec.get("source") or {}).get("path") or rec["path"]


def main(argv: list[str] | None = None) -> int:
    from avmt.data.layouts import FORMATS

    p = argparse.ArgumentParser(prog="python -m avmt.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, help="folder with one sub-folder per class (or the dataset of --format)")
    p.add_argument("--csv", type=Path, help="CSV with path,label[,start,end] (kinetics-sounds: youtube_id,time_start,time_end,label,split)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="input layout (default: folders with --root, csv with --csv); ucf101, esc50, kinetics-sounds: as those datasets ship",
    )
    p.add_argument("--splits", type=Path, help="ucf101: the folder with classInd.txt, trainlist0N.txt, testlist0N.txt")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sample-rate", type=int, default=44100)
    p.add_argument("--min-seconds", type=float, default=2.0, help="shorter files are rejected (default: one paper clip)")
    p.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes (0: in this process, no wall-clock bound)"
    )
    p.add_argument("--probe-timeout", type=float, default=300.0, help="seconds per file before it is rejected as 'timeout' (0: none)")
    p.add_argument(
        "--max-repair",
        type=float,
        default=MAX_REPAIR,
        help=f"share of a file's duration that timeline repairs (silence for missing audio, overlapping audio dropped) may cover "
        f"before it is rejected as 'out_of_sync' (default {MAX_REPAIR:g})",
    )
    p.add_argument("--transcode", action="store_true", help="re-encode every kept video once to the training size and rate (H.264 mp4)")
    p.add_argument("--preset", default="paper", help="the config whose data settings set the --transcode defaults (default paper)")
    p.add_argument("--short-side", type=int, default=None, help="transcoded short side in px (default: the preset's largest train scale)")
    p.add_argument("--fps", type=float, default=None, help="transcoded constant frame rate (default: the preset's data.fps)")
    p.add_argument("--crf", type=int, default=None, help="x264 constant rate factor of the transcodes, 0-51, lower is better (default 23)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected failure too")
    a = p.parse_args(argv)
    fmt = a.format or ("csv" if a.csv and not a.root else "folders")
    needs = {"folders": (a.root, "--root"), "csv": (a.csv, "--csv"), "ucf101": (a.root and a.splits, "--root and --splits")}
    needs |= {"esc50": (a.root, "--root"), "kinetics-sounds": (a.root, "--root (and optionally --csv)")}
    given, what = needs[fmt]
    extra = (a.splits and fmt != "ucf101") or (a.csv and fmt not in ("csv", "kinetics-sounds")) or (a.root and fmt == "csv")
    if not given or extra:
        print(f"error: --format {fmt} takes {what}", file=sys.stderr)
        return 2
    if not 0 <= a.max_repair <= 1:
        print(f"error: --max-repair must be a share of the duration in [0, 1], got {a.max_repair:g}", file=sys.stderr)
        return 2
    if a.sample_rate <= 0 or not 0 < a.min_seconds < math.inf or a.workers < 0 or not 0 <= a.probe_timeout < math.inf:
        print(
            "error: --sample-rate > 0, --min-seconds finite and > 0, --workers >= 0, --probe-timeout finite and >= 0 are needed, got "
            f"{a.sample_rate}, {a.min_seconds:g}, {a.workers}, {a.probe_timeout:g}",
            file=sys.stderr,
        )
        return 2
    for flag, path, kind in (("--root", a.root, "dir"), ("--splits", a.splits, "dir"), ("--csv", a.csv, "file")):
        if path is not None and not (path.is_dir() if kind == "dir" else path.is_file()):  # a FIFO as --csv would block
            print(f"error: {flag} {path} is not a {'directory' if kind == 'dir' else 'regular file'}", file=sys.stderr)
            return 2
    if a.out.exists() and not a.out.is_dir():
        print(f"error: --out {a.out} exists and is not a folder", file=sys.stderr)
        return 2
    transcode = None
    if a.transcode:
        from avmt.config import ConfigError, load_config

        try:
            data = load_config(a.preset).data
            short = a.short_side if a.short_side is not None else data.scale_range[1]
            quality = {} if a.crf is None else {"crf": a.crf}
            transcode = TranscodeSettings(short, a.fps if a.fps is not None else data.fps, **quality)
        except (ConfigError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif a.short_side is not None or a.fps is not None or a.crf is not None:
        print("error: --short-side, --fps and --crf set what --transcode writes; pass --transcode", file=sys.stderr)
        return 2
    try:
        from avmt.data import layouts

        items = {
            "folders": lambda: scan_root(a.root),
            "csv": lambda: scan_csv(a.csv),
            "ucf101": lambda: layouts.scan_ucf101(a.root, a.splits),
            "esc50": lambda: layouts.scan_esc50(a.root),
            "kinetics-sounds": lambda: layouts.scan_kinetics_sounds(a.root, a.csv),
        }[fmt]()
    except (OSError, ValueError) as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        s = prepare(items, a.out, a.sample_rate, a.min_seconds, a.workers, not a.quiet, a.probe_timeout, transcode, a.max_repair)
    except (ValueError, OSError) as e:  # an input listed twice; --out not writable, a full disk
        if a.debug:
            raise
        print(f"error: {e}" if isinstance(e, ValueError) else f"error: cannot write {a.out}: {e.strerror or e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(s.reasons.items())) or "none"
    print(
        f"{s.total} files: {s.kept} kept, {s.rejected} rejected ({reasons}); processed {s.processed}, "
        f"already done {s.skipped}; manifest {a.out / 'manifest.jsonl'}"
    )
    if s.repaired:
        said = ", ".join(f"{k} {v:.3g}" for k, v in sorted(s.repairs.items()))
        print(f"timelines repaired in {s.repaired} of {s.kept} kept files ({said}); each record's 'sync' says what (docs/data.md, 'Time')")
    if transcode is not None and s.video_hours > 0:
        print(
            f"transcoded to {transcode.short_side} px, {transcode.fps:g} fps: {s.transcoded_bytes / 2**20:.3g} MiB for "
            f"{s.source_bytes / 2**20:.3g} MiB of originals ({s.transcoded_bytes / 2**30 / s.video_hours:.2f} GiB per hour of "
            f"video); {s.transcode_seconds / s.video_hours / 60:.1f} min of one worker per hour of video"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
