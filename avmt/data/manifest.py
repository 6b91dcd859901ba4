"""The manifest: one JSON record per kept video, written by :mod:`avmt.data.prepare`, read by both loaders and by
evaluation. :class:`Record` types it; :func:`load_manifest` reads and checks it, once, so that a bad record stops a
run before any work with its line and field named, not sample by sample inside a loader."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, TypedDict


class Record(TypedDict, total=False):
    """One kept file. ``modalities``: what it has, ``["video", "audio"]`` (the default when absent), ``["video"]``
    (a video without sound, e.g. half of UCF101) or ``["audio"]`` (e.g. ESC-50). Required (checked by
    :func:`check_record`): ``path`` (the source file), ``label``, ``label_index``, ``start``/``end`` (the usable
    span, seconds), ``duration``; with video ``fps``; with audio ``audio`` (its mono 16-bit side-car: ``.npy``, or
    FLAC from earlier versions) and ``sample_rate`` (of the side-car). Written by prepare, used where present:
    ``id``, ``num_frames``, ``width``, ``height``, ``video_codec``, ``audio_codec``, ``audio_streams``,
    ``source_sample_rate``, ``source_channels``, ``video_seconds``, ``audio_seconds``, ``audio_samples``, ``size``,
    ``mtime_ns``, ``span``; a dataset layout's ``splits`` ({split: "train" | "test"}, UCF101), ``split``
    (Kinetics-Sounds) or ``fold`` (ESC-50)."""

    path: str
    audio: str
    label: str
    label_index: int
    start: float
    end: float
    duration: float
    fps: float
    sample_rate: int
    id: str
    num_frames: int
    width: int
    height: int
    video_codec: str
    audio_codec: str
    modalities: list[str]
    splits: dict[str, str]
    split: str
    fold: int


MODALITIES = ("video", "audio")

# the fields a kept record must have, and what each must be (checked once, when a manifest is loaded): for every
# record, then per modality it has
_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "path": (str, "a path"),
    "label": (str, "a class name"),
    "label_index": (int, "an integer >= 0"),
    "start": ((int, float), "a number >= 0"),
    "end": ((int, float), "a number > start"),
    "duration": ((int, float), "a number > 0"),
}
_MODALITY_FIELDS: dict[str, dict[str, tuple[type | tuple[type, ...], str]]] = {
    "video": {"fps": ((int, float), "a number > 0")},
    "audio": {"audio": (str, "a path"), "sample_rate": (int, "an integer > 0")},
}


def modalities_of(rec: dict) -> tuple[str, ...]:
    """The modalities a record has (records without the field, from earlier versions: both)."""
    return tuple(rec.get("modalities") or MODALITIES)


def check_record(rec: Any) -> str | None:
    """Why a manifest record is unusable (the field named), or None."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    mods = rec.get("modalities", list(MODALITIES))
    if not isinstance(mods, list) or not mods or len(set(mods)) != len(mods) or not set(mods) <= set(MODALITIES):
        return f"field 'modalities'={mods!r}: expected a non-empty list of distinct names from {list(MODALITIES)}"
    fields = _FIELDS | {k: v for m in mods for k, v in _MODALITY_FIELDS[m].items()}
    for name, (tp, what) in fields.items():
        v = rec.get(name)
        if v is None:
            return f"field {name!r} is missing"
        if isinstance(v, bool) or not isinstance(v, tp) or (isinstance(v, float) and not math.isfinite(v)):
            return f"field {name!r}={v!r}: expected {what}"
    if rec["label_index"] < 0 or rec["start"] < 0 or rec["end"] <= rec["start"]:
        return (
            f"fields label_index={rec['label_index']!r}, start={rec['start']!r}, end={rec['end']!r}: expected index >= 0, 0 <= start < end"
        )
    if rec["duration"] <= 0 or rec.get("fps", 1) <= 0 or rec.get("sample_rate", 1) <= 0:
        return f"fields duration={rec['duration']!r}, fps={rec.get('fps')!r}, sample_rate={rec.get('sample_rate')!r}: expected numbers > 0"
    return None


def load_manifest(path: str | Path) -> list[Record]:
    """The kept records of a ``manifest.jsonl`` (or of the folder holding it), each checked against the record
    schema once, here: a malformed line raises ``ValueError`` naming the line number and the field. Relative paths
    in a record are taken relative to the manifest's folder."""
    p = Path(path)
    p = p / "manifest.jsonl" if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(f"manifest {p} does not exist: run python -m avmt.data.prepare first")
    recs: list[Record] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {p}, line {n}: not valid JSON ({e.msg}); run python -m avmt.data.prepare again") from None
        why = check_record(rec)
        if why is not None:
            raise ValueError(f"manifest {p}, line {n}: {why}")
        for key in ("path", "audio"):
            if rec.get(key) is not None and not os.path.isabs(rec[key]):
                rec[key] = str(p.parent.resolve() / rec[key])
        if rec["path"] in seen:
            raise ValueError(f"manifest {p}, line {n}: {rec['path']} is listed again (first on line {seen[rec['path']]})")
        seen[rec["path"]] = n
        recs.append(rec)
    if not recs:
        raise ValueError(f"manifest {p} holds no usable record")
    return recs
