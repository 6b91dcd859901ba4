"""AVBERT pretraining: ``python -m avmt.train [--config FILE] [section.key=value ...]``.

With no arguments it pretrains the ``tiny`` preset on a synthetic audio-visual dataset (generated once into
``$AVMT_CACHE``, default ``~/.cache/avmt``) and prints a summary. Multi-GPU / multi-process::

    torchrun --nproc_per_node 8 -m avmt.train --preset paper data.manifest=prepared/manifest.jsonl

``train()`` reads top to bottom in one screen: data (:func:`build_data`), model + objectives, optimizer + schedule
(:mod:`avmt.optim`), resume (:func:`restore`), the loop (one optimizer step's micro-batches: :func:`accumulate`),
summary; rank 0's logging is :class:`_Log`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from avmt.checkpoint import (
    CheckpointError,
    checkpoint_config,
    find_checkpoint,
    load_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    save_checkpoint,
    step_of,
)
from avmt.config import Config, ConfigError, DataConfig, TrainConfig, add_config_arguments, config_from_args
from avmt.data.loader import LoaderError
from avmt.models import AVBert
from avmt.objectives import Pretraining
from avmt.optim import build_optimizer, build_scheduler, use_bf16
from avmt.watchdog import Watchdog


class TrainingError(RuntimeError):
    """The run cannot start or cannot go on; the message says why."""


SUMMARY_STEPS = 100  # the summary's window: 20 steps were too few pairs for a stable CPP (docs/experiments.md)


def cache_dir() -> Path:
    return Path(os.environ.get("AVMT_CACHE", Path.home() / ".cache" / "avmt"))


def synthetic_manifest(data: DataConfig, count: int = 120, progress: bool = True) -> Path:
    """Generate (once) and prepare the synthetic dataset that fits ``data``; returns its manifest path."""
    from avmt.data.prepare import prepare, scan_csv
    from avmt.data.synth import SYNTH_VERSION, SynthSpec, generate

    size = max(64, data.scale_range[1] + data.scale_range[1] % 2)  # no upscaling for the largest train scale
    spec = SynthSpec(
        seconds=data.window_seconds + 4, size=size, fps=max(8, int(math.ceil(data.fps))), sample_rate=data.sample_rate, num_classes=8
    )
    root = cache_dir() / f"synth{SYNTH_VERSION}-{spec.seconds:g}s-{spec.size}px-{spec.fps}fps-{spec.sample_rate}hz-{count}"
    manifest = root / "prepared" / "manifest.jsonl"
    if not manifest.exists():
        generate(root / "videos", count, spec, workers=os.cpu_count() or 1, progress=progress)
        prepare(
            scan_csv(root / "videos" / "labels.csv"),
            root / "prepared",
            sample_rate=data.sample_rate,
            min_seconds=data.clip_seconds,
            workers=os.cpu_count() or 1,
            progress=progress,
        )
    return manifest


def _setup_distributed(tc: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():  # a rank that hangs fails the others after train.dist_timeout_s
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=tc.dist_timeout_s))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _check_writable(run_dir: Path) -> None:
    """Fail before any work if ``train.run_dir`` cannot be created or written (without creating it: a run that
    fails on its data leaves nothing behind)."""
    existing = run_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TrainingError(f"train.run_dir={str(run_dir)!r} is not writable: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingError(f"train.run_dir={str(run_dir)!r} is not writable: no write permission on {existing}")


@dataclass
class RunState:
    """Where a run is: what a checkpoint stores besides the weights, optimizer and RNG states."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    nonfinite_total: int = 0


