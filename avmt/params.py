"""Parameter counts and training-state memory per sharing scheme: ``python -m avmt.params``.

Models are built on the ``meta`` device, so even the paper preset is counted in well under a second
without allocating its weights.

    python -m avmt.params                      # paper preset, table
    python -m avmt.params --json               # {"none": {"transformer_params": ..., "total_params": ...}, ...}
    python -m avmt.params --preset tiny model.fusion=late
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import torch
from torch import nn

from avmt.config import SHARING_SCHEMES, Config, ConfigError, add_config_arguments, config_from_args
from avmt.models import AVBert

FP32_BYTES = 4
PARTS = ("transformer", "cnn", "projection", "embedding")


def part_parameters(model: AVBert) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters per part of ``model.parts()``, each shared tensor once (in the first part holding it)."""
    out: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for part, members in model.parts().items():
        params: list[nn.Parameter] = []
        for member in members:
            params.extend([member] if isinstance(member, nn.Parameter) else member.parameters())
        out[part] = []
        for p in params:
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out[part].append(p)
    return out


def count_parts(model: AVBert) -> dict[str, int]:
    """Trainable parameters per part of the model (each shared tensor counted once) and their total."""
    counts = {part: sum(p.numel() for p in ps) for part, ps in part_parameters(model).items()}
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if total != sum(counts.values()):
        raise AssertionError(f"model.parts() misses parameters: parts sum to {sum(counts.values())}, model has {total}")
    counts["total"] = total
    return counts


def training_state_bytes(params: int, amsgrad: bool) -> int:
    """fp32 bytes of weights + gradients + AdamW state (exp_avg, exp_avg_sq, and max_exp_avg_sq with AMSGrad)."""
    optimizer_buffers = 3 if amsgrad else 2
    return params * FP32_BYTES * (2 + optimizer_buffers)


def scheme_report(cfg: Config, scheme: str) -> dict[str, Any]:
    """Counts and fp32 training-state bytes of ``cfg`` with ``model.sharing = scheme``."""
    model_cfg = dataclasses.replace(cfg.model, sharing=scheme)
    with torch.device("meta"):
        model = AVBert(model_cfg)
    counts = count_parts(model)
    report: dict[str, Any] = {f"{part}_params": counts[part] for part in PARTS}
    report["total_params"] = counts["total"]
    report["transformer_train_bytes"] = training_state_bytes(counts["transformer"], cfg.train.amsgrad)
    report["total_train_bytes"] = training_state_bytes(counts["total"], cfg.train.amsgrad)
    return report


def report(cfg: Config, schemes: tuple[str, ...] = SHARING_SCHEMES) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({scheme: counts} for the schemes valid with the config's fusion mode, {scheme: why not} for the rest)."""
    rows, invalid = {}, {}
    for scheme in schemes:
        try:
            rows[scheme] = scheme_report(cfg, scheme)
        except ConfigError as e:
            invalid[scheme] = str(e)
    return rows, invalid


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_table(cfg: Config, rows: dict[str, dict[str, Any]]) -> str:
    m = cfg.model
    head = ["scheme", "transformer", "vs none", "cnn", "projection", "embedding", "total", "transformer w+g+opt", "total w+g+opt"]
    lines = [head]
    base = rows.get("none", {}).get("transformer_params")
    for scheme, r in rows.items():
        ratio = f"{r['transformer_params'] / base:.1%}" if base else "-"
        lines.append(
            [
                scheme,
                f"{r['transformer_params']:,}",
                ratio,
                f"{r['cnn_params']:,}",
                f"{r['projection_params']:,}",
                f"{r['embedding_params']:,}",
                f"{r['total_params']:,}",
                _mib(r["transformer_train_bytes"]),
                _mib(r["total_train_bytes"]),
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    optimizer = "AdamW+AMSGrad: 3 buffers" if cfg.train.amsgrad else "AdamW: 2 buffers"
    title = f"avmt parameters: preset={cfg.preset} fusion={m.fusion} D={m.dim} L={m.layers} heads={m.heads} FFN={m.ffn_dim} O={m.rank}"
    note = f"w+g+opt = fp32 weights + gradients + optimizer state ({optimizer}); activations not included"
    return "\n".join([title, fmt(lines[0]), *(fmt(r) for r in lines[1:]), note])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avmt.params", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--schemes", default=",".join(SHARING_SCHEMES), help="comma-separated sharing schemes (default: all four)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    # Every scheme is counted, so the config's own sharing is irrelevant here; starting from 'none' keeps
    # e.g. `model.fusion=early` valid (early fusion rejects the default 'lowrank').
    args.overrides = ["model.sharing=none", *args.overrides]
    try:
        cfg = config_from_args(args)
        schemes = tuple(s.strip() for s in args.schemes.split(",") if s.strip())
        unknown = [s for s in schemes if s not in SHARING_SCHEMES]
        if unknown or not schemes:
            raise ConfigError(f"--schemes={args.schemes!r} is invalid: expected a comma-separated subset of {', '.join(SHARING_SCHEMES)}")
    except ConfigError as e:
        parser.error(str(e))
    rows, invalid = report(cfg, schemes)
    for scheme, why in invalid.items():
        print(f"skipped sharing={scheme}: {why}", file=sys.stderr)
    print(json.dumps(rows, indent=2) if args.json else format_table(cfg, rows))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
