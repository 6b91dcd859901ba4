"""Peak memory of a whole training step: live bytes over time, from the allocations themselves.

``python -m avmt.bench peak --preset paper --batch 4 --clips 15 --precision bf16 --schemes none,lowrank [key=value ...] --json``

:func:`step_peak` runs one training step (forward, backward with any recompute the config asks for, the AdamW step;
the whole objective or the model part, see ``scope``) under torch's ``MemTracker``
(``torch.distributed._tools.mem_tracker``), a dispatch-level tracker that follows every tensor storage as it is
created and freed. Under ``FakeTensorMode`` (the default) nothing is allocated, so the paper preset's step is
estimated on a CPU in seconds; on real tensors it measures the same way, and on a GPU
``torch.cuda.max_memory_allocated`` gives the allocator's own peak to compare with. Unlike the saved-tensor sum of
:mod:`avmt.bench.memory`, this is the peak: it includes temporaries, the recompute of checkpointed regions and the
optimizer step's own buffers, but not the allocator's rounding and fragmentation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
from typing import Any

import torch

from avmt.config import Config

CATEGORIES = ("PARAM", "BUFFER", "GRAD", "ACT", "TEMP", "OPT", "OTH")


@dataclasses.dataclass
class StepPeak:
    """``peak_bytes``: the largest live total during the step; ``parts``: that moment's bytes per category
    (parameters, buffers, gradients, activations, temporaries, optimizer state, other); ``peak_at``: the innermost
    module whose own peak is the step's peak, with the phase (forward, backward), or the optimizer step."""

    peak_bytes: int
    parts: dict[str, int]
    peak_at: str
    mode: str
    scope: str
    device: str
    allocator_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated, real mode on a GPU only

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCOPES = ("model", "pretraining")


def _model_step(cfg: Config, batch: int, device: torch.device) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer]:
    """The model part of a training step: both CNNs (with the config's memory options), the Transformers, a loss on
    every output, backward, AdamW step. Unlike the full objective it has no data-dependent indexing, so it runs on
    fake tensors; the MEP/CPP heads it leaves out are small next to the CNNs."""
    from avmt.bench import random_clips
    from avmt.models import AVBert
    from avmt.optim import build_optimizer, use_bf16

    torch.manual_seed(0)
    tc = cfg.train
    with device:
        model = AVBert(cfg.model).set_memory_options(tc)
    model.train()
    opt = build_optimizer(model.parameters(), tc)
    video, audio = random_clips(cfg.data, batch, device)
    bf16 = use_bf16(tc, device)

    root = _ModelLoss(model)  # one root module call per step (the tracker takes a second root call for a new step)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = root(video, audio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, root, opt


class _ModelLoss(torch.nn.Module):
    """``forward(video, audio)``: the sum of every Transformer output of the model, as one module call."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        _, v_tok = self.model.embed_visual(video)
        _, a_tok = self.model.embed_audio(audio)
        enc = self.model.encode(v_tok, a_tok)
        return sum(o.float().sum() for o in (enc.visual, enc.audio, enc.multimodal) if o is not None)


def _tracker() -> Any:
    """A ``MemTracker`` whose per-op peak update visits only the modules that are running.

    Torch's own update walks every module seen so far on every dispatched op (a weak-key dictionary of a few hundred
    entries), which made the paper preset's T=30 estimate take minutes; the result is the same, since only modules
    named in ``_mod_tracker.parents`` are updated. If torch renames the private attributes this relies on, the
    tracker falls back to torch's own update (slower, same numbers)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class _ActiveModulesTracker(MemTracker):
        _by_fqn: dict[str, Any] = {}
        _seen = -1

        def _update_peak_stats(self, peak_state: Any) -> None:
            try:
                tracking, parents, curr = self.memory_tracking, self._mod_tracker.parents, self._curr_mem_snap
                peak_mem, peak_snap = self._peak_mem, self._peak_mem_snap
            except AttributeError:
                return super()._update_peak_stats(peak_state)
            if len(tracking) != self._seen:  # a module entered for the first time
                self._by_fqn = {s.mod_fqn: s for s in tracking.values()}
                self._seen = len(tracking)
            for fqn in parents:
                stats = self._by_fqn.get(fqn)
                if stats is None or peak_state not in stats.snapshots:
                    continue
                for dev, snap in curr.items():
                    if stats.local_peak.get(dev, 0) < snap["Total"]:
                        stats.local_peak[dev] = snap["Total"]
                        stats.snapshots[peak_state][-1][dev] = copy.deepcopy(snap)
            for dev, snap in curr.items():
                if peak_mem.get(dev, 0) < snap["Total"]:
                    peak_mem[dev] = snap["Total"]
                    peak_snap[dev] = copy.deepcopy(snap)

    return _ActiveModulesTracker()