def build_data(cfg: Config, device: torch.device, rank: int, world: int, progress: bool) -> Any:
    """This process's training loader (``data.loader``); fails before any work if the data or the loader cannot be
    had. Without ``data.manifest``, the synthetic dataset that fits ``cfg.data`` (rank 0 generates it once)."""
    from avmt.data.loader import build_loader, select_loader

    tc = cfg.train
    try:
        select_loader(cfg.data.loader, device)
    except LoaderError as e:
        raise TrainingError(str(e)) from None
    if cfg.data.manifest:
        manifest = Path(cfg.data.manifest)
        if not manifest.is_file():
            raise TrainingError(f"data.manifest={cfg.data.manifest!r} does not exist; run python -m avmt.data.prepare first")
    else:
        if rank == 0:  # rank 0 generates it once; the others wait, then only look it up
            manifest = synthetic_manifest(cfg.data, progress=progress)
        if dist.is_initialized():
            dist.barrier()
        if rank != 0:
            manifest = synthetic_manifest(cfg.data, progress=False)
    try:  # the CPU (PyAV) loader, or DALI; both resume mid-epoch with iterate(k)
        loader = build_loader(
            manifest, cfg.data, tc.batch_size, train=True, device=device, seed=tc.seed, shard_id=rank, num_shards=world, drop_last=True
        )
    except LoaderError as e:
        raise TrainingError(str(e)) from None
    if len(loader) == 0:
        raise TrainingError(f"{manifest} holds fewer videos than one batch of {tc.batch_size} per process ({world} process(es))")
    if len(loader) < tc.grad_accum:  # an epoch would end before the first optimizer step, forever
        raise TrainingError(
            f"{manifest} gives {len(loader)} batch(es) of {tc.batch_size} per process and epoch ({world} process(es)), fewer than "
            f"train.grad_accum={tc.grad_accum}: no optimizer step could ever be made; lower train.batch_size or train.grad_accum"
        )
    return loader


# settings a resumed run may change: they alter neither the computation nor the data (samples are seeded per index,
# so the worker count does not change them)
RESUMABLE_CHANGES = frozenset(
    {
        "train.max_steps",
        "train.log_every",
        "train.save_every",
        "train.max_nonfinite",
        "train.dist_timeout_s",
        "train.watchdog_s",
        "data.num_workers",
        "data.batch_timeout_s",
        "train.init_from",  # read only when a run starts
    }
)


def config_changes(saved: dict[str, Any], cfg: Config) -> list[str]:
    """``section.key: old -> new`` for every setting of ``cfg`` that differs from the checkpoint's config."""
    now = cfg.to_dict()
    return [
        f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
        for section in ("model", "data", "objective", "train")
        for key, value in now[section].items()
        if saved.get(section, {}).get(key) != value
    ]


def restore(
    ckpt: Path,
    cfg: Config,
    pre: Pretraining,
    opt: Any,
    sched: Any,
    gen: torch.Generator,
    rank: int,
    device: torch.device,
    allow_config_change: bool = False,
) -> RunState:
    """Load ``ckpt`` (verified, as :func:`resumable_checkpoint` returns it) into the model, optimizer, schedule and
    RNGs; returns where the run was. A config that differs
    from the checkpoint's beyond :data:`RESUMABLE_CHANGES` is refused, unless ``allow_config_change`` (then each
    change is printed); a different model config is always refused."""
    try:
        state = load_checkpoint(ckpt, pre, map_location=device, verified=True)  # resumable_checkpoint verified it
    except CheckpointError as e:  # a file removed between the scan and the load
        raise TrainingError(str(e)) from None
    if state["config"]["model"] != cfg.to_dict()["model"]:
        raise TrainingError(f"{ckpt} was trained with another model config; use a new train.run_dir or resume=false")
    started_from = state["config"].get("train", {}).get("init_from", "")
    if cfg.train.init_from and cfg.train.init_from != started_from:  # init_from is read only when a run starts
        unused = (
            f"train.init_from={cfg.train.init_from} is not used: {ckpt} already holds this run's weights (saved with "
            f"train.init_from={started_from!r})"
        )
        if not allow_config_change:
            raise TrainingError(f"{unused}; pass --no-resume to start over from it, use another train.run_dir, or --allow-config-change")
        if rank == 0:
            print(f"avmt.train: {unused}", file=sys.stderr)
    changes = [c for c in config_changes(state["config"], cfg) if c.split(":")[0] not in RESUMABLE_CHANGES]
    if changes and not allow_config_change:
        raise TrainingError(
            f"{ckpt} was trained with other settings ({'; '.join(changes)}); resuming would silently mix them. Use a new "
            "train.run_dir, or pass --allow-config-change to resume with the new ones"
        )
    for change in changes if rank == 0 else ():
        print(f"avmt.train: resuming with a changed setting, {change}", file=sys.stderr)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    gen.set_state(state["objective_rng"][rank] if rank < len(state["objective_rng"]) else state["objective_rng"][0])
    return RunState(state["step"], state["epoch"], state["batch_in_epoch"], state["nonfinite_total"])


