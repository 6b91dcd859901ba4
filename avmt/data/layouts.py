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

The metadata is checked against each dataset's fixed definition, and anything else is an error (``ValueError``
naming the file, line and entry) before any file is probed:

- every entry of a split list or meta CSV names a file inside ROOT: a plain relative path (no ``..``, no absolute
  path, no empty or ``.`` part), checked as written (symbolic links inside ROOT are the user's own and followed);
- UCF101: ``classInd.txt`` holds ``<index> <name>`` lines, indices 1..N once each, names once each; a split line
  is ``<Class>/<file>`` with a class of ``classInd.txt`` and, in the train lists (always) and the test lists (when
  present), that class's index;
- ESC-50: every row has a filename, fold 1-5 and target 0-49 (:data:`ESC50_FOLDS`, :data:`ESC50_CLASSES`), the
  file name's fold and target are the row's, and ``target`` and ``category`` name one class each way;
- Kinetics-Sounds: splits are ``train`` and ``test`` (:data:`KS_SPLITS`, what the protocol reads) and at most
  :data:`KS_MAX_CLASSES` classes (the released code's ``NUM_CLASSES``). The class names are not in the released
  code, so avmt does not fix them: in the folder layout every split must hold the same class folders (a folder in
  one split only is refused), with ``--csv`` the classes are the CSV's labels. Label indices are the sorted class
  names of that class list, fixed before any file is probed, so a class whose files are all rejected renumbers no
  other.
"""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

from avmt.data.prepare import Item

FORMATS = ("folders", "csv", "ucf101", "esc50", "kinetics-sounds")
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".webm", ".mov")
ESC50_FOLDS = range(1, 6)
ESC50_CLASSES = 50  # targets 0-49
KS_SPLITS = ("train", "test")  # avmt.protocols.split_of reads these two; any other split would be dropped silently
KS_MAX_CLASSES = 32  # the released code's configs/kinetics-sounds/config.yaml: MODEL.NUM_CLASSES 32


def _bad_entry(entry: str, parts: int) -> str | None:
    """Why ``entry`` (as a split list or meta CSV writes it) is not ``parts`` plain path components relative to the
    dataset's root, or None. Checked as written, so nothing outside the root can be named."""
    if not entry:
        return "it is empty"
    if entry.startswith(("/", "\\")):
        return "it is an absolute path"
    names = re.split(r"[/\\]", entry)
    if any(n in ("", ".", "..") for n in names):
        return "it has an empty, '.' or '..' part"
    if len(names) != parts:
        return f"it has {len(names)} path parts, expected {parts}"
    return None


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
        if _bad_entry(m[2], 1):
            raise ValueError(f"{splits / 'classInd.txt'}:{n}: class name {m[2]!r} is not a folder name ({_bad_entry(m[2], 1)})")
        if m[2] in classes:
            raise ValueError(f"{splits / 'classInd.txt'}:{n}: class {m[2]!r} is listed twice")
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
                fields = line.split()
                rel = fields[0]
                why = _bad_entry(rel, 2)
                if why:
                    raise ValueError(f"{path}:{n}: {rel!r} is not <Class>/<file> inside --root: {why}")
                cls = rel.split("/")[0]
                if cls not in classes:
                    raise ValueError(f"{path}:{n}: {rel!r}: class {cls!r} is not in classInd.txt")
                # the class-index column: always in the train lists, optional in the test lists (UCF101 ships none)
                if len(fields) > 2 or (kind == "train" and len(fields) != 2):
                    want = "'<Class>/<file> <class index>'" if kind == "train" else "'<Class>/<file> [<class index>]'"
                    raise ValueError(f"{path}:{n}: expected {want}, got {line!r}")
                if len(fields) == 2 and fields[1] != str(classes[cls] + 1):
                    raise ValueError(
                        f"{path}:{n}: {rel!r} has class index {fields[1]!r}, but classInd.txt gives {cls} index {classes[cls] + 1}"
                    )
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
        classes: dict[int, tuple[str, int]] = {}  # target -> (category, line)
        targets: dict[str, tuple[int, int]] = {}  # category -> (target, line)
        for n, row in enumerate(rows, 2):
            empty = [k for k in ("filename", "fold", "target", "category") if not (row.get(k) or "").strip()]
            if empty:
                raise ValueError(f"{meta}:{n}: no {', '.join(empty)} (expected filename,fold,target,category,...)")
            name, category = row["filename"].strip(), row["category"].strip()
            why = _bad_entry(name, 1)
            if why:
                raise ValueError(f"{meta}:{n}: filename {name!r} is not a file name in {root / 'audio'}: {why}")
            m = re.fullmatch(r"(\d+)-.+-(\d+)\.wav", name)
            try:
                fold, target = int(row["fold"]), int(row["target"])
            except ValueError:
                raise ValueError(f"{meta}:{n}: fold and target must be integers, got {row['fold']!r}, {row['target']!r}") from None
            if fold not in ESC50_FOLDS or not 0 <= target < ESC50_CLASSES:
                raise ValueError(f"{meta}:{n}: fold {fold}, target {target}: ESC-50 has folds 1-5 and targets 0-{ESC50_CLASSES - 1}")
            if not m or int(m[1]) != fold or int(m[2]) != target:
                raise ValueError(f"{meta}:{n}: {name!r} does not match fold {fold} and target {target} (<fold>-<clip>-<take>-<target>.wav)")
            known, other = classes.setdefault(target, (category, n)), targets.setdefault(category, (target, n))
            if known[0] != category:
                raise ValueError(f"{meta}:{n}: target {target} is {category!r} here but {known[0]!r} on line {known[1]}")
            if other[0] != target:
                raise ValueError(f"{meta}:{n}: category {category!r} is target {target} here but {other[0]} on line {other[1]}")
            listed.add(name)
            fields = {"fold": fold}
            items.append(Item(str(root / "audio" / name), category, need=("audio",), label_index=target, fields=fields))
    for f in sorted((root / "audio").glob("*")) if (root / "audio").is_dir() else ():
        if f.name not in listed and not f.name.startswith("."):
            items.append(Item(str(f), None, need=("audio",)))
    return items


def scan_kinetics_sounds(root: str | Path, csv_path: str | Path | None = None) -> list[Item]:
    """The authors' layout ``root/<split>/<label>/<file>``, or the clips a CSV names, found under ``root``; labels
    indexed by the sorted class list (the class folders, the same in every split; or the CSV's labels)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a directory")
    if csv_path is None:
        items = []
        splits = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for split in splits:
            if split.name not in KS_SPLITS:
                raise ValueError(f"{split}: {split.name!r} is not a Kinetics-Sounds split folder (expected {', '.join(KS_SPLITS)})")
        per_split = {s.name: {p.name for p in s.iterdir() if p.is_dir() and not p.name.startswith(".")} for s in splits}
        classes = sorted(set().union(*per_split.values()))
        for name, have in per_split.items():
            for c in classes:
                if c not in have:
                    where = ", ".join(s for s, h in per_split.items() if c in h)
                    raise ValueError(
                        f"{root / where.split(', ')[0] / c}: class folder {c!r} is in {where} but not in {name}; every split "
                        "holds the same classes (a folder that is not a class would renumber the others)"
                    )
        _check_class_count(classes, root)
        index = {c: i for i, c in enumerate(classes)}
        for split in splits:
            for label in sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for dirpath, dirnames, filenames in os.walk(label):
                    dirnames.sort()
                    for name in sorted(filenames):
                        if not name.startswith("."):
                            path = str(Path(dirpath) / name)
                            items.append(Item(path, label.name, label_index=index[label.name], fields={"split": split.name}))
        if not items:
            raise FileNotFoundError(f"{root} holds no <split>/<label>/<video> files")
        return items
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"--csv {csv_path} is not a file")
    by_stem = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            by_stem.setdefault(Path(name).stem, str(Path(dirpath) / name))
    rows_read = []
    with open(csv_path, newline="") as f:
        rows = csv.DictReader(f)
        columns = ("youtube_id", "time_start", "time_end", "label", "split")
        missing = set(columns) - set(rows.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: no column {', '.join(sorted(missing))} (expected youtube_id,time_start,time_end,label,split)")
        for n, row in enumerate(rows, 2):
            empty = [k for k in columns if not (row.get(k) or "").strip()]
            if empty:
                raise ValueError(f"{csv_path}:{n}: no {', '.join(empty)}")
            try:
                start, end = float(row["time_start"]), float(row["time_end"])
            except ValueError:
                raise ValueError(f"{csv_path}:{n}: time_start, time_end must be numbers") from None
            if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
                raise ValueError(f"{csv_path}:{n}: time_start, time_end must be finite with 0 <= start < end, got {start:g}, {end:g}")
            vid, label, split = row["youtube_id"].strip(), row["label"].strip(), row["split"].strip()
            if split not in KS_SPLITS:
                raise ValueError(f"{csv_path}:{n}: split {split!r} is not a Kinetics-Sounds split (expected {', '.join(KS_SPLITS)})")
            for what, value in (("youtube_id", vid), ("label", label)):
                why = _bad_entry(value, 1)
                if why:
                    raise ValueError(f"{csv_path}:{n}: {what} {value!r} cannot name a file or folder inside --root: {why}")
            rows_read.append((vid, int(start), int(end), label, split))
    classes = sorted({label for _, _, _, label, _ in rows_read})
    _check_class_count(classes, csv_path)
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for vid, start, end, label, split in rows_read:
        stem = f"{vid}_{start:06d}_{end:06d}"
        path = by_stem.get(stem) or by_stem.get(vid) or str(root / split / label / f"{stem}.mp4")  # absent: rejected
        items.append(Item(path, label, label_index=index[label], fields={"split": split}))
    return items


def _check_class_count(classes: list[str], where: Path) -> None:
    if len(classes) > KS_MAX_CLASSES:
        raise ValueError(
            f"{where}: {len(classes)} classes ({', '.join(classes[:3])}, ...), but Kinetics-Sounds has {KS_MAX_CLASSES}: "
            "a folder or label that is not one of its classes?"
        )
