"""Atomic training checkpoints: model weights in safetensors, the rest loadable with ``weights_only=True``.

Layout of a run folder::

    RUN/checkpoints/step_000500/model.safetensors   weights of the Pretraining module (model + heads)
    RUN/checkpoints/step_000500/state.pt            optimizer, scheduler, step, RNG states, data position, config
    RUN/checkpoints/latest                          the name of the newest complete checkpoint

A checkpoint is written into ``step_XXXXXX.tmp`` and renamed when complete; ``latest`` is replaced
atomically after that. A crash at any point leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, module: nn.Module, state: dict[str, Any], keep: int = 3) -> Path:
    """Write the checkpoint of ``step``; keeps the ``keep`` newest. ``state`` holds tensors and plain Python values."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp, final = root / f"{name}.tmp", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / "latest", name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "model.safetensors").exists() or not (path / "state.pt").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def load_checkpoint(path: str | Path, module: nn.Module | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt`` (no arbitrary code: ``weights_only=True``) and, if given, the weights into ``module``."""
    path = Path(path)
    if module is not None:
        module.load_state_dict(load_file(path / "model.safetensors", device=str(map_location)))
    return torch.load(path / "state.pt", map_location=map_location, weights_only=True)