# What a collective that outwaited its timeout raises: "... timed out ..." (NCCL, gloo's waits), or, when gloo's timeout
# closes the connection first, "Application timeout caused pair closure"
COLLECTIVE_TIMEOUT_MESSAGES = ("timed out", "timeout caused pair closure")


def is_collective_timeout(e: BaseException) -> bool:
    """Whether ``e`` (from a ``torch.distributed`` collective) says that it waited longer than the process group's
    timeout."""
    msg = str(e).lower()
    return any(m in msg for m in COLLECTIVE_TIMEOUT_MESSAGES)


def accumulate(
    net: torch.nn.Module, batches: Any, tc: TrainConfig, device: torch.device, bf16: bool, gen: torch.Generator
) -> tuple[str, int, dict[str, Tensor], float]:
    """Forward + backward of the ``train.grad_accum`` micro-batches of one optimizer step (:func:`_accumulate`); under
    ``torch.distributed`` a collective that times out (a hung or dead rank) becomes a :class:`TrainingError`."""
    try:
        return _accumulate(net, batches, tc, device, bf16, gen)
    except RuntimeError as e:
        if not (dist.is_initialized() and is_collective_timeout(e)):
            raise
        raise TrainingError(
            f"rank {dist.get_rank()}: a collective waited longer than train.dist_timeout_s={tc.dist_timeout_s:g} s "
            f"({str(e).strip().splitlines()[-1][-200:]}): another rank is hung or dead"
        ) from None


def _accumulate(
    net: torch.nn.Module, batches: Any, tc: TrainConfig, device: torch.device, bf16: bool, gen: torch.Generator
) -> tuple[str, int, dict[str, Tensor], float]:
    """Forward + backward of the ``train.grad_accum`` micro-batches of one optimizer step.

    Returns ``(outcome, micro-batches consumed, mean metrics, seconds waiting for data)``; outcome ``ok``, ``epoch_end``
    (the epoch ran out: a partial step is dropped) or ``nonfinite`` (a loss was NaN/inf on some rank: every rank skips).
    The metrics stay on the device (float64 0-d tensors; :func:`read_metrics` reads them). Under DDP the gradients are
    all-reduced once, in the last micro-batch's backward (the others run under ``no_sync``).
    """
    metrics: dict[str, Tensor] = {}
    used, wait = 0, 0.0
    for n in range(tc.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches, None)
        wait += time.perf_counter() - t0
        if batch is None:
            return "epoch_end", used, metrics, wait
        used += 1
        video, audio = batch["video"].to(device, non_blocking=True), batch["audio"].to(device, non_blocking=True)
        # DDP: all but the last micro-batch under no_sync, forward included (DDP decides in the forward whether the
        # backward all-reduces)
        last = n == tc.grad_accum - 1
        with contextlib.nullcontext() if last or not isinstance(net, DistributedDataParallel) else net.no_sync():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = net(video, audio, generator=gen)
            flag = torch.isfinite(out.loss.detach()).float().reshape(1)
            if dist.is_initialized():  # every rank skips together, or DDP's backward would hang
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() < 1:  # host sync 1 (per micro-batch): whether the step is skipped decides what runs next
                return "nonfinite", used, metrics, wait
            (out.loss / tc.grad_accum).backward()
        for k, v in out.metrics.items():  # float64 sums, as the host summed them before: the same numbers, read later
            metrics[k] = metrics.get(k, 0.0) + v.detach().double() / tc.grad_accum
    return "ok", used, metrics, wait


