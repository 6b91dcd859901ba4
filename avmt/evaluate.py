"""Downstream classification from a checkpoint: ``python -m avmt.evaluate --checkpoint RUN_OR_CHECKPOINT``.

Heads (the features both protocols classify, per video and view):

- ``visual``: the visual BOS output and the mean of the visual clip outputs, concatenated (multimodal
  ``[m^v_0 ; mean_t m^v_t]``; the unimodal ``y^v`` with late fusion);
- ``audio``: the same for the audio half (``m^a`` / ``y^a``);
- ``audiovisual``: both, concatenated.

With mid fusion the multimodal halves attend to each other, so ``visual`` and ``audio`` read one modality's
tokens, not a model blind to the other modality.

Protocols (``--protocol``):

- ``linear`` (default, cheap): features of the frozen model, then a multinomial logistic regression per head
  trained on the ``train`` split;
- ``finetune``: per head, a copy of the whole model (CNNs + Transformers) plus a dropout + linear head is
  trained with cross-entropy, AdamW, linear warm-up then cosine, for ``--epochs`` on the ``train`` split (the
  released code fine-tunes the whole model on Kinetics-Sounds). The heads train in lockstep on the same
  batches, so the videos are decoded once per step for all of them.

Both score top-1 / top-5 on both splits with logits averaged over ``--views`` views: view 0 is the
deterministic eval view (centred window and crop), views 1.. seeded train-mode draws (random window, clip
offsets, crop, flip). Splits: a video goes to ``test`` when a hash of its ``folder/file`` falls in the last
``--test-fraction`` (stable across runs and machines, wherever the data live). ``--compare-random`` runs the same protocol on the same
architecture at the run's random initialisation, the baseline pretraining must beat. With no ``--manifest``
the checkpoint's own training manifest is used (for the default run: the labelled synthetic dataset).

The pretrained checkpoint's own CPP head is also scored, in eval mode (no dropout), on every video of the
manifest and its ``--views``: each video with its own audio and with the audio of another video (a seeded
derangement), reported per kind of pair, once on masked input as in pretraining and once unmasked
(``pretrained_cpp`` in ``--json``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avmt.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, load_model_weights
from avmt.config import Config, ConfigError, config_from_dict
from avmt.models import AVBert
from avmt.models.avbert import AVBertOutput
from avmt.objectives import Pretraining, swap_permutation
from avmt.protocols import DEFAULTS as TRANSFER_DEFAULTS
from avmt.protocols import PROTOCOLS as TRANSFER_PROTOCOLS
from avmt.protocols import ProtocolError
from avmt.watchdog import Watchdog, beat

HEADS = ("visual", "audio", "audiovisual")
PROTOCOLS = ("linear", "finetune")


class EvaluationError(ValueError):
    """The evaluation cannot run on these inputs (labels, splits, settings); the message says why."""


def split_of(path: str, test_fraction: float) -> str:
    """``train`` or ``test``, from a hash of the path's last two parts (``folder/file``): stable across runs, manifest
    order and machines, and the same wherever the dataset lives (a hash of the absolute path moved with the folder)."""
    key = "/".join(Path(path).parts[-2:])
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if h >= 1 - test_fraction else "train"


def head_features(out: AVBertOutput) -> dict[str, Tensor]:
    """``{head: [B, F]}`` from a model output: ``[BOS ; mean of the clip outputs]`` per modality half
    (F = 2·D for ``visual``/``audio``, 4·D for ``audiovisual``), same dtype as the outputs."""
    t = out.visual_embeddings.shape[1]
    if out.multimodal is not None:
        seq_v, seq_a = out.multimodal[:, : 1 + t], out.multimodal[:, 1 + t :]
    else:
        seq_v, seq_a = out.visual, out.audio
    v = torch.cat([seq_v[:, 0], seq_v[:, 1:].mean(1)], 1)
    a = torch.cat([seq_a[:, 0], seq_a[:, 1:].mean(1)], 1)
    return {"visual": v, "audio": a, "audiovisual": torch.cat([v, a], 1)}


@torch.no_grad()
def over_views(
    fn: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    cfg: Config,
    records: Sequence[dict],
    views: int,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "views",
) -> dict[str, Tensor]:
    """Run ``fn`` (a batch on ``device`` -> ``{key: [B, ...]}``) over every video of ``records`` for ``views``
    views; returns ``{key: [V, N, ...]}`` float32 on the CPU, rows in manifest order.

    View 0 is the deterministic eval-mode sequence; views 1.. are train-mode draws from fixed seeds
    (``1000 + view``), so results are reproducible. Any video that fails to load is an error here: a
    replaced or dropped video would silently change the score."""
    from tqdm import tqdm

    from avmt.data.loader import build_loader

    per_view: list[dict[str, Tensor]] = []
    for view in range(views):
        loader = build_loader(records, cfg.data, batch_size, train=view > 0, device=device, seed=1000 + view)
        rows: list[Tensor] = []
        outs: dict[str, list[Tensor]] = {}
        for batch in tqdm(loader.iterate(), total=len(loader), disable=not progress, desc=f"{desc} (view {view + 1}/{views})"):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            for k, v in fn(batch).items():
                outs.setdefault(k, []).append(v.float().cpu())
            beat()
            rows.append(batch["index"].cpu())  # the manifest row loaded; train mode shuffles, so restore the order below
        loader.close()  # DALI: stop its prefetching threads before the next view's loader starts
        if loader.failures:
            raise RuntimeError(f"{loader.failures} video(s) failed to load ({desc}, view {view + 1}); see the log")
        index = torch.cat(rows)
        order = index.argsort()
        if not torch.equal(index[order], torch.arange(len(records))):
            raise RuntimeError(f"{desc}: the loader did not return every video exactly once")
        per_view.append({k: torch.cat(v)[order] for k, v in outs.items()})
    return {k: torch.stack([p[k] for p in per_view]) for k in per_view[0]}


def extract_features(
    model: AVBert,
    cfg: Config,
    records: Sequence[dict],
    views: int,
    batch_size: int = 8,
    progress: bool = True,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """``{head: [V, N, F]}`` float32 features of the frozen ``model`` (eval mode) for ``records`` (see :func:`over_views`)."""
    device = device or next(model.parameters()).device
    model.eval()
    return over_views(
        lambda b: head_features(model(b["video"], b["audio"])), cfg, records, views, device, batch_size, progress, desc="features"
    )


def topk_scores(logits: Tensor, y: Tensor, prefix: str) -> dict[str, float]:
    """Top-1 / top-5 accuracy in percent of ``logits [V, N, C]`` averaged over the V views, against ``y [N]`` int64."""
    mean = logits.mean(0)
    top = mean.topk(min(5, mean.shape[1]), dim=1).indices
    return {
        f"{prefix}_top1": 100.0 * (top[:, 0] == y).float().mean().item(),
        f"{prefix}_top5": 100.0 * (top == y[:, None]).any(1).float().mean().item(),
    }


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    classes: int,
    steps: int = 500,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
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
    with torch.no_grad():
        return topk_scores(head(tx), train_y, "train") | topk_scores(head(ex), test_y, "test")


def labelled_split(records: Sequence[dict], test_fraction: float) -> tuple[Tensor, Tensor, int]:
    """``(labels [N] int64, is_test [N] bool, classes)`` of a labelled manifest; EvaluationError if it cannot be
    classified (no labels, a single class, a split left empty)."""
    missing = [r.get("path", f"row {i}") for i, r in enumerate(records) if not isinstance(r.get("label_index"), int)]
    if missing:
        raise EvaluationError(
            f"{len(missing)} of {len(records)} manifest rows have no integer label_index (e.g. {missing[0]}): "
            "evaluation needs a labelled manifest (python -m avmt.data.prepare with class folders or a CSV with labels)"
        )
    labels = torch.tensor([r["label_index"] for r in records])
    if labels.min() < 0:
        raise EvaluationError(f"label_index must be >= 0, got {int(labels.min())}")
    if len(labels.unique()) < 2:
        raise EvaluationError(f"the manifest holds a single class (label_index {int(labels[0])}): nothing to classify")
    is_test = torch.tensor([split_of(r["path"], test_fraction) == "test" for r in records])
    if is_test.all() or not is_test.any():
        raise EvaluationError(f"the {len(records)} videos do not fill both splits at test_fraction={test_fraction}")
    return labels, is_test, int(labels.max()) + 1


def evaluate(
    model: AVBert,
    cfg: Config,
    records: Sequence[dict],
    views: int,
    test_fraction: float,
    progress: bool = True,
    device: torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """Linear probe: ``{head: {train_top1, train_top5, test_top1, test_top5}}`` on ``model``'s frozen features."""
    labels, is_test, classes = labelled_split(records, test_fraction)
    feats = extract_features(model, cfg, records, views, progress=progress, device=device)
    return {h: linear_probe(f[:, ~is_test], labels[~is_test], f[:, is_test], labels[is_test], classes) for h, f in feats.items()}


