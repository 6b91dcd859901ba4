"""Checkpoints in the layout of the authors' released AVBERT pretraining checkpoint, for the converter's tests: the
keys and shapes of ``tests/fixtures/official-avbert-paper-state-dict.tsv`` (the official model at the paper config),
random values, the shared Albert layer under its four prefixes, ``avbert.`` prefixes, extra head keys and a pickled
yacs-style config, as such a file holds."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "official-avbert-paper-state-dict.tsv"
SHARED = ("transformer.", "single_visual_transformer.", "single_audio_transformer.", "multi_transformer.")
HEAD_KEYS = {"mep_visual_head.fc.weight": (768, 768), "mep_audio_head.fc.weight": (768, 768), "cpp_head.fc.weight": (1, 1536)}


def layout() -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the official model, in the fixture's order."""
    rows = [line.split("\t") for line in FIXTURE.read_text().splitlines() if line and not line.startswith("#")]
    return {key: ast.literal_eval(shape) for key, shape in rows[1:]}


def random_rotation(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthogonal float32 matrix with determinant +1 (what the dynamic mode's rebasing leaves in ``base``)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


def official_state_dict(seed: int = 0, rebased: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Random tensors in the official layout (without the ``avbert.`` prefix). ``base`` is the identity (static
    mode) except for the orthogonal modules whose key contains one of ``rebased``, which get a random rotation. The
    shared layer's four prefixes hold equal tensors; the cached ``_B`` of every orthogonal module is set."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in layout().items():
        src = next((SHARED[0] + key[len(p) :] for p in SHARED[1:] if key.startswith(p)), None)
        if src is not None:
            sd[key] = sd[src].clone()
        elif key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(1000)
        elif key.endswith(".base"):
            sd[key] = random_rotation(shape[0], gen) if any(r in key for r in rebased) else torch.eye(shape[0])
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=gen) * 0.05
    for key in [k for k in sd if k.endswith(".A")]:
        s = torch.triu(sd[key].double(), 1)
        sd[key[: -len("A")] + "_B"] = (sd[key[: -len("A")] + "base"].double() @ torch.matrix_exp(s - s.T)).float()
    return sd


def save_official(path: Path, sd: dict[str, torch.Tensor], extra: dict | None = None) -> Path:
    """``torch.save`` of ``{"state_dict": {"avbert." + key: tensor} + head keys, "epoch", "optimizer", "cfg"}``; the
    config is a ``yacs.config.CfgNode`` (a dict subclass with attributes, faked here and gone before loading)."""
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode = CfgNode
    sys.modules["yacs"], sys.modules["yacs.config"] = yacs, config
    try:
        cfg = CfgNode(MODEL=CfgNode(ARCH="avbert", NUM_LAYERS=6))
        cfg.__dict__["__immutable__"] = True
        state = {"avbert." + k: v for k, v in sd.items()} | {"avbert." + k: torch.randn(s) for k, s in HEAD_KEYS.items()}
        ckpt = {"state_dict": state, "epoch": 120, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "cfg": cfg}
        torch.save(ckpt | (extra or {}), path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]
    return path