@dataclass
class StepOutcome:
    """What :func:`training_step` did: ``outcome`` (``ok``: the weights moved; ``epoch_end``, ``nonfinite``: they did
    not), the micro-batches consumed, the mean metrics (device tensors), the seconds spent waiting for data and the
    global gradient norm (None when no step was taken)."""

    outcome: str
    used: int
    metrics: dict[str, Tensor]
    wait: float
    grad_norm: float | None


def training_step(
    net: torch.nn.Module,
    pre: torch.nn.Module,
    batches: Any,
    opt: torch.optim.Optimizer,
    sched: Any,
    tc: TrainConfig,
    device: torch.device,
    bf16: bool,
    gen: torch.Generator,
) -> StepOutcome:
    """One optimizer step as ``python -m avmt.train`` takes it: the ``train.grad_accum`` micro-batches from
    ``batches`` (forward, non-finite check, backward; DDP all-reduces once), clipping (a NaN/inf gradient skips the
    step), the optimizer and the schedule. ``net`` is ``pre`` or its DDP wrapper. On any outcome but ``ok`` the
    gradients are dropped and nothing else changes. Host syncs: one per micro-batch (the non-finite check) and one per
    step (the gradient norm); the metrics are read later (:func:`read_metrics`)."""
    outcome, used, metrics, wait = accumulate(net, batches, tc, device, bf16, gen)
    grad_norm = clip_gradients(pre, tc) if outcome == "ok" else None  # host sync 2 (per step): the norm decides the skip
    if grad_norm is None:  # no step: the epoch ended, or a loss or a gradient was NaN/inf
        opt.zero_grad(set_to_none=True)
        return StepOutcome("nonfinite" if outcome == "ok" else outcome, used, metrics, wait, None)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return StepOutcome("ok", used, metrics, wait, grad_norm)


