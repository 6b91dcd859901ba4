"""Checkpoints from elsewhere as avmt checkpoint folders: ``python -m avmt.convert official CHECKPOINT OUT``.

``official``: the pretraining checkpoint released with the authors' AVBERT code (a ``torch.save`` dict whose
``state_dict`` holds the model's tensors, each key prefixed ``avbert.``) at the paper's configuration (lowrank
sharing, mid fusion, one Albert layer shared by every Transformer). OUT is a checkpoint folder (the layout of a
training checkpoint's ``step_*`` folder, without pretraining heads) that ``python -m avmt.evaluate --checkpoint
OUT``, ``train.init_from=OUT`` and :func:`avmt.checkpoint.load_model` accept.

How the official tensors become avmt's (docs/method.md, "The official checkpoint"):

- the file is read with ``torch.load(weights_only=True)``; the only non-tensor classes allowed are the config
  containers such a file may hold (:data:`CONFIG_CLASSES`), which load as plain ordered dicts, never running their
  code; any other pickled class is refused, naming it;
- the shared Albert layer is stored under four prefixes (:data:`SHARED_PREFIXES`): the copies must be equal and
  are loaded once;
- low-rank maps ``W = U R_g normalize(V_gᵀ x)``: ``s_linear`` is ``U`` and the bias, ``ms{g}_linear.weight
  [O, N]`` is ``V[g]ᵀ``. The official rotation is ``B_g = base_g · expm(S_g)``, ``S_g = triu(A_g, 1) -
  triu(A_g, 1)ᵀ``, applied as ``z · B_g``; avmt applies ``z · R_gᵀ`` with ``R_g = matrix_exp(A_g - A_gᵀ)``, so
  ``R_g = B_gᵀ``. With ``base_g = I`` (the static mode) ``A_g = -triu(A_off, 1)`` is exact; otherwise ``A_g`` is
  half a real logarithm of ``B_gᵀ`` (in float64). The cached ``_B`` buffers are derived values and not loaded;
- the ``Embedding(2, D)`` of BOS vectors gives ``visual_bos`` (row 0) and ``audio_bos`` (row 1); the 22-row
  position tables set ``model.max_clips = 21``; the official normalisation's eps (1e-12) sets
  ``model.lowrank_eps``;
- the CNNs map layer by layer (SlowFast-style names to avmt's ``stem`` / ``stages.i.j.branch`` / ``shortcut``);
- every other key (pretraining heads, anything unknown) is reported as unused and left out; every avmt tensor must
  come from exactly one source, with its shape checked.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avmt.checkpoint import CheckpointError, check_export_target, export_checkpoint
from avmt.config import Config, ConfigError, load_config

PREFIX = "avbert."
SHARED_PREFIXES = ("transformer.", "single_visual_transformer.", "single_audio_transformer.", "multi_transformer.")
LAYER = "encoder.albert_layer_groups.0.albert_layers.0."
# official low-rank map -> avmt map of layers.0
MAPS = {
    "attention.factor_query": "query",
    "attention.factor_key": "key",
    "attention.factor_value": "value",
    "attention.factor_dense": "attn_out",
    "factor_ffn": "ffn_in",
    "factor_ffn_output": "ffn_out",
}
# fully qualified names of the config containers an official checkpoint may pickle; they load as OrderedDicts
CONFIG_CLASSES = ("yacs.config.CfgNode", "fvcore.common.config.CfgNode", "argparse.Namespace")
ROTATION_TOL = 1e-5  # max |R_avmt - B_offᵀ| after the float32 round trip


class ConvertError(ValueError):
    """The checkpoint cannot be converted; the message names the key, class or shape at fault."""


class _ConfigStandIn:
    """Stands in for a pickled config class: the unpickler builds a plain ``OrderedDict`` (items, and attributes in
    its ``__dict__``) instead of running the class."""

    def __new__(cls, *args: Any, **kwargs: Any) -> collections.OrderedDict:  # type: ignore[misc]
        return collections.OrderedDict()


def read_official(path: str | Path) -> tuple[dict[str, Tensor], list[str]]:
    """The model tensors of an official checkpoint, ``avbert.`` stripped (``{key: tensor}``), and the names of
    everything else in it (top-level entries other than ``state_dict``, state-dict keys without the prefix)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} is not a file")
    try:
        with torch.serialization.safe_globals([(_ConfigStandIn, name) for name in CONFIG_CLASSES]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (not a torch file), EOFError (truncated)
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise ConvertError(
                f"{path} holds a pickled {m.group(1)}, which is neither a tensor nor a known config class "
                f"({', '.join(CONFIG_CLASSES)}): refused, since unpickling it could run arbitrary code"
            ) from None
        lines = str(e).strip().splitlines()  # an empty file raises EOFError with no message
        raise ConvertError(f"{path} is not a readable torch checkpoint: {type(e).__name__}{': ' + lines[0] if lines else ''}") from None
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        top = ", ".join(map(repr, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConvertError(f"{path} has no 'state_dict' dict (it holds: {top})")
    odd = [k for k in (*ckpt, *sd) if not isinstance(k, str)]
    if odd:
        raise ConvertError(f"{path}: key {odd[0]!r} ({type(odd[0]).__name__}) is not a string: not an official AVBERT checkpoint")
    model = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX) and isinstance(v, Tensor)}
    other = [f"{k} (top level)" for k in ckpt if k != "state_dict"] + [
        k for k in sd if not (k.startswith(PREFIX) and isinstance(sd[k], Tensor))
    ]
    if not model:
        raise ConvertError(f"{path}: no state_dict key starts with {PREFIX!r}: not an official AVBERT pretraining checkpoint")
    return model, other


# -- key mapping ---------------------------------------------------------------------------------------------------

_BRANCH_ORDER = ("a", "b", "b1", "b2", "c")  # conv order inside a bottleneck's branch2


def _cnn_rules(keys: Sequence[str]) -> dict[str, str]:
    """official CNN key -> avmt key. Branch convs are numbered by their position in the block (a, b | b1, b2, c),
    so a separable block (a, b1, b2, c) maps to avmt branch entries 0, 2, 4, 6 and a plain one (a, b, c) to 0, 2, 4."""
    letters: dict[str, set[str]] = collections.defaultdict(set)
    branch = re.compile(r"^(visual|audio)_conv\.s(\d)\.(?:pathway0_)?res(\d+)\.branch2\.([a-z]\d?)(_bn)?\.(.+)$")
    for k in keys:
        m = branch.match(k)
        if m:
            letters[f"{m[1]}.{m[2]}.{m[3]}"].add(m[4])
    out = {}
    for k in keys:
        if m := branch.match(k):
            order = sorted(letters[f"{m[1]}.{m[2]}.{m[3]}"], key=_BRANCH_ORDER.index)
            out[k] = f"{m[1]}_cnn.stages.{int(m[2]) - 2}.{m[3]}.branch.{2 * order.index(m[4])}.{1 if m[5] else 0}.{m[6]}"
        elif m := re.match(r"^(visual|audio)_conv\.s(\d)\.(?:pathway0_)?res(\d+)\.branch1(_bn)?\.(.+)$", k):
            out[k] = f"{m[1]}_cnn.stages.{int(m[2]) - 2}.{m[3]}.shortcut.{1 if m[4] else 0}.{m[5]}"
        elif m := re.match(r"^visual_conv\.s1\.pathway0_stem\.(conv|bn)\.(.+)$", k):
            out[k] = f"visual_cnn.stem.0.{0 if m[1] == 'conv' else 1}.{m[2]}"
        elif m := re.match(r"^audio_conv\.s1\.stem\.(conv|bn)(\d)\.(.+)$", k):
            out[k] = f"audio_cnn.stem.{2 * (int(m[2]) - 1)}.{0 if m[1] == 'conv' else 1}.{m[3]}"
    return out


_RENAMES = [
    (r"^(visual|audio)_fc\.(weight|bias)$", r"\1_proj.linear.\2"),
    (r"^(visual|audio)_norm\.(weight|bias)$", r"\1_proj.ln.\2"),
    (r"^single_(visual|audio)_embeddings\.position_embeddings\.weight$", r"embeddings.\1.positions.weight"),
    (r"^single_(visual|audio)_embeddings\.LayerNorm\.(weight|bias)$", r"embeddings.\1.norm.\2"),
    (r"^multi_embeddings\.position_embeddings\.weight$", r"embeddings.multimodal.positions.weight"),
    (r"^multi_embeddings\.token_type_embeddings\.weight$", r"embeddings.multimodal.types.weight"),
    (r"^multi_embeddings\.LayerNorm\.(weight|bias)$", r"embeddings.multimodal.norm.\1"),
    (rf"^transformer\.{re.escape(LAYER)}attention\.LayerNorm\.(weight|bias)$", r"layers.0.attn_norm.\1"),
    (rf"^transformer\.{re.escape(LAYER)}full_layer_layer_norm\.(weight|bias)$", r"layers.0.ffn_norm.\1"),
]


def official_rotation(a: Tensor, base: Tensor) -> Tensor:
    """The official ``B = base · expm(triu(A, 1) - triu(A, 1)ᵀ)`` in float64 (``z · B`` is the rotated row)."""
    s = torch.triu(a.double(), 1)
    return base.double() @ torch.matrix_exp(s - s.T)


def _orthogonal_log(r: Tensor) -> Tensor:
    """A real skew-symmetric ``L`` with ``matrix_exp(L) = r`` for an orthogonal float64 ``r`` (det +1, no eigenvalue
    -1): inverse scaling and squaring (Denman-Beavers square roots until ``r`` is near I, then the log series)."""
    eye = torch.eye(r.shape[0], dtype=torch.float64)
    x, k = r, 0
    while torch.linalg.matrix_norm(x - eye, ord=2) > 0.05:
        if k == 40:
            raise ConvertError("the rotation has no real logarithm (an eigenvalue at -1)")
        y, z = x, eye
        for _ in range(60):  # Denman-Beavers: y -> sqrt(x), z -> its inverse
            y, z = (y + torch.linalg.inv(z)) / 2, (z + torch.linalg.inv(y)) / 2
            if torch.linalg.matrix_norm(y @ y - x) < 1e-13 * max(1.0, float(torch.linalg.matrix_norm(x))):
                break
        x, k = y, k + 1
    e, term, log = x - eye, eye, torch.zeros_like(x)
    for n in range(1, 40):
        term = term @ e
        log = log + ((-1) ** (n + 1)) * term / n
    log = log * 2.0**k
    return (log - log.T) / 2


def avmt_generator(a: Tensor, base: Tensor) -> Tensor:
    """avmt's ``A`` (float64) whose ``matrix_exp(A - Aᵀ)`` is ``official_rotation(a, base)ᵀ``. ``a`` and ``base``
    must be square and of one size (:class:`ConvertError` otherwise)."""
    if a.ndim != 2 or base.ndim != 2 or a.shape[0] != a.shape[1] or base.shape != a.shape:
        raise ConvertError(f"A has shape {tuple(a.shape)} and base {tuple(base.shape)}: both must be the same square [r, r]")
    eye = torch.eye(base.shape[0], dtype=base.dtype)
    if torch.equal(base, eye):
        return -torch.triu(a.double(), 1)  # expm(-S) = expm(S)ᵀ, exactly
    if torch.linalg.det(base.double()) < 0:
        raise ConvertError("base has determinant -1 (a reflection): no rotation matrix_exp(A - Aᵀ) equals it")
    return _orthogonal_log(official_rotation(a, base).T) / 2


@dataclass
class Conversion:
    """What became of every official key: ``copied`` {avmt key: official key}; ``derived`` {avmt key: official keys it
    is computed from}; ``duplicates`` {official key: the equal tensor loaded instead}; ``caches`` (derived buffers not
    loaded); ``unused`` (reported, left out); ``rotation_error``: max |R_avmt - B_offᵀ| over every map and group."""

    copied: dict[str, str] = field(default_factory=dict)
    derived: dict[str, list[str]] = field(default_factory=dict)
    duplicates: dict[str, str] = field(default_factory=dict)
    caches: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    rotation_error: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def map_official(sd: dict[str, Tensor], model: dict[str, Tensor]) -> tuple[dict[str, Tensor], Conversion]:
    """avmt model tensors (``{key: tensor}`` with the keys and shapes of ``model``, an AVBert state dict) from the
    official ones (``sd``, prefix stripped). Raises :class:`ConvertError` on unequal shared copies, a shape mismatch,
    or an avmt tensor that no official key provides."""
    conv = Conversion()
    out: dict[str, Tensor] = {}
    # the shared Albert layer: one copy, the others must be equal to it
    keys = []
    for k, v in sd.items():
        for p in SHARED_PREFIXES[1:]:
            if k.startswith(p):
                ref = SHARED_PREFIXES[0] + k[len(p) :]
                if ref not in sd:
                    raise ConvertError(f"{k} has no counterpart {ref}: the Transformers do not share one layer")
                if not torch.equal(v, sd[ref]):
                    raise ConvertError(f"{k} differs from {ref}: the Transformers do not share one layer (not the paper's scheme)")
                conv.duplicates[k] = ref
                break
        else:
            keys.append(k)

    def put(dst: str, value: Tensor, sources: list[str]) -> None:
        if dst not in model:
            raise ConvertError(f"{sources[0]} maps to {dst}, which the avmt model of this config does not have")
        if dst in out:
            raise ConvertError(f"{dst} is provided twice ({sources[0]})")
        if tuple(value.shape) != tuple(model[dst].shape):
            raise ConvertError(f"{sources[0]} has shape {tuple(value.shape)}, but avmt's {dst} needs {tuple(model[dst].shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConvertError(f"{sources[0]} holds NaN or infinite values")
        out[dst] = value.to(model[dst].dtype).contiguous()
        if len(sources) == 1 and value is sd[sources[0]]:
            conv.copied[dst] = sources[0]
        else:
            conv.derived[dst] = sources

    cnn = _cnn_rules(keys)
    lowrank = re.compile(
        rf"^transformer\.{re.escape(LAYER)}(.+)\.(s_linear\.weight|s_linear\.bias|ms(\d+)_linear\.weight|orthogonal_ms(\d+)_linear\.(A|base|_B))$"
    )
    groups: dict[str, dict[int, dict[str, str]]] = collections.defaultdict(lambda: collections.defaultdict(dict))
    for k in keys:
        if k in cnn:
            put(cnn[k], sd[k], [k])
        elif k == "summary_encoding.bos_embeddings.weight":
            bos = sd[k]
            if bos.ndim != 2 or bos.shape[0] != 2:
                raise ConvertError(f"{k} has shape {tuple(bos.shape)}, expected [2, D] (visual, audio)")
            put("visual_bos", bos[0], [k])
            put("audio_bos", bos[1], [k])
        elif (m := lowrank.match(k)) and m[1] in MAPS:
            name, part = f"layers.0.{MAPS[m[1]]}", m[2]
            if part == "s_linear.weight":
                put(f"{name}.U", sd[k], [k])
            elif part == "s_linear.bias":
                put(f"{name}.bias", sd[k], [k])
            elif m[5] == "_B":
                conv.caches.append(k)
            else:
                g = int(m[3] if m[3] is not None else m[4])
                groups[name][g]["V" if m[3] is not None else m[5]] = k
        else:
            for pattern, repl in _RENAMES:
                if re.match(pattern, k):
                    put(re.sub(pattern, repl, k), sd[k], [k])
                    break
            else:
                conv.unused.append(k)
    for name, per_group in groups.items():
        want = model.get(f"{name}.V")
        n_groups = want.shape[0] if want is not None else 0
        if sorted(per_group) != list(range(n_groups)) or any(set(p) != {"V", "A", "base"} for p in per_group.values()):
            raise ConvertError(
                f"{name}: official groups {sorted(per_group)} with parts {[sorted(p) for p in per_group.values()]}; "
                f"avmt needs groups 0..{n_groups - 1}, each with ms{{g}}_linear.weight, A and base"
            )
        parts = [per_group[g] for g in range(n_groups)]
        for p in parts:  # each V[g]ᵀ on its own, so that a wrong one is named (a stack would fail on it anonymously)
            need = (want.shape[2], want.shape[1])
            if tuple(sd[p["V"]].shape) != need:
                raise ConvertError(
                    f"{p['V']} has shape {tuple(sd[p['V']].shape)}, but avmt's {name}.V needs [{need[0]}, {need[1]}] per group"
                )
        put(f"{name}.V", torch.stack([sd[p["V"]].T for p in parts]), [p["V"] for p in parts])
        gens = []
        for p in parts:
            for k in (p["A"], p["base"]):
                if sd[k].is_floating_point() and not bool(torch.isfinite(sd[k]).all()):
                    raise ConvertError(f"{k} holds NaN or infinite values")
            try:
                gens.append(avmt_generator(sd[p["A"]], sd[p["base"]]))
            except ConvertError as e:
                raise ConvertError(f"{p['A']}: {e}") from None
            except RuntimeError as e:  # torch.linalg on a degenerate base (singular, not orthogonal)
                raise ConvertError(
                    f"{p['A']}: the rotation cannot be converted: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                ) from None
        put(f"{name}.A", torch.stack(gens), [s for p in parts for s in (p["A"], p["base"])])
        for p, a in zip(parts, out[f"{name}.A"]):  # check the stored (float32) A against the official rotation
            r = torch.matrix_exp(a.double() - a.double().T)
            err = float((r - official_rotation(sd[p["A"]], sd[p["base"]]).T).abs().max())
            conv.rotation_error = max(conv.rotation_error, err if err == err else float("inf"))  # NaN: as far off as can be
    missing = [k for k in model if k not in out]
    if missing:
        raise ConvertError(f"{len(missing)} avmt tensors have no source in the checkpoint, e.g. {', '.join(missing[:3])}")
    if conv.rotation_error > ROTATION_TOL:
        raise ConvertError(f"a converted rotation is off by {conv.rotation_error:.2g} (> {ROTATION_TOL:g}): base is not orthogonal")
    return out, conv


def official_config(sd: dict[str, Tensor], preset: str = "paper", overrides: Sequence[str] = ()) -> Config:
    """The avmt config of an official checkpoint: ``preset`` with the fixed facts of the official model (lowrank
    sharing, mid fusion, normalize eps 1e-12) and the sizes read from the tensors (dim, FFN, rank, positions), then
    ``overrides``. ``model.heads`` is not in the tensors: it comes from the preset (paper: 12, as the official)."""
    sizes = {}
    for what, key in (
        ("dim", "visual_fc.weight"),
        ("ffn", f"transformer.{LAYER}factor_ffn.s_linear.weight"),
        ("rank", f"transformer.{LAYER}attention.factor_query.ms0_linear.weight"),
        ("positions", "single_visual_embeddings.position_embeddings.weight"),
    ):
        if key not in sd:
            raise ConvertError(f"the checkpoint lacks {key}: not the official AVBERT layout")
        if sd[key].ndim != 2 or min(sd[key].shape) < 1:
            raise ConvertError(f"{key} has shape {tuple(sd[key].shape)}: a matrix is needed (its rows give model.{what})")
        sizes[what] = sd[key].shape[0]
    dim, ffn, rank, positions = sizes["dim"], sizes["ffn"], sizes["rank"], sizes["positions"]
    if positions < 2:
        raise ConvertError(
            f"single_visual_embeddings.position_embeddings.weight has {positions} row: the BOS and at least one clip are needed"
        )
    facts = [
        "model.sharing=lowrank",
        "model.fusion=mid",
        "model.lowrank_eps=1e-12",
        f"model.dim={dim}",
        f"model.ffn_dim={ffn}",
        f"model.rank={rank}",
        f"model.max_clips={positions - 1}",
    ]
    base = load_config(preset)
    if base.data.num_clips > positions - 1:
        facts.append(f"data.num_clips={positions - 1}")
    return load_config(preset, overrides=[*facts, *overrides])


def convert_official(
    src: str | Path, out: str | Path, preset: str = "paper", overrides: Sequence[str] = (), overwrite: bool = False
) -> Conversion:
    """Convert the official checkpoint ``src`` into the avmt checkpoint folder ``out`` (see the module docstring)."""
    from avmt.models import AVBert

    check_export_target(out, overwrite)  # before the work: a refused OUT is said at once
    sd, other = read_official(src)
    cfg = official_config(sd, preset, overrides)
    with torch.device("meta"):
        model = AVBert(cfg.model).state_dict()
    weights, conv = map_official(sd, model)
    conv.unused = other + conv.unused
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    state = {
        "step": 0,
        "config": cfg.to_dict(),
        "converted_from": {"format": "official", "path": str(Path(src).resolve()), "sha256": h.hexdigest()},
        "conversion": conv.to_dict(),
    }
    export_checkpoint(out, {f"model.{k}": v for k, v in weights.items()}, state, overwrite=overwrite)
    return conv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m avmt.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="format", required=True)
    o = sub.add_parser("official", help="the authors' released AVBERT pretraining checkpoint (checkpoint.pyth)")
    o.add_argument("checkpoint", type=Path)
    o.add_argument("out", type=Path, help="the avmt checkpoint folder to write")
    o.add_argument("overrides", nargs="*", help="config key=value applied after the facts read from the checkpoint")
    o.add_argument("--preset", default="paper", help="the preset the rest of the config comes from (default paper)")
    o.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it is a checkpoint folder avmt wrote (nothing else is replaced)"
    )
    o.add_argument("--json", action="store_true", help="print the full key accounting as JSON")
    o.add_argument("--debug", action="store_true", help="show the traceback of an expected failure too")
    a = p.parse_args(argv)
    try:
        conv = convert_official(a.checkpoint, a.out, a.preset, a.overrides, a.overwrite)
    except (ConvertError, ConfigError, CheckpointError) as e:
        if a.debug:
            raise
        print(f"avmt.convert: error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(conv.to_dict(), indent=1))
    else:
        print(
            f"{a.out}: {len(conv.copied)} tensors copied, {len(conv.derived)} derived, {len(conv.duplicates)} shared copies "
            f"checked equal and loaded once, {len(conv.caches)} cached buffers skipped; max rotation error "
            f"{conv.rotation_error:.2g}"
        )
        if conv.unused:
            shown = ", ".join(conv.unused[:8]) + (f", ... ({len(conv.unused)} in all)" if len(conv.unused) > 8 else "")
            print(f"not part of the avmt model, left out: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
