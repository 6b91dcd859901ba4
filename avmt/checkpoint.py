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
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    from avmt.config import Config

FILES = ("model.safetensors", "state.pt")
MANIFEST = "manifest.json"
# The layout above, recorded as ``format`` in every manifest.json (a manifest without it is format 1: the same layout,
# written before the field existed). A change of layout bumps it and either converts older checkpoints on load or
# refuses them; a checkpoint of a newer format than this avmt reads is refused with the version (tests/test_guards.py
# keeps a format-1 checkpoint loading, resuming and evaluating).
FORMAT_VERSION = 1
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
    except OSError as e:
        raise CheckpointError(f"cannot write the checkpoint of step {step} into {root}: {e.strerror or e}") from None
    _write_folder(tmp, module.state_dict(), state, step, hook, f"the checkpoint of step {step} into {root}")
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


def _write_folder(
    tmp: Path, weights: dict[str, torch.Tensor], state: dict[str, Any], step: int, hook: Callable[[str], None], what: str
) -> None:
    """Write ``weights`` (safetensors), ``state`` (torch.save) and their manifest into the new folder ``tmp``, every
    file and the folder fsynced. On failure the folder is removed and :class:`CheckpointError` names ``what``."""
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / FILES[0])
        hook("weights")
        torch.save(state, tmp / FILES[1])
        hook("state")
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in FILES}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=1))
        hook("manifest")
        for f in (*FILES, MANIFEST):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        hook("synced")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {what}: {e.strerror or e}") from None
    except RuntimeError as e:  # torch.save reports a full disk as an opaque C++ error ("unexpected pos 768 vs 662")
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(tmp.parent).free
        why = f"No space left on device ({free / 2**20:.1f} MiB free)" if free < LOW_SPACE_BYTES else str(e).splitlines()[0]
        raise CheckpointError(f"cannot write {what}: {why}") from None


def not_checkpoint_folder(path: str | Path) -> str | None:
    """None if ``path`` is a folder that avmt's checkpoint writers could have left (a real folder, not a link, that
    holds nothing but regular files named :data:`FILES` and :data:`MANIFEST`, possibly only some of them: an
    interrupted write; or nothing), else why it is not. Only such a folder is ever replaced or removed by
    :func:`export_checkpoint`."""
    path = Path(path)
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is a file, not a folder"
    try:
        entries = sorted(path.iterdir())
    except OSError as e:
        return f"it cannot be listed: {e.strerror or e}"
    for entry in entries:
        if entry.name not in (*FILES, MANIFEST) or entry.is_symlink() or not entry.is_file():
            return f"it holds {entry.name!r}, which avmt does not write there"
    return None


def check_export_target(path: str | Path, overwrite: bool = False) -> Path:
    """The absolute ``path`` that :func:`export_checkpoint` may write (callers check it before any long work);
    :class:`CheckpointError` if it exists without ``overwrite``, is the current folder or one holding it, or it (or
    an interrupted write's ``path.tmp`` / ``path.old``) is not a checkpoint folder avmt wrote."""
    path = Path(os.path.abspath(path))  # lexical: "." gets its name, a link stays a link
    exists = path.exists() or path.is_symlink()
    if exists and not overwrite:
        raise CheckpointError(f"{path} exists; choose another folder or overwrite it explicitly")
    cwd = Path.cwd().resolve()
    if not path.name or path.resolve() == cwd or path.resolve() in cwd.parents:
        raise CheckpointError(f"{path} is the current folder or holds it; choose a folder of its own")
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    why = not_checkpoint_folder(path) if exists else None
    if why is not None:
        raise CheckpointError(f"{path} is not a checkpoint folder avmt wrote ({why}); overwrite replaces only those: choose another folder")
    for side in (tmp, old):
        why = not_checkpoint_folder(side) if side.exists() or side.is_symlink() else None
        if why is not None:
            raise CheckpointError(f"{side} exists and is not a checkpoint folder avmt wrote ({why}); move it away first")
    return path


