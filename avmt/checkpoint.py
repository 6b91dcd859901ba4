"""Crash-safe, verified training checkpoints: weights in safetensors, the rest loadable with ``weights_only=True``.

Layout of a run folder::

    RUN/checkpoints/step_000500/model.safetensors   weights of the Pretraining module (model + heads)
    RUN/checkpoints/step_000500/state.pt            optimizer, scheduler, step, RNG states, data position, config
    RUN/checkpoints/step_000500/manifest.json       size and SHA-256 of the two files above
    RUN/checkpoints/latest                          the name of the newest checkpoint (a hint, see below)

What is guaranteed (``tests/test_checkpoint.py`` kills the write at each of its points and damages each file):

- A checkpoint is written into ``step_XXXXXX.tmp``; every file and the folder are fsynced before the rename that
  makes it ``step_XXXXXX``. Saving a step that already exists first moves the old copy aside
  (``step_XXXXXX.old``) and deletes it only once the new one is in place, so a kill never leaves a step with no
  complete copy: :func:`find_checkpoint` also considers ``.old`` and complete ``.tmp`` folders.
- ``manifest.json`` records each file's size and SHA-256; :func:`verify` and :func:`load_checkpoint` check them, so
  flipped bytes or a truncated file are found instead of trained on.
- ``latest`` is a hint: :func:`find_checkpoint` scans every checkpoint, newest step first, and returns the first
  that verifies, with the reason each newer one was skipped. A missing or damaged pointer costs nothing.
- Pruning keeps the ``keep`` highest step numbers (parsed, not sorted by name) and never the one just written.

Not guaranteed: durability against a disk that lies about fsync, and checkpoints written by older avmt versions
without a manifest load only with ``allow_unverified=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FILES = ("model.safetensors", "state.pt")
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d+)(\.tmp|\.old)?$")
# the points of a write where tests inject a kill (save_checkpoint's ``fault`` hook), in order
LOW_SPACE_BYTES = 64 * 2**20  # below this, a failed torch.save is reported as the full disk it almost surely is
FAULT_POINTS = ("weights", "state", "manifest", "synced", "moved_aside", "renamed", "pointer", "pruned")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or trusted; the message says which file and why."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_of(path: Path) -> int | None:
    """The step number of a checkpoint folder name (``step_000500``, ``.tmp``, ``.old``), else None."""
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    module: nn.Module,
    state: dict[str, Any],
    keep: int = 3,
    fault: Callable[[str], None] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` (see the module docstring for what a crash leaves); keeps the ``keep``
    highest steps. ``state`` holds tensors and plain Python values. ``fault(point)`` is called at each of
    :data:`FAULT_POINTS` (tests raise there to simulate a kill). Raises :class:`CheckpointError` when the disk
    refuses the write (full, read-only), after removing the partial folder."""
    root = Path(run_dir) / "checkpoints"
    hook = fault or (lambda point: None)
    name = f"step_{step:06d}"
    tmp, final, old = root / f"{name}.tmp", root / name, root / f"{name}.old"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _recover(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, tmp / FILES[0])
        hook("weights")
        torch.save(state, tmp / FILES[1])
        hook("state")
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in FILES}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        hook("manifest")
        for f in (*FILES, MANIFEST):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        hook("synced")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write the checkpoint of step {step} into {root}: {e.strerror or e}") from None
    except RuntimeError as e:  # torch.save reports a full disk as an opaque C++ error ("unexpected pos 768 vs 662")
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free
        why = f"No space left on device ({free / 2**20:.1f} MiB free)" if free < LOW_SPACE_BYTES else str(e).splitlines()[0]
        raise CheckpointError(f"cannot write the checkpoint of step {step} into {root}: {why}") from None
    if final.exists():  # the same step again (a finished run re-run, --stop-at at a save step): keep it until replaced
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        hook("moved_aside")
    os.replace(tmp, final)
    _fsync_dir(root)
    hook("renamed")
    shutil.rmtree(old, ignore_errors=True)
    _write_atomic(root / "latest", name)
    hook("pointer")
    _prune(root, keep, final)
    hook("pruned")
    return final