@torch.no_grad()
def pair_accuracy(
    pre: Pretraining,
    cfg: Config,
    records: Sequence[dict],
    labels: Tensor,
    views: int,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    device: torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """Correct pair prediction of ``pre``'s CPP head in eval mode (no dropout) on every video of ``records``.

    Each video is scored with its own audio and with the audio of the video a seeded derangement gives it, so
    half the pairs are swapped; ``labels [N]`` split the swapped pairs into those from another class and those
    from the same class (which only instance cues, e.g. event timing, can tell apart). Every pair is scored
    twice: ``masked``, the input CPP trains on (the pretraining masking: ``objective.mask_ratio`` of the clips
    of each stream, the 80/10/10 rule, seeded), and ``unmasked``, every clip real. Returns ``{kind: {pairs,
    accuracy, matched, swapped_other_class, swapped_same_class (NaN when none), same_class_share}}``, fractions
    in [0, 1]."""
    device = device or torch.device("cpu")
    model = pre.model
    was_training = pre.training
    pre.eval().to(device)
    tokens = over_views(
        lambda b: {"visual": model.embed_visual(b["video"])[1], "audio": model.embed_audio(b["audio"])[1]},
        cfg,
        records,
        views,
        device,
        batch_size=batch_size,
        progress=progress,
        desc="pairs",
    )
    n = labels.numel()
    gen = torch.Generator().manual_seed(seed)
    perm = swap_permutation(n, 1.0, gen)  # one random cycle: nobody keeps its own audio
    same = labels[perm] == labels
    correct: dict[str, list[Tensor]] = {"masked": [], "unmasked": []}  # per view: [2N] bool, matched then swapped

    def logits(vis: Tensor, aud: Tensor, masked: bool) -> Tensor:
        if masked:
            valid = torch.ones(vis.shape[:2], dtype=torch.bool)
            vis, aud = pre.mask_tokens(vis, valid, "visual", gen)[0], pre.mask_tokens(aud, valid, "audio", gen)[0]
        return pre.cpp_logits(model.encode(vis, aud)).cpu()

    for v in range(views):
        vis, aud = tokens["visual"][v].to(device), tokens["audio"][v].to(device)
        for kind in correct:
            ok = []
            for audio_rows, matched in ((torch.arange(n), True), (perm, False)):
                out = torch.cat(
                    [
                        logits(vis[i : i + batch_size], aud[audio_rows[i : i + batch_size]], kind == "masked")
                        for i in range(0, n, batch_size)
                    ]
                )
                ok.append(out > 0 if matched else out <= 0)
            correct[kind].append(torch.cat(ok))
    pre.train(was_training)
    result = {}
    for kind, rows in correct.items():
        c = torch.stack(rows).float()  # [V, 2N]
        m, s = c[:, :n], c[:, n:]
        result[kind] = {
            "pairs": 2 * n * views,
            "accuracy": float(c.mean()),
            "matched": float(m.mean()),
            "swapped_other_class": float(s[:, ~same].mean()) if (~same).any() else float("nan"),
            "swapped_same_class": float(s[:, same].mean()) if same.any() else float("nan"),
            "same_class_share": float(same.float().mean()),
        }
    return result


# -- fine-tuning --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning hyper-parameters. The defaults fine-tune the ``tiny`` preset on the synthetic data (84 train
    videos: 200 steps of batch 8) in a few minutes per model on 2 CPU cores; 8 epochs left the heads
    under-fitted there (train top-1 53-66%). For real data and the paper model raise ``epochs`` and lower ``lr``."""

    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3  # peak, for the whole model and the heads
    weight_decay: float = 1e-4  # the paper's pretraining value
    warmup_fraction: float = 0.1  # of all steps, linear warm-up; then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # global norm per model; 0 disables
    dropout: float = 0.5  # before each linear head
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_fraction": 0 <= self.warmup_fraction < 1,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "grad_clip": self.grad_clip >= 0,
            "dropout": 0 <= self.dropout < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise EvaluationError(
                f"fine-tuning setting {bad[0]}={getattr(self, bad[0])!r} is out of range "
                "(epochs, batch_size >= 1; lr > 0; weight_decay, grad_clip >= 0; warmup_fraction, dropout in [0, 1); "
                "min_lr_ratio in [0, 1])"
            )


class Classifier(nn.Module):
    """An AVBERT model plus a dropout + linear head on one head's features:
    ``forward(video [B,T,3,F,H,W], audio [B,T,1,M,N]) -> logits [B, classes]`` (float32, or the autocast dtype)."""

    def __init__(self, model: AVBert, head: str, classes: int, dropout: float) -> None:
        super().__init__()
        if head not in HEADS:
            raise EvaluationError(f"head {head!r} is invalid: expected one of {', '.join(HEADS)}")
        self.model, self.head = model, head
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear((4 if head == "audiovisual" else 2) * model.cfg.dim, classes)

    def forward(self, video: Tensor, audio: Tensor) -> Tensor:
        return self.fc(self.drop(head_features(self.model(video, audio))[self.head]))


def finetune(
    model: AVBert,
    cfg: Config,
    records: Sequence[dict],
    classes: int,
    heads: Sequence[str],
    settings: FinetuneSettings,
    device: torch.device,
    progress: bool = True,
) -> tuple[dict[str, Classifier], dict[str, list[float]]]:
    """Fine-tune one copy of ``model`` (left unchanged) per head on ``records`` (the train split).

    Returns the trained classifiers and, per head, the mean cross-entropy of every epoch. All heads see the
    same batches in the same order (one decode per step); randomness (head init, dropout, data order and
    augmentation) comes from ``settings.seed``, so a run is reproducible on a given machine.
    """
    from tqdm import tqdm

    from avmt.data.loader import build_loader
    from avmt.optim import lr_factor

    loader = build_loader(records, cfg.data, settings.batch_size, train=True, device=device, seed=settings.seed, drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise EvaluationError(
            f"the train split holds {len(records)} videos, fewer than one batch of {settings.batch_size}: "
            "lower --batch-size or --test-fraction"
        )
    total = settings.epochs * steps_per_epoch
    warmup = int(settings.warmup_fraction * total)
    torch.manual_seed(settings.seed)
    clfs = {h: Classifier(copy.deepcopy(model), h, classes, settings.dropout).to(device) for h in heads}
    opts = {h: torch.optim.AdamW(c.parameters(), lr=settings.lr, weight_decay=settings.weight_decay) for h, c in clfs.items()}
    scheds = {
        h: torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, warmup, total, settings.min_lr_ratio)) for h, o in opts.items()
    }
    bf16 = device.type == "cuda"  # as pretraining's precision=auto: bf16 autocast on CUDA, fp32 on CPU
    history: dict[str, list[float]] = {h: [] for h in heads}
    bar = tqdm(total=total, disable=not progress, desc=f"fine-tune {'+'.join(heads)}")
    for c in clfs.values():
        c.train()
    for epoch in range(settings.epochs):
        loader.set_epoch(epoch)
        sums = dict.fromkeys(heads, 0.0)
        for batch in loader.iterate():
            video, audio = batch["video"].to(device, non_blocking=True), batch["audio"].to(device, non_blocking=True)
            label = batch["label"].to(device)
            for h, c in clfs.items():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = F.cross_entropy(c(video, audio).float(), label)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"fine-tuning head {h!r}: non-finite loss at epoch {epoch}; lower --lr")
                opts[h].zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(c.parameters(), settings.grad_clip)
                opts[h].step()
                scheds[h].step()
                sums[h] += loss.item()
            beat()
            bar.update(1)
            bar.set_postfix({h: f"{sums[h] / max(1, bar.n - epoch * steps_per_epoch):.3f}" for h in heads})
        for h in heads:
            history[h].append(sums[h] / steps_per_epoch)
    bar.close()
    loader.close()
    return clfs, history


def score_classifiers(
    clfs: dict[str, Classifier],
    cfg: Config,
    records: Sequence[dict],
    views: int,
    labels: Tensor,
    is_test: Tensor,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """``{head: {train_top1, train_top5, test_top1, test_top5}}`` of classifiers on every video of ``records``
    (``labels [N]`` int64, ``is_test [N]`` bool), logits averaged over ``views`` views (see :func:`over_views`)."""
    for c in clfs.values():
        c.eval()
    logits = over_views(
        lambda b: {h: c(b["video"], b["audio"]) for h, c in clfs.items()},
        cfg,
        records,
        views,
        device,
        batch_size,
        progress,
        desc="fine-tuned logits",
    )
    return {
        h: topk_scores(x[:, ~is_test], labels[~is_test], "train") | topk_scores(x[:, is_test], labels[is_test], "test")
        for h, x in logits.items()
    }


def evaluate_finetune(
    model: AVBert,
    cfg: Config,
    records: Sequence[dict],
    views: int,
    test_fraction: float,
    settings: FinetuneSettings,
    heads: Sequence[str] = HEADS,
    progress: bool = True,
    device: torch.device | None = None,
) -> dict[str, dict[str, Any]]:
    """Fine-tuning protocol: ``{head: {train_top1, train_top5, test_top1, test_top5, train_loss}}``; ``train_loss``
    is the mean cross-entropy of every fine-tuning epoch. ``model`` itself is not changed."""
    device = device or next(model.parameters()).device
    labels, is_test, classes = labelled_split(records, test_fraction)
    train_records = [r for r, t in zip(records, is_test.tolist()) if not t]
    clfs, history = finetune(model, cfg, train_records, classes, heads, settings, device, progress)
    scores = score_classifiers(clfs, cfg, records, views, labels, is_test, device, settings.batch_size, progress)
    return {h: scores[h] | {"train_loss": history[h]} for h in heads}


# -- command line -------------------------------------------------------------------------------------------------


def _transfer(args: argparse.Namespace, ckpt: Path, cfg: Config, settings: Any, device: torch.device) -> dict[str, Any]:
    """``--protocol ucf101 | esc50 | kinetics-sounds``: :func:`avmt.protocols.run_protocol` on the checkpoint's model
    (and its random initialisation with ``--compare-random``)."""
    from avmt.data.manifest import load_manifest
    from avmt.protocols import run_protocol

    if args.manifest is None:
        raise EvaluationError(f"--protocol {args.protocol} needs --manifest (prepared with --format {args.protocol})")
    records = load_manifest(args.manifest)
    folds = [args.split] if args.split else None
    results: dict[str, Any] = {"checkpoint": str(ckpt), "manifest": str(args.manifest)}

    def run(model: AVBert) -> dict[str, Any]:
        return run_protocol(args.protocol, model, cfg.data, records, settings, device, folds, not args.quiet, args.data_overrides)

    model = AVBert(cfg.model)
    load_model_weights(ckpt, model)  # the caller verified the checkpoint
    results["pretrained"] = run(model)
    if args.compare_random:
        torch.manual_seed(cfg.train.seed)  # the initialisation the run started from
        results["random_init"] = run(AVBert(cfg.model))
    return results


def _classify(
    args: argparse.Namespace, ckpt: Path, state: dict[str, Any], cfg: Config, heads: tuple[str, ...], settings: Any, device: torch.device
) -> dict[str, Any]:
    """``--protocol linear | finetune`` on the checkpoint (and its random initialisation with ``--compare-random``)."""
    from avmt.data.loader import check_dali_cpu_codecs, select_loader
    from avmt.data.manifest import load_manifest
    from avmt.train import synthetic_manifest

    loader = select_loader(cfg.data.loader, device)
    manifest = args.manifest or (Path(cfg.data.manifest) if cfg.data.manifest else synthetic_manifest(cfg.data, progress=False))
    records = load_manifest(manifest)
    if loader == "dali" and device.type != "cuda":
        check_dali_cpu_codecs(records)
    labels, _, _ = labelled_split(records, args.test_fraction)  # labels and splits, before any model work
    results: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "manifest": str(manifest),
        "protocol": args.protocol,
        "views": args.views,
        "heads": list(heads),
        "test_videos": sum(split_of(r["path"], args.test_fraction) == "test" for r in records),
        "videos": len(records),
    }
    if args.protocol == "finetune":
        results["settings"] = dataclasses.asdict(settings)

    def run(model: AVBert) -> dict[str, dict[str, Any]]:
        model.to(device)
        if args.protocol == "linear":
            scores = evaluate(model, cfg, records, args.views, args.test_fraction, progress=not args.quiet, device=device)
            return {h: scores[h] for h in heads}
        return evaluate_finetune(
            model, cfg, records, args.views, args.test_fraction, settings, heads, progress=not args.quiet, device=device
        )

    if "converted_from" in state:  # python -m avmt.convert: the model only, no pretraining heads to score CPP with
        model = AVBert(cfg.model)
        load_model_weights(ckpt, model)  # verified by the first load_checkpoint above
        results["converted_from"] = state["converted_from"]
        results["pretrained"] = run(model)
    else:
        pretrained = Pretraining(AVBert(cfg.model), cfg.objective)
        load_checkpoint(ckpt, pretrained, verified=True)  # verified by the first load_checkpoint above
        results["pretrained"] = run(pretrained.model)
        if cfg.objective.cpp > 0:  # the pretraining task itself, as a check of the checkpoint
            results["pretrained_cpp"] = pair_accuracy(pretrained, cfg, records, labels, args.views, progress=not args.quiet, device=device)
    if args.compare_random:
        torch.manual_seed(cfg.train.seed)  # the initialisation the run started from
        results["random_init"] = run(AVBert(cfg.model))
    return results


def _stacks_path(ckpt: Path) -> Path:
    """Where a stuck evaluation writes its stacks: the run folder of ``ckpt`` (``RUN/checkpoints/step-N``), else the
    checkpoint folder's parent, if writable; the temporary folder otherwise."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    folder = run if os.access(run, os.W_OK) else Path(tempfile.gettempdir())
    return folder / f"hang-stacks-evaluate-{os.getpid()}.txt"


