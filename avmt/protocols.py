"""The paper's transfer protocols, as the authors' released code runs them (``python -m avmt.evaluate --protocol
ucf101 | esc50 | kinetics-sounds``); docs/training.md, "Transfer protocols", lists every default and its source.

- ``ucf101`` (visual): the visual CNN alone (no Transformer) plus dropout 0.5 + a linear head, fine-tuned, on one
  32-frame clip per sample; 3 splits (the manifest's ``splits``, from ``prepare --format ucf101``).
- ``esc50`` (audio): a linear classifier (dropout 0.1 + linear, multi-class margin loss, margin 0.1) on the frozen
  audio CNN (eval mode: its BatchNorm statistics stay), on one 2 s clip per sample; 5 folds (the manifest's
  ``fold``), each fold the test set once.
- ``kinetics-sounds`` (audio-visual): the whole model fine-tuned on sequences of 10 clips spread over the video,
  with the released code's two heads: per clip, the CNN features of both modalities concatenated (dropout 0.5 +
  linear), and per clip, the multimodal BOS and clip outputs of each half concatenated (dropout 0.5 + a bias-free
  linear per half, summed, LayerNorm, linear); the loss is the sum of both heads' cross-entropies over the clips.
  One split (the manifest's ``split``: ``train`` / ``test``).

Every protocol trains with Adam (β = 0.9, 0.999, eps 1e-6, L2 weight decay, none on BatchNorm parameters) and a
schedule without warm-up (cosine, or linear for ESC-50), on train-mode samples (random window and crop, flip,
SpecAugment), each video drawn ``train_repeats`` times per epoch. Test: every deterministic view (10 temporal x 3
spatial for video, crops of ``test_crop`` px, 10 temporal for audio), the logits averaged over views (and for
Kinetics-Sounds over clips and both heads). The released code sums softmax probabilities instead, and reports the
best test accuracy over epochs; here the model after the last epoch is scored, with no test-set selection.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avmt.config import DataConfig
from avmt.data.clips import View
from avmt.watchdog import beat

PROTOCOLS = ("ucf101", "esc50", "kinetics-sounds")


class ProtocolError(ValueError):
    """The protocol cannot run on these inputs (records, splits, settings); the message says why."""


@dataclass(frozen=True)
class TransferSettings:
    """Hyper-parameters of one protocol; :data:`DEFAULTS` holds the authors' values (their configs' names in the
    comments of docs/training.md). ``backbone_lr`` 0 freezes the backbone (ESC-50)."""

    epochs: int
    batch_size: int
    backbone_lr: float
    head_lr: float
    weight_decay: float
    schedule: str  # "cosine" or "linear" (to 0 at the last step, no warm-up)
    dropout: float
    train_repeats: int  # samples of each training video per epoch
    temporal_views: int
    spatial_views: int
    test_crop: int
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "backbone_lr": 0 <= self.backbone_lr < math.inf,
            "head_lr": 0 < self.head_lr < math.inf,
            "weight_decay": 0 <= self.weight_decay < math.inf,
            "schedule": self.schedule in ("cosine", "linear"),
            "dropout": 0 <= self.dropout < 1,
            "train_repeats": self.train_repeats >= 1,
            "temporal_views": self.temporal_views >= 1,
            "spatial_views": self.spatial_views >= 1,
            "test_crop": self.test_crop >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ProtocolError(f"setting {bad[0]}={getattr(self, bad[0])!r} is out of range")


DEFAULTS = {
    "ucf101": TransferSettings(20, 32, 1e-4, 0.03, 5e-6, "cosine", 0.5, 10, 10, 3, 128),
    "esc50": TransferSettings(300, 128, 0.0, 0.003, 5e-6, "linear", 0.1, 10, 10, 1, 128),
    "kinetics-sounds": TransferSettings(20, 5, 1e-4, 1e-3, 5e-6, "cosine", 0.5, 1, 1, 3, 128),
}
MODALITIES = {"ucf101": ("video",), "esc50": ("audio",), "kinetics-sounds": ("video", "audio")}
CLIP_SECONDS = 32 / 15  # 32 frames at sampling rate 2 of 30 fps, as the released configs (NUM_FRAMES 32, TARGET_FPS 30)


def protocol_data(name: str, base: DataConfig, test_crop: int, overrides: Sequence[str] = ()) -> tuple[DataConfig, DataConfig]:
    """(train, test) data settings of protocol ``name``: ``base`` (the checkpoint's) with the clip sampling the
    protocol fixes, then ``overrides`` (``data.key=value``). Mel sizes, sample rate and train scales stay ``base``'s
    unless overridden. Test: short side ``test_crop`` and crops of ``test_crop`` (the released code: 128), no
    SpecAugment."""
    from avmt.config import ConfigError, parse_override

    if name == "esc50":
        clip: dict[str, Any] = dict(num_clips=1, clip_seconds=2.0, window_seconds=2.0)
    elif name == "ucf101":
        clip = dict(num_clips=1, clip_seconds=CLIP_SECONDS, window_seconds=CLIP_SECONDS, frames=32, fps=15.0)
    else:  # 10 clips over a window longer than a 10 s video: the short-video rule spreads them from start to end
        clip = dict(num_clips=10, clip_seconds=CLIP_SECONDS, window_seconds=10 * CLIP_SECONDS, frames=32, fps=15.0)
    for text in overrides:
        section, key, value = parse_override(text)
        if section != "data" or key not in {f.name for f in dataclasses.fields(DataConfig)}:
            raise ProtocolError(f"override {text!r}: a protocol takes data.key=value overrides of the data section only")
        clip[key] = tuple(value) if isinstance(value, list) else value
    try:
        train = dataclasses.replace(base, **clip)
        test = dataclasses.replace(train, crop_size=test_crop, scale_range=(test_crop, test_crop), spec_mask_rate=0.0)
    except ConfigError as e:
        raise ProtocolError(f"{name} data settings: {e}") from None
    return train, test


# -- splits --------------------------------------------------------------------------------------------------------


def folds_of(name: str, records: Sequence[dict]) -> list[str]:
    """The splits or folds protocol ``name`` runs, from the manifest (UCF101: 1-3, ESC-50: 1-5, Kinetics-Sounds: 1)."""
    field = {"ucf101": "splits", "esc50": "fold", "kinetics-sounds": "split"}[name]
    lacking = [r["path"] for r in records if r.get(field) is None]
    if lacking:
        raise ProtocolError(
            f"{len(lacking)} of {len(records)} records have no {field!r} (e.g. {lacking[0]}): prepare the dataset with "
            f"python -m avmt.data.prepare --format {name}"
        )
    if name == "ucf101":
        return sorted({k for r in records for k in r["splits"]})
    if name == "esc50":
        return [str(f) for f in sorted({int(r["fold"]) for r in records})]
    return ["1"]


def split_of(name: str, rec: dict, fold: str) -> str | None:
    """``train``, ``test`` or None (not part of this split) for one record."""
    if name == "ucf101":
        return rec["splits"].get(fold)
    if name == "esc50":
        return "test" if str(rec["fold"]) == fold else "train"
    return rec["split"] if rec["split"] in ("train", "test") else None


# -- models --------------------------------------------------------------------------------------------------------


def _pooled(cnn: nn.Module, x: Tensor) -> Tensor:
    """A per-clip CNN on ``x [B, T, ...]`` -> pooled features ``[B, T, C]`` (the CNN itself normalises uint8 video)."""
    b, t = x.shape[:2]
    return cnn(x.flatten(0, 1)).reshape(b, t, -1)


class VisualClassifier(nn.Module):
    """UCF101: ``video [B, T, 3, F, H, W]`` uint8 -> logits ``[B, C]``: the visual CNN's pooled feature (mean over the
    T clips), dropout, linear. Holds only the CNN of the model it is built from."""

    def __init__(self, model: nn.Module, classes: int, dropout: float) -> None:
        super().__init__()
        self.cnn, self.drop = model.visual_cnn, nn.Dropout(dropout)
        self.fc = nn.Linear(self.cnn.out_features, classes)

    def backbone(self) -> list[nn.Parameter]:
        return list(self.cnn.parameters())

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.fc(self.drop(_pooled(self.cnn, batch["video"]).mean(1)))


class AudioClassifier(nn.Module):
    """ESC-50: ``audio [B, T, 1, M, N]`` -> logits ``[B, C]``: the frozen audio CNN (eval mode, no gradients), its
    pooled feature (mean over the T clips), dropout, linear. Holds only the CNN of the model it is built from."""

    def __init__(self, model: nn.Module, classes: int, dropout: float) -> None:
        super().__init__()
        self.cnn, self.drop = model.audio_cnn, nn.Dropout(dropout)
        self.fc = nn.Linear(self.cnn.out_features, classes)
        self.cnn.requires_grad_(False)

    def backbone(self) -> list[nn.Parameter]:
        return list(self.cnn.parameters())

    def train(self, mode: bool = True) -> AudioClassifier:
        super().train(mode)
        self.cnn.eval()  # frozen: its BatchNorm statistics stay those of pretraining
        return self

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            feats = _pooled(self.cnn, batch["audio"])
        return self.fc(self.drop(feats.mean(1)))


class SequenceClassifier(nn.Module):
    """Kinetics-Sounds: the whole model on ``video [B, T, ...]`` + ``audio [B, T, ...]`` -> logits ``[2, B, T, C]``
    (the clip head's, then the sequence head's; see the module docstring)."""

    def __init__(self, model: nn.Module, classes: int, dropout: float) -> None:
        super().__init__()
        self.model = model
        d = model.cfg.dim
        self.clip_drop, self.clip_fc = nn.Dropout(dropout), nn.Linear(model.visual_cnn.out_features + model.audio_cnn.out_features, classes)
        self.v_drop, self.a_drop = nn.Dropout(dropout), nn.Dropout(dropout)
        self.v_proj, self.a_proj = nn.Linear(2 * d, d, bias=False), nn.Linear(2 * d, d, bias=False)
        self.norm, self.seq_fc = nn.LayerNorm(d, eps=1e-5), nn.Linear(d, classes)
        if model.cfg.fusion != "mid":
            raise ProtocolError(
                f"the kinetics-sounds protocol reads the multimodal Transformer: needs model.fusion=mid, got {model.cfg.fusion}"
            )

    def backbone(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        out = self.model(batch["video"], batch["audio"])
        t = out.visual_features.shape[1]
        clip = self.clip_fc(self.clip_drop(torch.cat([out.visual_features, out.audio_features], -1)))
        mv, ma = out.multimodal[:, : 1 + t], out.multimodal[:, 1 + t :]
        v = torch.cat([mv[:, :1].expand(-1, t, -1), mv[:, 1:]], -1)
        a = torch.cat([ma[:, :1].expand(-1, t, -1), ma[:, 1:]], -1)
        seq = self.seq_fc(self.norm(self.v_proj(self.v_drop(v)) + self.a_proj(self.a_drop(a))))
        return torch.stack([clip, seq])


def build_classifier(name: str, model: nn.Module, classes: int, dropout: float) -> nn.Module:
    return {"ucf101": VisualClassifier, "esc50": AudioClassifier, "kinetics-sounds": SequenceClassifier}[name](model, classes, dropout)


def _loss(name: str, logits: Tensor, label: Tensor) -> Tensor:
    if name == "esc50":
        return F.multi_margin_loss(logits.float(), label, margin=0.1)
    if name == "kinetics-sounds":  # both heads, every clip labelled with its video's class
        c = logits.shape[-1]
        return sum(F.cross_entropy(h.reshape(-1, c).float(), label.repeat_interleave(h.shape[1])) for h in logits)
    return F.cross_entropy(logits.float(), label)


def _video_logits(name: str, logits: Tensor) -> Tensor:
    """``[B, C]`` per video of one view (Kinetics-Sounds: the mean over both heads and every clip)."""
    return logits.mean((0, 2)) if name == "kinetics-sounds" else logits


def _param_groups(clf: nn.Module, s: TransferSettings) -> list[dict[str, Any]]:
    """Backbone (weight decay, none on BatchNorm and LayerNorm parameters) at ``backbone_lr``, the heads at ``head_lr``."""
    backbone = {id(p) for p in clf.backbone()}
    norms = {id(p) for m in clf.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm)) for p in m.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in clf.parameters():
        if not p.requires_grad or (id(p) in backbone and s.backbone_lr == 0):
            continue
        groups.setdefault((id(p) in backbone, id(p) in norms), []).append(p)
    return [
        {"params": ps, "lr": s.backbone_lr if bb else s.head_lr, "weight_decay": 0.0 if norm else s.weight_decay}
        for (bb, norm), ps in groups.items()
    ]


def _schedule(s: TransferSettings, total: int) -> Callable[[int], float]:
    if s.schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return lambda step: max(0.0, (total - step) / total)


# -- one split -----------------------------------------------------------------------------------------------------


def run_split(
    name: str,
    model: nn.Module,
    train_cfg: DataConfig,
    test_cfg: DataConfig,
    train_records: Sequence[dict],
    test_records: Sequence[dict],
    classes: int,
    s: TransferSettings,
    device: torch.device,
    progress: bool = True,
    desc: str = "",
) -> dict[str, Any]:
    """Train a copy of ``model`` (left unchanged) with protocol ``name`` on ``train_records``, score it on every test
    view of ``test_records``: ``{test_top1, test_top5, train_loss (per epoch), train_videos, test_videos}``."""
    from tqdm import tqdm

    from avmt.data.loader import build_loader
    from avmt.evaluate import topk_scores

    mods = MODALITIES[name]
    torch.manual_seed(s.seed)
    clf = build_classifier(name, copy.deepcopy(model), classes, s.dropout).to(device)
    loader = build_loader(
        list(train_records) * s.train_repeats,
        train_cfg,
        s.batch_size,
        train=True,
        device=device,
        seed=s.seed,
        drop_last=True,
        modalities=mods,
    )
    steps = len(loader)
    if steps == 0:
        raise ProtocolError(
            f"{desc}: {len(train_records)} training videos x {s.train_repeats} repeats is fewer than one batch of {s.batch_size}"
        )
    total = s.epochs * steps
    opt = torch.optim.Adam(_param_groups(clf, s), betas=(0.9, 0.999), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(s, total))
    bf16 = device.type == "cuda"
    history: list[float] = []
    bar = tqdm(total=total, disable=not progress, desc=f"{name} {desc} train")
    for epoch in range(s.epochs):
        clf.train()
        loader.set_epoch(epoch)
        running = 0.0
        for batch in loader.iterate():
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = _loss(name, clf(batch), batch["label"])
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name} {desc}: non-finite loss at epoch {epoch}; lower the learning rates")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            beat()
            bar.update(1)
            bar.set_postfix(loss=f"{running / max(1, bar.n - epoch * steps):.3f}")
        history.append(running / steps)
    bar.close()
    loader.close()
    clf.eval()
    crops = s.spatial_views if "video" in mods else 1  # audio: temporal views only
    views = [View(t, s.temporal_views, c, crops) for t in range(s.temporal_views) for c in range(crops)]
    logits = torch.zeros(len(test_records), classes)
    labels = torch.tensor([r["label_index"] for r in test_records])
    with torch.no_grad():
        for v in tqdm(views, disable=not progress, desc=f"{name} {desc} test views"):
            test = build_loader(list(test_records), test_cfg, s.batch_size, train=False, device=device, modalities=mods, view=v)
            for batch in test.iterate():
                batch = {k: x.to(device) for k, x in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    out = _video_logits(name, clf(batch)).float().cpu()
                logits[batch["index"].cpu()] += out / len(views)
                beat()
            test.close()
            if test.failures:
                raise RuntimeError(f"{name} {desc}: {test.failures} test file(s) failed to load; see the log")
    top = topk_scores(logits[None], labels, "test")
    return top | {"train_loss": history, "train_videos": len(train_records), "test_videos": len(test_records), "views": len(views)}


def run_protocol(
    name: str,
    model: nn.Module,
    base: DataConfig,
    records: Sequence[dict],
    s: TransferSettings,
    device: torch.device,
    folds: Sequence[str] | None = None,
    progress: bool = True,
    data_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Protocol ``name`` over its splits/folds (``folds``: a subset, e.g. ``["1"]``): ``{"folds": {fold: scores},
    "test_top1_mean", "test_top1_std", "test_top5_mean", "test_top5_std", "classes", "data": {train, test}}``."""
    if name not in PROTOCOLS:
        raise ProtocolError(f"protocol {name!r} is unknown: expected one of {', '.join(PROTOCOLS)}")
    available = folds_of(name, records)
    chosen = list(folds) if folds else available
    unknown = [f for f in chosen if f not in available]
    if unknown:
        raise ProtocolError(f"{name}: no split/fold {', '.join(unknown)} in the manifest (it has {', '.join(available)})")
    classes = max(int(r["label_index"]) for r in records) + 1
    train_cfg, test_cfg = protocol_data(name, base, s.test_crop, data_overrides)
    results: dict[str, Any] = {}
    for fold in chosen:
        parts = {"train": [], "test": []}
        excluded = 0
        for r in records:
            kind = split_of(name, r, fold)
            if kind is None:
                excluded += 1
            else:
                parts[kind].append(r)
        if not parts["train"] or not parts["test"]:
            raise ProtocolError(f"{name} split {fold}: {len(parts['train'])} train and {len(parts['test'])} test videos; both are needed")
        overlap = {r["path"] for r in parts["train"]} & {r["path"] for r in parts["test"]}
        if overlap:
            raise ProtocolError(f"{name} split {fold}: {len(overlap)} files are in both train and test, e.g. {sorted(overlap)[0]}")
        scores = run_split(name, model, train_cfg, test_cfg, parts["train"], parts["test"], classes, s, device, progress, f"split {fold}")
        results[fold] = scores | {"excluded_videos": excluded}
    top1 = [r["test_top1"] for r in results.values()]
    top5 = [r["test_top5"] for r in results.values()]
    return {
        "protocol": name,
        "folds": results,
        "classes": classes,
        "test_top1_mean": statistics.fmean(top1),
        "test_top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
        "test_top5_mean": statistics.fmean(top5),
        "test_top5_std": statistics.stdev(top5) if len(top5) > 1 else 0.0,
        "settings": dataclasses.asdict(s),
        "data": {"train": dataclasses.asdict(train_cfg), "test": dataclasses.asdict(test_cfg)},
    }


def table(res: dict[str, Any]) -> str:
    """A markdown table of :func:`run_protocol`'s result: one row per split/fold, then the mean ± std."""
    rows = [f"| {res['protocol']} split/fold | train videos | test videos | test top-1 | test top-5 |", "|---|---:|---:|---:|---:|"]
    for fold, r in res["folds"].items():
        rows.append(f"| {fold} | {r['train_videos']} | {r['test_videos']} | {r['test_top1']:.1f} | {r['test_top5']:.1f} |")
    top1 = f"{res['test_top1_mean']:.1f} ± {res['test_top1_std']:.1f}"
    rows.append(f"| mean ± std | | | {top1} | {res['test_top5_mean']:.1f} ± {res['test_top5_std']:.1f} |")
    return "\n".join(rows)
