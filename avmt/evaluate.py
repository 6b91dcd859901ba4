"""Downstream evaluation by linear probe: ``python -m avmt.evaluate --checkpoint RUN_OR_CHECKPOINT``.

Features of the frozen model, per video and view, then a multinomial logistic regression trained on the
``train`` split and scored on both splits (top-1 / top-5, logits averaged over the views):

- ``visual``: the visual BOS output and the mean of the visual clip outputs, concatenated (multimodal
  ``[m^v_0 ; mean_t m^v_t]``; the unimodal ``y^v`` with late fusion);
- ``audio``: the same for the audio half (``m^a`` / ``y^a``);
- ``audiovisual``: both, concatenated.

Splits: a video goes to ``test`` when a hash of its path falls in the last ``--test-fraction`` (stable
across runs and machines). ``--compare-random`` scores the same architecture at random initialisation
too, which is the baseline pretraining must beat. With no ``--manifest`` the checkpoint's own training
manifest is used (for the default run: the labelled synthetic dataset).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from avmt.checkpoint import latest_checkpoint, load_checkpoint
from avmt.config import Config, config_from_dict
from avmt.models import AVBert
from avmt.objectives import Pretraining

HEADS = ("visual", "audio", "audiovisual")


def split_of(path: str, test_fraction: float) -> str:
    """``train`` or ``test``, from a hash of the path (stable across runs, machines and manifest order)."""
    h = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") / 2**64
    return "test" if h >= 1 - test_fraction else "train"


@torch.no_grad()
def extract_features(model: AVBert, cfg: Config, records: list[dict], views: int, batch_size: int = 8, progress: bool = True) -> dict[str, Tensor]:
    """``{head: [V, N, F]}`` float32 features of ``records`` (manifest rows) for ``views`` views each.

    View 0 is the deterministic eval-mode sequence (centred window and crop); views 1.. are train-mode draws
    (random window, clip offsets, crop and flip) from fixed seeds, so features are reproducible.
    """
    from tqdm import tqdm

    from avmt.data.loader_cpu import CPULoader

    model.eval()
    per_view: list[dict[str, list[Tensor]]] = []
    for view in range(views):
        loader = CPULoader(records, cfg.data, batch_size, train=view > 0, seed=1000 + view, num_workers=cfg.data.num_workers)
        outs: dict[str, list[Tensor]] = {h: [] for h in HEADS}
        for batch in tqdm(loader.iterate(), total=len(loader), disable=not progress, desc=f"features (view {view + 1}/{views})"):
            if batch["failures"].any():
                raise RuntimeError(f"{int(batch['failures'].sum())} video(s) failed to load during feature extraction; see the log")
            out = model(batch["video"], batch["audio"])
            t = out.visual_embeddings.shape[1]
            if out.multimodal is not None:
                seq_v, seq_a = out.multimodal[:, : 1 + t], out.multimodal[:, 1 + t :]
            else:
                seq_v, seq_a = out.visual, out.audio
            v = torch.cat([seq_v[:, 0], seq_v[:, 1:].mean(1)], 1)
            a = torch.cat([seq_a[:, 0], seq_a[:, 1:].mean(1)], 1)
            order = batch["index"]  # rows in manifest order; train mode shuffles, so restore it below
            outs["visual"].append(torch.cat([order[:, None].float(), v], 1))
            outs["audio"].append(torch.cat([order[:, None].float(), a], 1))
            outs["audiovisual"].append(torch.cat([order[:, None].float(), v, a], 1))
        per_view.append(outs)
    result = {}
    for h in HEADS:
        views_h = []
        for outs in per_view:
            rows = torch.cat(outs[h])
            rows = rows[rows[:, 0].argsort()]
            if rows.shape[0] != len(records) or not torch.equal(rows[:, 0].long(), torch.arange(len(records))):
                raise RuntimeError("feature extraction did not return every video exactly once")
            views_h.append(rows[:, 1:])
        result[h] = torch.stack(views_h)
    return result


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: int, steps: int = 500,
                 weight_decay: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Logistic regression on ``[V, N, F]`` features (standardised with train statistics); each video's logits
    are averaged over its V views. Returns top-1/top-5 in percent for both splits."""
    torch.manual_seed(seed)
    mean, std = train_x.mean((0, 1)), train_x.std((0, 1)).clamp_min(1e-6)
    tx, ex = (train_x - mean) / std, (test_x - mean) / std
    head = torch.nn.Linear(tx.shape[-1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(head(tx).flatten(0, 1), train_y.repeat(tx.shape[0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = {}
    with torch.no_grad():
        for name, x, y in (("train", tx, train_y), ("test", ex, test_y)):
            logits = head(x).mean(0)
            k = min(5, classes)
            top = logits.topk(k, dim=1).indices
            scores[f"{name}_top1"] = 100.0 * (top[:, 0] == y).float().mean().item()
            scores[f"{name}_top5"] = 100.0 * (top == y[:, None]).any(1).float().mean().item()
    return scores


def evaluate(model: AVBert, cfg: Config, records: list[dict], views: int, test_fraction: float, progress: bool = True) -> dict[str, dict[str, float]]:
    """``{head: {train_top1, train_top5, test_top1, test_top5}}`` of a linear probe on ``model``'s features."""
    labels = torch.tensor([r["label_index"] for r in records])
    is_test = torch.tensor([split_of(r["path"], test_fraction) == "test" for r in records])
    if is_test.all() or not is_test.any():
        raise ValueError(f"the {len(records)} videos do not fill both splits at test_fraction={test_fraction}")
    classes = int(labels.max()) + 1
    feats = extract_features(model, cfg, records, views, progress=progress)
    return {h: linear_probe(f[:, ~is_test], labels[~is_test], f[:, is_test], labels[is_test], classes) for h, f in feats.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avmt.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run folder (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--manifest", type=Path, default=None, help="labelled manifest.jsonl (default: the one the run trained on)")
    parser.add_argument("--views", type=int, default=1, help="views per video, logits averaged (default 1)")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--compare-random", action="store_true", help="also score the same model at random initialisation")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    ckpt = args.checkpoint if (args.checkpoint / "state.pt").exists() else latest_checkpoint(args.checkpoint)
    if ckpt is None:
        parser.error(f"{args.checkpoint} holds no checkpoint")
    if args.views < 1 or not 0 < args.test_fraction < 1:
        parser.error("--views must be >= 1 and --test-fraction in (0, 1)")
    state = load_checkpoint(ckpt)
    cfg = config_from_dict(state["config"])
    from avmt.data.prepare import load_manifest
    from avmt.train import synthetic_manifest

    manifest = args.manifest or (Path(cfg.data.manifest) if cfg.data.manifest else synthetic_manifest(cfg.data, progress=False))
    records = load_manifest(manifest)
    results: dict[str, Any] = {"checkpoint": str(ckpt), "manifest": str(manifest), "views": args.views}
    pretrained = Pretraining(AVBert(cfg.model), cfg.objective)
    load_checkpoint(ckpt, pretrained)
    results["pretrained"] = evaluate(pretrained.model, cfg, records, args.views, args.test_fraction, progress=not args.quiet)
    if args.compare_random:
        torch.manual_seed(cfg.train.seed)  # the initialisation the run started from
        results["random_init"] = evaluate(AVBert(cfg.model), cfg, records, args.views, args.test_fraction, progress=not args.quiet)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name in ("pretrained", "random_init"):
            for head, s in results.get(name, {}).items():
                print(f"{name:12s} {head:12s} test top-1 {s['test_top1']:5.1f}  top-5 {s['test_top5']:5.1f}   train top-1 {s['train_top1']:5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