def step_peak(
    cfg: Config, batch: int, clips: int | None = None, mode: str = "fake", device: str | torch.device = "cpu", scope: str = "model"
) -> StepPeak:
    """Peak memory of one training step of ``cfg`` (``clips`` overrides ``data.num_clips``). ``mode``: ``fake``
    (FakeTensorMode on the CPU, no memory used) or ``real`` (real tensors on ``device``). ``scope``: ``model``
    (CNNs + Transformers + AdamW, :func:`_model_step`; runs in both modes) or ``pretraining`` (the whole
    objective, :func:`avmt.bench.training_step`; real mode only: masking and sampling index by data)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from avmt.bench import training_step

    if mode not in ("fake", "real") or scope not in SCOPES:
        raise ValueError(f"mode={mode!r}, scope={scope!r}: expected mode 'fake' or 'real', scope in {SCOPES}")
    if mode == "fake" and scope == "pretraining":
        raise ValueError("scope='pretraining' needs mode='real': masking and negative sampling index by data")
    device = torch.device(device)
    if mode == "fake" and device.type != "cpu":
        raise ValueError("mode='fake' estimates on the CPU; use mode='real' to measure a GPU")
    if clips is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_clips=clips))
    if mode == "fake" and cfg.model.kernel == "triton":
        raise ValueError("model.kernel='triton' cannot run on fake tensors")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with FakeTensorMode() if mode == "fake" else contextlib.nullcontext():
        if scope == "pretraining":
            ts = training_step(cfg, batch, device)
            step, module, opt = ts.step, ts.pretraining, ts.optimizer
        else:
            step, module, opt = _model_step(cfg, batch, device)
        step()  # a first step allocates the optimizer state: the tracked second step is the steady state
        tracker = _tracker()
        tracker.track_external(module, opt)
        with tracker:
            step()
        snap = tracker.get_tracker_snapshot("peak")
        key = next(iter(snap))  # the one device of the step
        parts = {c: int(v) for k, v in snap[key].items() if (c := str(k).rsplit(".", 1)[-1]) in CATEGORIES}
        peak = int(snap[key]["Total"])
        where = _peak_location(tracker, key, peak)
    allocator = None
    if device.type == "cuda" and mode == "real":
        torch.cuda.synchronize(device)
        allocator = torch.cuda.max_memory_allocated(device)
    return StepPeak(peak_bytes=peak, parts=parts, peak_at=where, mode=mode, scope=scope, device=str(device), allocator_peak_bytes=allocator)


def _peak_location(tracker: Any, device: Any, peak: int) -> str:
    """The deepest module whose local peak is the global one, and in which phase; else the optimizer step."""
    best = ""
    for stats in tracker.memory_tracking.values():
        if stats.local_peak.get(device, -1) >= peak and len(stats.mod_fqn) > len(best):
            best = stats.mod_fqn
            phase = next(
                (
                    str(state).rsplit(".", 1)[-1].lower()
                    for state, snaps in stats.snapshots.items()
                    if any(s.get(device, {}).get("Total", -1) >= peak for s in snaps)
                ),
                "",
            )
            best_phase = phase
    if not best:
        return "optimizer step (outside every module)"
    return f"{best} ({best_phase})" if best_phase else best