def _recover(root: Path) -> None:
    """Put back in place what an interrupted write left as the only copy of a step: a verified ``.tmp`` (the new
    copy, finished) or else a verified ``.old`` (the copy it was replacing)."""
    complete = {step_of(p) for p in root.iterdir() if p.is_dir() and p.suffix == ""}
    for suffix in (".tmp", ".old"):
        for p in sorted(root.glob(f"step_*{suffix}")):
            s = step_of(p)
            if s is not None and s not in complete and verify(p) is None:
                os.replace(p, root / f"step_{s:06d}")
                complete.add(s)
    _fsync_dir(root)


def _prune(root: Path, keep: int, current: Path) -> None:
    """Keep the ``keep`` highest complete steps (and ``current``); drop what interrupted writes left of older steps
    (``current`` is complete and verified, so they are never the only copy of anything newer)."""
    now = step_of(current) or 0
    complete = sorted((s, p) for p in root.iterdir() if p.is_dir() and (s := step_of(p)) is not None and p.suffix == "")
    for _, path in complete[: max(0, len(complete) - keep)]:
        if path != current:
            shutil.rmtree(path, ignore_errors=True)
    for p in root.iterdir():
        s = step_of(p)
        if s is not None and p.suffix in (".tmp", ".old") and s < now:
            shutil.rmtree(p, ignore_errors=True)


def verify(path: str | Path) -> str | None:
    """None if the checkpoint folder is complete and every file matches its manifest, else the reason."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete write, or written by an avmt without checksums)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    for name in FILES:
        want = files.get(name) if isinstance(files, dict) else None
        f = path / name
        if not isinstance(want, dict) or not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want.get('bytes')} (truncated or replaced)"
        if _sha256(f) != want.get("sha256"):
            return f"{name} does not match its SHA-256 (corrupted)"
    return None


@dataclass
class Found:
    """:func:`find_checkpoint`'s answer: the checkpoint to use (or None) and each newer one skipped, with why."""

    path: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def find_checkpoint(run_dir: str | Path) -> Found:
    """The newest checkpoint of a run folder that verifies. Candidates are every ``step_*`` folder (complete ones,
    then a moved-aside ``.old`` and a finished ``.tmp`` of the same step), highest step first. ``latest`` is not
    read: the scan is the truth, the pointer is kept for people and tools."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return Found(None)
    rank = {"": 0, ".old": 1, ".tmp": 2}
    candidates = sorted(
        (p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=lambda p: (-(step_of(p) or 0), rank[p.suffix])
    )
    skipped = []
    for p in candidates:
        why = verify(p)
        if why is None:
            return Found(p, skipped)
        skipped.append((p, why))
    return Found(None, skipped)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run folder that verifies, or None (see :func:`find_checkpoint` for the reasons)."""
    return find_checkpoint(run_dir).path


def load_checkpoint(
    path: str | Path,
    module: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
    allow_unverified: bool = False,
    verified: bool = False,
) -> dict[str, Any]:
    """Verify the checkpoint folder ``path`` (:func:`verify`), then load ``state.pt`` (no arbitrary code:
    ``weights_only=True``) and, if given, the weights into ``module``. Raises :class:`CheckpointError` if it does
    not verify (``allow_unverified`` skips the check, for checkpoints without a manifest). ``verified``: the caller
    has just verified ``path`` (:func:`find_checkpoint` does), so its files are not hashed a second time."""
    path = Path(path)
    why = None if verified else verify(path)
    if why is not None and not (allow_unverified and not (path / MANIFEST).exists()):
        raise CheckpointError(f"{path}: {why}")
    try:
        state = torch.load(path / FILES[1], map_location=map_location, weights_only=True)
        if module is not None:
            module.load_state_dict(load_file(path / FILES[0], device=str(map_location)))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: {Path(e.filename).name} is missing") from None
    return state