def main(argv: list[str] | None = None) -> int:
    defaults = FinetuneSettings()
    parser = argparse.ArgumentParser(
        prog="python -m avmt.evaluate",
        description=__doc__.splitlines()[0],
        epilog="protocols, heads and views: see the module docstring or docs/training.md",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run folder (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--manifest", type=Path, default=None, help="labelled manifest.jsonl (default: the one the run trained on)")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS + TRANSFER_PROTOCOLS,
        default="linear",
        help="linear: logistic regression on frozen features (default, cheap); finetune: train the whole model + head; "
        "ucf101, esc50, kinetics-sounds: the paper's transfer protocols as the authors' code runs them (avmt.protocols)",
    )
    parser.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated subset of {','.join(HEADS)} (default: all)")
    parser.add_argument("--views", type=int, default=1, help="views per video, logits averaged (default 1)")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--compare-random", action="store_true", help="also run the protocol on the same model at random initialisation")
    parser.add_argument(
        "--loader", choices=("auto", "cpu", "dali"), default=None, help="data loader (default: the checkpoint's data.loader)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ft = parser.add_argument_group("training (--protocol finetune, and the transfer protocols: their own defaults)")
    ft.add_argument("--epochs", type=int, default=None, help=f"default {defaults.epochs}; transfer: the authors' (20 / 300 / 20)")
    ft.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {defaults.lr:g}); transfer: the backbone's")
    ft.add_argument("--batch-size", type=int, default=None, help=f"default {defaults.batch_size}; transfer: 32 / 128 / 5")
    ft.add_argument("--weight-decay", type=float, default=None, help=f"default {defaults.weight_decay:g}; transfer: 5e-6")
    ft.add_argument("--warmup-fraction", type=float, default=None, help=f"default {defaults.warmup_fraction:g} (finetune only)")
    ft.add_argument("--dropout", type=float, default=None, help=f"before the linear head (default {defaults.dropout:g})")
    ft.add_argument("--seed", type=int, default=None, help=f"head init, dropout, data order (default {defaults.seed})")
    tr = parser.add_argument_group("transfer protocols (--protocol ucf101 | esc50 | kinetics-sounds)")
    tr.add_argument("--split", "--fold", dest="split", default=None, help="run one split (UCF101 1-3) or fold (ESC-50 1-5) only")
    tr.add_argument("--head-lr", type=float, default=None, help="learning rate of the heads (0.03 / 0.003 / 1e-3)")
    tr.add_argument("--train-repeats", type=int, default=None, help="samples of each training video per epoch (10 / 10 / 1)")
    tr.add_argument("--temporal-views", type=int, default=None, help="test clips per video (10 / 10 / 1)")
    tr.add_argument("--spatial-views", type=int, default=None, help="test crops per clip (3 / - / 3)")
    tr.add_argument("--test-crop", type=int, default=None, help="test short side and crop in px (128)")
    tr.add_argument("data_overrides", nargs="*", metavar="data.key=value", help="data settings of the protocol, e.g. data.frames=8")
    parser.add_argument(
        "--watchdog-s",
        type=float,
        default=1800.0,
        help="no batch evaluated for this long: every thread's stack is written to the checkpoint's run folder and the "
        "command exits (default 1800; 0: off)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected failure too")
    args = parser.parse_args(argv)

    # -- check every argument before any work --
    if not args.checkpoint.exists():
        parser.error(f"--checkpoint {args.checkpoint} does not exist")
    if (args.checkpoint / "state.pt").exists():
        ckpt = args.checkpoint
    else:
        found = find_checkpoint(args.checkpoint)
        for path, why in found.skipped:
            print(f"avmt.evaluate: skipped checkpoint {path}: {why}", file=sys.stderr)
        ckpt = found.path
    if ckpt is None:
        parser.error(f"{args.checkpoint} holds no checkpoint (expected RUN/checkpoints/latest or a folder with state.pt)")
    if args.views < 1 or not 0 < args.test_fraction < 1:
        parser.error("--views must be >= 1 and --test-fraction in (0, 1)")
    if not 0 <= args.watchdog_s < float("inf"):
        parser.error(f"--watchdog-s must be a finite number of seconds >= 0 (0: off), got {args.watchdog_s:g}")
    heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    if not heads or any(h not in HEADS for h in heads) or len(set(heads)) != len(heads):
        parser.error(f"--heads {args.heads!r} is invalid: expected a comma-separated subset of {','.join(HEADS)}")
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    common = given(epochs=args.epochs, batch_size=args.batch_size, weight_decay=args.weight_decay, dropout=args.dropout, seed=args.seed)
    transfer = args.protocol in TRANSFER_PROTOCOLS
    try:
        if transfer:
            extra = given(
                backbone_lr=args.lr,
                head_lr=args.head_lr,
                train_repeats=args.train_repeats,
                temporal_views=args.temporal_views,
                spatial_views=args.spatial_views,
                test_crop=args.test_crop,
            )
            settings = dataclasses.replace(TRANSFER_DEFAULTS[args.protocol], **common, **extra)
        else:
            stray = [f for f, v in (("--split", args.split), ("--head-lr", args.head_lr), ("data overrides", args.data_overrides)) if v]
            if stray:
                parser.error(f"{stray[0]} is for the transfer protocols (ucf101, esc50, kinetics-sounds)")
            settings = FinetuneSettings(**common, **given(lr=args.lr, warmup_fraction=args.warmup_fraction))
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (EvaluationError, ProtocolError, RuntimeError) as e:
        parser.error(str(e))
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        parser.error(f"--device {args.device}: {'no CUDA device here' if not torch.cuda.is_available() else 'no such CUDA device'}")
    floats = {"--lr": args.lr, "--weight-decay": args.weight_decay, "--warmup-fraction": args.warmup_fraction, "--dropout": args.dropout}
    for flag, value in (floats | {"--head-lr": args.head_lr}).items():
        if value is not None and not abs(value) < float("inf"):  # inf passes the settings' range checks
            parser.error(f"{flag} must be a finite number, got {value:g}")
    if transfer and args.split is not None:
        splits = {"ucf101": ("1", "2", "3"), "esc50": ("1", "2", "3", "4", "5"), "kinetics-sounds": ("1",)}[args.protocol]
        if args.split not in splits:
            parser.error(f"--split {args.split!r}: {args.protocol} has splits/folds {', '.join(splits)}")
    if args.manifest is not None and not args.manifest.exists():
        parser.error(f"--manifest {args.manifest} does not exist")
    if args.manifest is not None and not args.manifest.is_file():  # a folder, or a FIFO that would block the read
        parser.error(f"--manifest {args.manifest} is not a regular file")

    from avmt.data.loader import LoaderError

    try:
        state = load_checkpoint(ckpt)
        if not isinstance(state.get("config"), dict):
            raise CheckpointError(f"{ckpt}: state.pt holds no config (a checkpoint avmt wrote always does)")
        try:
            cfg = config_from_dict(state["config"])
        except ConfigError as e:
            raise CheckpointError(f"{ckpt}: the config in state.pt is invalid: {e}") from None
        if args.loader is not None:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader=args.loader))
        with Watchdog(args.watchdog_s, _stacks_path(ckpt), "no batch evaluated (--watchdog-s)", prog="avmt.evaluate"):
            if transfer:
                results = _transfer(args, ckpt, cfg, settings, device)
            else:
                results = _classify(args, ckpt, state, cfg, heads, settings, device)
    except (EvaluationError, ProtocolError, LoaderError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"avmt.evaluate: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    elif transfer:
        from avmt.protocols import table

        for name in ("pretrained", "random_init"):
            if name in results:
                print(f"{name}:\n{table(results[name])}\n")
    else:
        print(f"{args.protocol}: {results['videos']} videos ({results['test_videos']} test), {args.views} view(s)")
        for name in ("pretrained", "random_init"):
            for head, s in results.get(name, {}).items():
                print(
                    f"{name:12s} {head:12s} test top-1 {s['test_top1']:5.1f}  top-5 {s['test_top5']:5.1f}   "
                    f"train top-1 {s['train_top1']:5.1f}  top-5 {s['train_top5']:5.1f}"
                )
        for kind, c in results.get("pretrained_cpp", {}).items():
            print(
                f"pretrained   CPP, {kind + ' input':14s} (eval mode, {c['pairs']} pairs of all {results['videos']} videos): "
                f"accuracy {c['accuracy']:.3f}; matched {c['matched']:.3f}, swapped from another class {c['swapped_other_class']:.3f}, "
                f"from the same class {c['swapped_same_class']:.3f} ({100 * c['same_class_share']:.0f}% of swaps)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