def read_metrics(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with their device-tensor values as Python floats, read in one host sync for all of them (the
    training loop calls it once per ``train.log_every`` steps)."""
    keys = [(i, k) for i, r in enumerate(records) for k, v in r.items() if isinstance(v, Tensor)]
    if not keys:
        return records
    values = torch.stack([records[i][k].reshape(()).double() for i, k in keys]).tolist()  # host sync 3 (per log interval)
    out = [dict(r) for r in records]
    for (i, k), v in zip(keys, values):
        out[i][k] = v
    return out


def initialise_from(model: AVBert, path: str | Path, cfg: Config, is_main: bool) -> None:
    """Load the model weights of checkpoint ``path`` (``train.init_from``: a run or checkpoint folder, avmt's own or
    converted) into ``model``; the pretraining heads, optimizer and schedule start fresh. The shapes must match
    (:class:`TrainingError` naming the tensors otherwise); model settings that differ without changing a shape
    (dropout, eps, kernels) are printed, since the run uses its own."""
    try:
        folder, verified = resolve_checkpoint(path)
        saved = checkpoint_config(load_checkpoint(folder, verified=verified), folder).to_dict()["model"]  # validated
        load_model_weights(folder, model)
    except CheckpointError as e:
        raise TrainingError(f"train.init_from: {e}") from None
    differ = [f"model.{k}: {saved[k]!r} there, {v!r} here" for k, v in cfg.to_dict()["model"].items() if k in saved and saved[k] != v]
    if is_main:
        print(f"initialised the model from {folder}" + (f" (settings differ: {'; '.join(differ)})" if differ else ""), file=sys.stderr)


def _set_aside_checkpoints(run_dir: Path) -> None:
    """A run started over (``--no-resume``) in a folder that holds an earlier run's checkpoints: move them to
    ``checkpoints.replaced-<UTC time>`` (kept, and printed), so that a later resume cannot pick the earlier run's
    higher steps."""
    root = run_dir / "checkpoints"
    if not root.is_dir() or not any(step_of(p) is not None for p in root.iterdir()):
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = run_dir / f"checkpoints.replaced-{stamp}", 1
    while aside.exists():  # started over twice within a second
        aside, n = run_dir / f"checkpoints.replaced-{stamp}-{n}", n + 1
    try:
        os.replace(root, aside)
    except OSError as e:
        raise TrainingError(f"--no-resume: cannot move the earlier run's checkpoints out of the way ({root}: {e.strerror or e})") from None
    print(f"avmt.train: --no-resume: the earlier run's checkpoints are now in {aside}", file=sys.stderr)


def resumable_checkpoint(run_dir: Path, is_main: bool) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies (None for a new run); each newer one that does not is
    printed with the reason, and a run whose checkpoints all fail to verify stops instead of restarting."""
    found = find_checkpoint(run_dir)
    for path, why in found.skipped if is_main else ():
        print(f"avmt.train: skipped checkpoint {path}: {why}", file=sys.stderr)
    if found.path is None and found.skipped:
        raise TrainingError(f"no checkpoint in {run_dir / 'checkpoints'} verifies (see above); pass --no-resume to start over")
    return found.path


def clip_gradients(pre: torch.nn.Module, tc: TrainConfig) -> float | None:
    """Clip to ``train.grad_clip`` (0: measure only); the global norm, or None if a gradient is NaN/inf (a finite loss
    can still have them, and AdamW would spread them into every weight)."""
    norm = float(torch.nn.utils.clip_grad_norm_(pre.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")))
    return norm if math.isfinite(norm) else None


def count_nonfinite(run: RunState, streak: int, tc: TrainConfig, save: Any) -> int:
    """Count a skipped non-finite step; after ``train.max_nonfinite`` in a row, save (the weights are those from
    before the streak: no skipped step changed them) and stop. Returns the streak."""
    run.nonfinite_total += 1
    if streak >= tc.max_nonfinite:
        path = save()
        raise TrainingError(
            f"{streak} non-finite losses or gradients in a row at step {run.step}; stopped. The checkpoint {path} holds "
            "the weights from before them; lower train.lr or check the data"
        )
    return streak


def train(
    cfg: Config, resume: bool = True, progress: bool = True, stop_at: int | None = None, allow_config_change: bool = False
) -> dict[str, Any]:
    """Run (or continue) the pretraining described by ``cfg``; returns the summary dict (rank 0's view).

    ``stop_at``: save and return after that step, as if the job were interrupted (the schedule still spans
    ``train.max_steps``; a later call resumes from there). ``allow_config_change``: see :func:`restore`.
    """
    if not cfg.train.deterministic:
        return _train(cfg, resume, progress, stop_at, allow_config_change)
    # deterministic kernels for this run (an op without one raises, naming itself); the setting is process-wide,
    # so it is put back afterwards
    previous = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, resume, progress, stop_at, allow_config_change)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(cfg: Config, resume: bool, progress: bool, stop_at: int | None, allow_config_change: bool) -> dict[str, Any]:
    rank, world, device = _setup_distributed(cfg.train)
    if rank == 0:
        _check_writable(Path(cfg.train.run_dir))
    tc, run_dir, is_main = cfg.train, Path(cfg.train.run_dir), rank == 0
    loader = build_data(cfg, device, rank, world, progress)

    torch.manual_seed(tc.seed)
    model = AVBert(cfg.model).set_memory_options(tc)
    ckpt = resumable_checkpoint(run_dir, is_main) if resume else None
    if not resume and is_main:
        _set_aside_checkpoints(run_dir)
    if ckpt is None and tc.init_from:  # a new run from given weights (a resumed run has its own)
        initialise_from(model, tc.init_from, cfg, is_main)
    pre = Pretraining(model, cfg.objective).to(device)
    if world > 1:  # gradients all-reduced in place in DDP's buckets (no copy), once per optimizer step
        # every parameter gets a gradient in every step, whatever the config (the objectives see to it: tested over the
        # fusion modes, sharing schemes, CNN memory options and loss weights), so DDP need not search the graph for unused ones
        net = DistributedDataParallel(pre, find_unused_parameters=False, gradient_as_bucket_view=True)
    else:
        net = pre
    opt, bf16 = build_optimizer(pre.parameters(), tc), use_bf16(tc, device)
    sched = build_scheduler(opt, tc)
    gen = torch.Generator().manual_seed(tc.seed * 1000 + rank)  # masks, swaps, negative-sampling seeds
    run = restore(ckpt, cfg, pre, opt, sched, gen, rank, device, allow_config_change) if ckpt is not None else RunState()
    if ckpt is not None and is_main:
        print(f"resumed from {ckpt} at step {run.step}", file=sys.stderr)

    def save() -> Path:
        rngs = [gen.get_state()]
        if dist.is_initialized():  # every rank's generator, so each continues its own stream
            rngs = [torch.empty_like(rngs[0]) for _ in range(world)]
            dist.all_gather(rngs, gen.get_state())
        if not is_main:
            return run_dir
        extra = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **dataclasses.asdict(run)}
        extra |= {"torch_rng": torch.get_rng_state(), "objective_rng": rngs, "config": cfg.to_dict()}
        try:
            return save_checkpoint(run_dir, run.step, pre, extra)
        except CheckpointError as e:
            raise TrainingError(f"{e}; the previous checkpoints are intact") from None

    log = _Log(run_dir, cfg, run.step, progress) if is_main else None
    pre.train()
    nonfinite_run, t_data, t_total, tick = 0, 0.0, 0.0, time.perf_counter()
    pending: list[dict[str, Any]] = []  # rank 0's step records whose metrics are still on the device

    def flush() -> None:  # the pending records into the log, their metrics read in one host sync
        for r in read_metrics(pending):
            log.step(r, tc, world, t_data, t_total)
        pending.clear()

    end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
    stacks = run_dir / f"hang-stacks-rank{rank}.txt"
    with Watchdog(tc.watchdog_s, stacks, "no training step completed (train.watchdog_s)", prog="avmt.train") as dog:
        while run.step < end:
            loader.set_epoch(run.epoch)
            batches = loader.iterate(run.batch_in_epoch)
            while run.step < end:
                try:
                    step = training_step(net, pre, batches, opt, sched, tc, device, bf16, gen)
                except LoaderError as e:  # the data gave out mid-run: keep what was trained, then say why
                    opt.zero_grad(set_to_none=True)
                    flush()
                    save()
                    raise TrainingError(f"{e} (at step {run.step}; the checkpoint of that step is saved)") from None
                dog.beat()
                run.batch_in_epoch += step.used
                t_data += step.wait
                if step.outcome == "epoch_end":
                    run.epoch, run.batch_in_epoch = run.epoch + 1, 0
                    break
                if step.outcome == "nonfinite":
                    flush()  # a run stopped by a streak keeps every step it logged
                    nonfinite_run = count_nonfinite(run, nonfinite_run + 1, tc, save)
                    continue
                nonfinite_run = 0
                run.step += 1
                now = time.perf_counter()
                t_total, tick = t_total + now - tick, now
                if log is not None:
                    record = {"step": run.step, "lr": sched.get_last_lr()[0], "grad_norm": step.grad_norm, **step.metrics}
                    record |= {"nonfinite_skipped": run.nonfinite_total, "data_failures": loader.failures, "epoch": run.epoch}
                    pending.append(record)
                    if run.step % tc.log_every == 0 or run.step == end or run.step % tc.save_every == 0:
                        flush()
                if run.step % tc.save_every == 0:
                    save()
        path = save()
        if dist.is_initialized():  # the others wait for rank 0's last save before anyone tears the process group down
            dist.barrier()
    loader.close()  # DALI: free its prefetching threads now, not at garbage collection (DALILoader.close)
    summary: dict[str, Any] = {"steps": run.step, "checkpoint": str(path), "nonfinite_skipped": run.nonfinite_total}
    summary["data_failures"] = loader.failures  # samples replaced by another after failing to load (this process, this run)
    if log is not None:
        summary |= log.close() | {"seconds": t_total, "data_wait_share": t_data / max(t_total, 1e-9)}
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps 1..``step`` (the resumed one), once each, so that steps replayed after a resume are
    not logged twice; a line torn by a kill or a full disk is dropped rather than glued to the next record."""
    if not path.exists():
        return
    kept: dict[int, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept[rec["step"]] = line
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept[s] + "\n" for s in sorted(kept)))
    os.replace(tmp, path)


class _Log:
    """Rank 0's record of a run: ``metrics.jsonl`` (every step), TensorBoard and the progress bar (every
    ``train.log_every`` steps), and the summary's means over the last ``SUMMARY_STEPS`` steps."""

    def __init__(self, run_dir: Path, cfg: Config, step: int, progress: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        metrics = run_dir / "metrics.jsonl"
        _truncate_metrics(metrics, step)
        self.file = open(metrics, "a")
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not progress, dynamic_ncols=True, desc="pretrain")
        self.history: list[dict[str, Any]] = []

    def step(self, record: dict[str, Any], tc: TrainConfig, world: int, t_data: float, t_total: float) -> None:
        step = record["step"]
        self.history.append(record)
        try:
            self.file.write(json.dumps(record) + "\n")
            if step % tc.log_every == 0 or step == tc.max_steps:
                self.file.flush()
        except OSError as e:  # a full disk: the torn line is dropped on resume (_truncate_metrics)
            raise TrainingError(f"cannot write {self.file.name}: {e.strerror or e}") from None
        if step % tc.log_every == 0 or step == tc.max_steps:
            for k, v in record.items():
                if k != "step":
                    self.writer.add_scalar(k, v, step)
            seqs = tc.batch_size * tc.grad_accum * world
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                mep=f"{record.get('mep_multimodal_acc', record.get('mep_visual_acc', 0)):.2f}",
                cpp=f"{record['cpp_acc']:.2f}",
                seq_s=f"{seqs * step / max(t_total, 1e-9):.1f}",
                data=f"{t_data / max(t_total, 1e-9):.0%}",
            )
        self.bar.update(1)

    def close(self) -> dict[str, float]:
        self.bar.close()
        self.writer.close()
        self.file.close()
        last = self.history[-SUMMARY_STEPS:]
        return {
            key: sum(r[key] for r in last if key in r) / max(1, sum(key in r for r in last))
            for key in sorted({k for r in last for k in r})
            if key.startswith(("mep_", "cpp_", "loss"))
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avmt.train", description=__doc__.splitlines()[0])
    add_config_arguments(parser, default_preset="tiny")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if train.run_dir has a checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected failure too")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP", help="save and exit after STEP (resume later)")
    parser.add_argument(
        "--allow-config-change", action="store_true", help="resume although train.*/data.*/objective.* settings changed (each is printed)"
    )
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, default_preset="tiny")
    except ConfigError as e:
        parser.error(str(e))
    try:
        summary = train(
            cfg, resume=not args.no_resume, progress=not args.quiet, stop_at=args.stop_at, allow_config_change=args.allow_config_change
        )
    except TrainingError as e:
        if args.debug:
            raise
        print(f"avmt.train: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print("summary: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
