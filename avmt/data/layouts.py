"""The transfer datasets as they ship: their folder layouts and split files, read into :class:`Item` lists for
:func:`avmt.data.prepare.prepare` (``python -m avmt.data.prepare --format ...``).

- ``ucf101``: ``ROOT/<Class>/v_<Class>_gXX_cYY.avi`` and a splits folder with ``classInd.txt`` ("1 ApplyEyeMakeup",
  1-based), ``trainlist0{1,2,3}.txt`` ("ApplyEyeMakeup/v_..._g08_c01.avi 1") and ``testlist0{1,2,3}.txt``. Labels
  come from ``classInd.txt`` (0-based in the manifest); each record's ``splits`` says ``train`` or ``test`` per
  split it is listed in. Videos need no audio (about half of UCF101 has none): the visual protocol keeps them.
- ``esc50``: ``ROOT/audio/<fold>-<clip>-<take>-<target>.wav`` and ``ROOT/meta/esc50.csv``
  (``filename,fold,target,category,esc10,src_file,take``): audio-only records with their ``fold`` (1-5), labels =
  ``target``. A file the CSV does not list is rejected (``no_label``).
- ``kinetics-sounds``: ``ROOT/<split>/<label>/<youtube_id>_<start>_<end>.mp4`` (the released code's layout:
  label = folder, split = top folder), or a CSV (``youtube_id,time_start,time_end,label,split``) naming the clips,
  found anywhere under ROOT by their file name (``<id>_<start:06d>_<end:06d>``, or ``<id>``). Labels = the sorted
  class names. Videos need audio.

A split file that names a file not on disk still gives an item: prepare rejects it (``unreadable``), so every listed
file is accounted for. A file listed in both the train and the test list of one split is an error.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from avmt.data.prepare import Item

FORMATS = ("folders", "csv", "ucf101", "esc50", "kinetics-sounds")
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".webm", ".mov")


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]


def scan_ucf101(root: str | Path, splits: str | Path) -> list[Item]:
    """Every video under ``root``'s class folders, with its ``classInd.txt`` label and its ``splits``."""
    root, splits = Path(root), Path(splits)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a directory")
    classes: dict[str, int] = {}
    for n, line in _lines(splits / "classInd.txt"):
        m = re.fullmatch(r"(\d+)\s+(\S+)", line)
        if not m or int(m[1]) < 1:
            raise ValueError(f"{splits / 'classInd.txt'}:{n}: expected '<index from 1> <class name>', got {line!r}")
        classes[m[2]] = int(m[1]) - 1
    if sorted(classes.values()) != list(range(len(classes))):
        raise ValueError(f"{splits / 'classInd.txt'}: class indices are not 1..{len(classes)} once each")
    membership: dict[str, dict[str, str]] = {}
    for k in (1, 2, 3):
        for kind in ("train", "test"):
            path = splits / f"{kind}list{k:02d}.txt"
            if not path.exists():
                continue
            for n, line in _lines(path):
                rel = line.split()[0]
                cls = rel.split("/")[0]
                if cls not in classes or "/" not in rel:
                    raise ValueError(f"{path}:{n}: {rel!r} is not <Class>/<file> with a class of classInd.txt")
                seen = membership.setdefault(rel, {})
                if seen.get(str(k)) not in (None, kind):
                    raise ValueError(f"{rel} is in both the train and the test list of split {k}")
                seen[str(k)] = kind
    if not membership:
        raise FileNotFoundError(f"{splits} holds no trainlist0N.txt / testlist0N.txt")
    on_disk = {
        f"{c.name}/{f.name}"
        for c in sorted(root.iterdir())
        if c.is_dir()
        for f in sorted(c.iterdir())
        if f.suffix.lower() in VIDEO_SUFFIXES
    }
    items = []
    for rel in sorted(on_disk | set(membership)):
        cls = rel.split("/")[0]
        label, index = (cls, classes[cls]) if cls in classes else (None, None)
        fields = {"splits": membership.get(rel, {})}
        items.append(Item(str(root / rel), label, need=("video",), optional=("audio",), label_index=index, fields=fields))
    return items


def scan_esc50(root: str | Path) -> list[Item]:
    """The clips of ``root/meta/esc50.csv`` (audio-only, with their fold); files it does not list come without a label."""
    root = Path(root)
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} does not exist (expected the ESC-50 layout: ROOT/audio/*.wav, ROOT/meta/esc50.csv)")
    items, listed = [], set()
    with open(meta, newline="") as f:
        rows = csv.DictReader(f)
        missing = {"filename", "fold", "target", "category"} - set(rows.fieldnames or ())
        if missing:
            raise ValueError(f"{meta}: no column {', '.join(sorted(missing))} (expected filename,fold,target,category,...)")
        for n, row in enumerate(rows, 2):
            name = row["filename"].strip()
            m = re.fullmatch(r"(\d+)-.+-(\d+)\.wav", name)
            try:
                fold, target = int(row["fold"]), int(row["target"])
            except ValueError:
                raise ValueError(f"{meta}:{n}: fold and target must be integers, got {row['fold']!r}, {row['target']!r}") from None
            if not m or int(m[1]) != fold or int(m[2]) != target:
                raise ValueError(f"{meta}:{n}: {name!r} does not match fold {fold} and target {target} (<fold>-<clip>-<take>-<target>.wav)")
            listed.add(name)
            fields = {"fold": fold}
            items.append(Item(str(root / "audio" / name), row["category"].strip(), need=("audio",), label_index=target, fields=fields))
    for f in sorted((root / "audio").glob("*")) if (root / "audio").is_dir() else ():
        if f.name not in listed and not f.name.startswith("."):
            items.append(Item(str(f), None, need=("audio",)))
    return items


def scan_kinetics_sounds(root: str | Path, csv_path: str | Path | None = None) -> list[Item]:
    """The authors' layout ``root/<split>/<label>/<file>``, or the clips a CSV names, found under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a directory")
    if csv_path is None:
        items = []
        for split in sorted(p for p in root.iterdir() if p.is_dir()):
            for label in sorted(p for p in split.iterdir() if p.is_dir()):
                for dirpath, dirnames, filenames in os.walk(label):
                    dirnames.sort()
                    for name in sorted(filenames):
                        if not name.startswith("."):
                            items.append(Item(str(Path(dirpath) / name), label.name, fields={"split": split.name}))
        if not items:
            raise FileNotFoundError(f"{root} holds no <split>/<label>/<video> files")
        return items
    by_stem = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            by_stem.setdefault(Path(name).stem, str(Path(dirpath) / name))
    items = []
    with open(csv_path, newline="") as f:
        rows = csv.DictReader(f)
        missing = {"youtube_id", "time_start", "time_end", "label", "split"} - set(rows.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: no column {', '.join(sorted(missing))} (expected youtube_id,time_start,time_end,label,split)")
        for n, row in enumerate(rows, 2):
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except ValueError:
                raise ValueError(f"{csv_path}:{n}: time_start, time_end must be numbers") from None
            vid, label, split = row["youtube_id"].strip(), row["label"].strip(), row["split"].strip()
            stem = f"{vid}_{start:06d}_{end:06d}"
            path = by_stem.get(stem) or by_stem.get(vid) or str(root / split / label / f"{stem}.mp4")  # absent: rejected
            items.append(Item(path, label, fields={"split": split}))
    return items