def export_checkpoint(path: str | Path, weights: dict[str, torch.Tensor], state: dict[str, Any], overwrite: bool = False) -> Path:
    """Write a standalone checkpoint folder ``path`` (the layout of one ``step_*`` folder: what ``python -m
    avmt.convert`` produces) from ``weights`` (keys as in the ``Pretraining`` module: ``model.*``, heads optional)
    and ``state`` (``config`` at least). Written to ``path.tmp`` and renamed, so ``path`` is complete or absent; an
    existing ``path`` is replaced only with ``overwrite`` (after the new copy is complete), and only if it is a
    checkpoint folder avmt wrote (:func:`not_checkpoint_folder`); the same holds for a ``path.tmp`` or ``path.old``
    that an interrupted write left. Anything else is refused with :class:`CheckpointError` before any write."""
    path = check_export_target(path, overwrite)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
    _write_folder(tmp, weights, state, int(state.get("step", 0)), lambda point: None, str(path))
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


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
    version = manifest.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return f"{MANIFEST} gives format {version!r}, which no avmt writes"
    if version > FORMAT_VERSION:
        return f"checkpoint format {version} is newer than this avmt reads (format {FORMAT_VERSION}): upgrade avmt to load it"
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
    state = _load_state(path, map_location)
    if module is not None:
        try:
            module.load_state_dict(_load_weights(path, map_location))
        except RuntimeError as e:  # load_state_dict: missing, unknown or mis-shaped tensors
            raise CheckpointError(f"{path}: the weights do not fit the module: {_first_line(e)}") from None
    return state


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _load_state(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """``state.pt`` of checkpoint folder ``path`` (``weights_only``: a pickled class other than tensors and plain
    containers is refused, never run); :class:`CheckpointError` for a missing, unreadable or refused file."""
    try:
        state = torch.load(path / FILES[1], map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {FILES[1]} is missing") from None
    except Exception as e:  # junk parses as anything: UnpicklingError, EOFError, KeyError, RuntimeError, ...
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise CheckpointError(
                f"{path}: {FILES[1]} holds a pickled {m.group(1)}, which is refused: unpickling it could run arbitrary code"
            ) from None
        raise CheckpointError(f"{path}: {FILES[1]} is not a readable checkpoint state ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {FILES[1]} holds a {type(state).__name__}, not a checkpoint state (a dict)")
    return state


def _load_weights(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """``model.safetensors`` of checkpoint folder ``path``; :class:`CheckpointError` for a missing or unreadable file."""
    from safetensors import SafetensorError

    try:
        return load_file(path / FILES[0], device=str(map_location))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {FILES[0]} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {FILES[0]} is not a readable safetensors file ({_first_line(e)})") from None


def checkpoint_config(state: dict[str, Any], path: str | Path) -> Config:
    """The :class:`avmt.config.Config` a checkpoint state records (``state["config"]``), validated;
    :class:`CheckpointError` naming ``path`` when it is missing or invalid (a config of another avmt version, an
    edited file)."""
    from avmt.config import ConfigError, config_from_dict

    values = state.get("config")
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: {FILES[1]} holds no config (a checkpoint avmt wrote always does)")
    try:
        return config_from_dict(values)
    except (ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: the config in {FILES[1]} is invalid: {e}") from None


def resolve_checkpoint(path: str | Path) -> tuple[Path, bool]:
    """``(checkpoint folder, verified)`` for a checkpoint folder (it holds ``state.pt``; not verified yet) or a run
    folder (its newest checkpoint that verifies, :func:`find_checkpoint`). Raises :class:`CheckpointError` when
    there is none, with the reason each candidate was skipped."""
    path = Path(path)
    if (path / FILES[1]).exists():
        return path, False
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    found = find_checkpoint(path)
    if found.path is None:
        skipped = "; ".join(f"{p.name}: {why}" for p, why in found.skipped)
        raise CheckpointError(
            f"{path} holds no usable checkpoint (expected a checkpoint folder with {FILES[1]} or RUN/checkpoints/step_*)"
            + (f"; skipped {skipped}" if skipped else "")
        )
    return found.path, True


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """``(model, config)`` from any avmt checkpoint: a training checkpoint (run folder or ``step_*`` folder) or one
    written by ``python -m avmt.convert``. ``model`` is an :class:`avmt.models.AVBert` built from the checkpoint's
    config with its weights loaded strictly (every model tensor present, none unknown; pretraining heads, if any,
    are not part of it), in eval mode on ``map_location``; ``config`` is the checkpoint's :class:`avmt.config.Config`."""
    from avmt.models import AVBert

    folder, verified = resolve_checkpoint(path)
    state = load_checkpoint(folder, map_location=map_location, verified=verified)
    cfg = checkpoint_config(state, folder)
    model = AVBert(cfg.model)
    load_model_weights(folder, model, map_location)
    return model.to(map_location).eval(), cfg


def load_model_weights(folder: str | Path, model: nn.Module, map_location: str | torch.device = "cpu") -> None:
    """Load the ``model.*`` tensors of checkpoint folder ``folder`` into ``model`` (an AVBert) strictly; the caller
    has verified the folder. Raises :class:`CheckpointError` naming missing, unknown or mis-shaped tensors."""
    weights = _load_weights(Path(folder), map_location)
    own = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
    want = model.state_dict()
    missing, unknown = sorted(set(want) - set(own)), sorted(set(own) - set(want))
    shapes = [f"{k} {tuple(own[k].shape)} vs {tuple(want[k].shape)}" for k in want if k in own and own[k].shape != want[k].shape]
    problems = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (("missing", missing), ("unknown", unknown), ("mis-shaped", shapes)) if v]
    if problems:
        raise CheckpointError(f"{folder}: the model weights do not fit the model of its config: {'; '.join(problems)}")
    model.load_state_dict(own)
