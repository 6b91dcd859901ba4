"""Bytes of one training step, per part of the model: weights, gradients, AdamW state and activations.

:func:`measure_step` builds a model, runs one training step (forward, backward, ``optimizer.step()``) and
measures every component from the tensors themselves:

- **weights / gradients / optimizer**: the storages of the parameters, of their ``.grad`` and of the
  optimizer's per-parameter state tensors (AdamW: ``exp_avg``, ``exp_avg_sq``, with AMSGrad
  ``max_exp_avg_sq``; the scalar ``step`` counters are reported apart), each storage counted once, per part
  of the model (``transformer`` = the Transformer layers as the paper counts them, ``cnn``, ``projection``,
  ``embedding``, ``heads`` = the MEP/CPP heads of :class:`~avmt.objectives.Pretraining`);
- **activations**: every tensor autograd saves for backward during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once (views and tensors saved by
  several ops share one), parameters and the input batch excluded; split by phase (``cnn`` = the per-clip
  CNNs + input projections, ``transformer`` = ``model.encode``, ``heads`` = the objectives). That is the
  memory the forward leaves alive for backward, i.e. the activation part of the step's peak. Saved casts of
  parameters (under bf16 autocast, the bf16 copy of every weight a matmul or convolution keeps for backward)
  are reported apart as ``weight_copies``: they scale with the parameters, not with the batch;
- **peak** (CUDA only): ``torch.cuda.max_memory_allocated`` over a second, steady-state step (weights, the
  optimizer state from step 1, inputs, activations, gradients and temporaries: everything the allocator held).

Three modes: ``real`` computes on real tensors (CPU or CUDA); ``fake`` runs the very same code under
``FakeTensorMode``, so shapes, dtypes and storages are propagated without memory or compute: the paper preset
with its CNNs is "measured" in seconds. ``fake`` gives the same bytes as ``real`` (tested at small sizes).

Three scopes: ``transformer`` (``model.encode`` on random clip tokens: the Transformer stack alone, its loss
the sum of the outputs), ``model`` (CNNs + projections + Transformers on random clips, same surrogate loss)
and ``pretraining`` (the real training step: :class:`~avmt.objectives.Pretraining` with MEP + CPP; ``real``
only, as its masking and sampling are data-dependent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from avmt.bench import random_clips
from avmt.config import Config
from avmt.models import AVBert
from avmt.objectives import Pretraining
from avmt.optim import build_optimizer
from avmt.params import PARTS as MODEL_PARTS
from avmt.params import part_parameters

PARTS = (*MODEL_PARTS, "heads")
SCOPES = ("transformer", "model", "pretraining")
MODES = ("real", "fake")
PRECISIONS = ("fp32", "bf16")


def _storage_key(t: Tensor) -> tuple[int, Any]:
    """(identity, storage) of ``t``'s storage; the identity is the C++ StorageImpl, shared by all views."""
    s = t.untyped_storage()
    return s._cdata, s


# autograd nodes that only cast or re-view their single input: a saved tensor reached from a parameter through
# these alone is a copy of that parameter (under autocast: its bf16 copy), not an activation
_COPY_NODES = frozenset(
    {
        "ToCopyBackward0",
        "TBackward0",
        "TransposeBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "SelectBackward0",
        "SliceBackward0",
        "ExpandBackward0",
        "PermuteBackward0",
        "AliasBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "ReshapeAliasBackward0",
        "CloneBackward0",
        "_ToCopyBackward0",
    }
)


def _is_parameter_copy(t: Tensor) -> bool:
    node = t.grad_fn
    for _ in range(8):
        if node is None:
            return False
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            return isinstance(node.variable, nn.Parameter)
        if node.name() not in _COPY_NODES:
            return False
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return False


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward, each storage once, attributed to the current ``phase``.

    Storages registered with :meth:`exclude` (parameters, inputs) are never counted. A saved tensor that is only a
    cast/view of a parameter (the bf16 weight copies autocast makes) goes to :attr:`weight_copies`, not to a phase.
    Use as ``with counter: ...forward...``; set ``counter.phase`` between the parts of the forward.
    """

    def __init__(self) -> None:
        self.phase = "other"
        self.by_phase: dict[str, int] = {}
        self.weight_copies = 0
        self.saved_calls = 0
        self._seen: dict[int, Any] = {}  # holds the storages, so a StorageImpl address is never reused while counting
        self._excluded: dict[int, Any] = {}
        self._hooks: contextlib.AbstractContextManager | None = None

    def exclude(self, tensors: Iterator[Tensor] | list[Tensor]) -> None:
        for t in tensors:
            key, s = _storage_key(t)
            self._excluded[key] = s

    def _pack(self, t: Tensor) -> Tensor:
        self.saved_calls += 1
        key, s = _storage_key(t)
        if key not in self._excluded and key not in self._seen:
            self._seen[key] = s
            if _is_parameter_copy(t):
                self.weight_copies += s.nbytes()
            else:
                self.by_phase[self.phase] = self.by_phase.get(self.phase, 0) + s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())

    def __enter__(self) -> SavedTensorCounter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._seen.clear()
        self._excluded.clear()


def _unique_bytes(tensors: list[Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        key, s = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += s.nbytes()
    return total


@dataclass
class StepMemory:
    """The result of :func:`measure_step` (bytes unless named otherwise); :meth:`to_dict` for JSON."""

    scope: str
    mode: str
    device: str
    precision: str
    batch: int
    clips: int
    sharing: str
    dim: int
    layers: int
    heads: int
    ffn_dim: int
    rank: int
    params: dict[str, int]  # trainable parameters per part in scope (avmt.params.count_parts; heads: the objectives')
    weights: dict[str, int]
    grads: dict[str, int]
    optimizer: dict[str, int]  # per-parameter AdamW buffers
    optimizer_steps: int  # the scalar `step` tensors of the optimizer state
    optimizer_buffers: int  # state tensors per parameter (3 with AMSGrad)
    activations: dict[str, int]  # saved for backward, per phase of the forward (weight copies excluded)
    weight_copies: int  # saved for backward: casts of parameters (bf16 autocast's weight copies; 0 in fp32)
    inputs: int  # the batch (clips, or clip tokens for the transformer scope)
    peak_allocated: int | None = None  # CUDA: allocator peak (all tensors) during a second, steady-state step
    seconds: float = 0.0  # wall time of the measurement (fake mode: shape propagation only)

    def train_state(self, part: str) -> int:
        """weights + gradients + optimizer buffers of one part."""
        return self.weights.get(part, 0) + self.grads.get(part, 0) + self.optimizer.get(part, 0)

    @property
    def activation_bytes(self) -> int:
        return sum(self.activations.values())

    @property
    def estimated_peak(self) -> int:
        """weights + gradients + optimizer state (all in scope) + activations + weight copies + inputs: the step's peak if they were
        all alive at once, without temporaries (workspace, intermediate results not saved for backward). An
        estimate: in a real step the gradients grow while the activations are freed. On a GPU,
        :attr:`peak_allocated` is the measured peak."""
        return (
            sum(self.weights.values())
            + sum(self.grads.values())
            + sum(self.optimizer.values())
            + self.optimizer_steps
            + self.activation_bytes
            + self.weight_copies
            + self.inputs
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["activation_bytes"] = self.activation_bytes
        d["estimated_peak"] = self.estimated_peak
        d["transformer_train_state"] = self.train_state("transformer")
        return d


def _part_params(model: AVBert, pre: Pretraining | None) -> dict[str, list[nn.Parameter]]:
    """:func:`avmt.params.part_parameters`, plus ``heads``: the objectives' own parameters (MEP/CPP heads, mask tokens)."""
    out = part_parameters(model)
    seen = {id(p) for ps in out.values() for p in ps}
    out["heads"] = [p for p in (pre.parameters() if pre is not None else []) if p.requires_grad and id(p) not in seen]
    return out


def _state_tensors(opt: torch.optim.Optimizer, p: nn.Parameter) -> tuple[list[Tensor], list[Tensor]]:
    """(per-parameter buffers, scalar step counters) of ``p`` in ``opt``."""
    buffers, steps = [], []
    for k, v in opt.state.get(p, {}).items():
        if isinstance(v, Tensor):
            (steps if k == "step" else buffers).append(v)
    return buffers, steps


def measure_step(
    cfg: Config,
    *,
    scope: str = "transformer",
    mode: str = "fake",
    batch: int = 4,
    clips: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    seed: int = 0,
) -> StepMemory:
    """Build ``AVBert(cfg.model)`` (+ the objectives for the ``pretraining`` scope), run one training step of
    ``batch`` sequences of ``clips`` (default ``cfg.data.num_clips``) and measure its memory (module docstring).

    ``precision="bf16"`` runs the forward under ``torch.autocast(device, bfloat16)`` with fp32 parameters, as
    ``avmt.train`` does on a GPU.
    """
    if scope not in SCOPES or mode not in MODES or precision not in PRECISIONS:
        raise ValueError(
            f"scope={scope!r}, mode={mode!r}, precision={precision!r}: "
            f"expected scope in {SCOPES}, mode in {MODES}, precision in {PRECISIONS}"
        )
    if scope == "pretraining" and mode == "fake":
        raise ValueError("scope='pretraining' needs mode='real': masking and negative sampling depend on the data (FakeTensor has none)")
    device = torch.device(device)
    if mode == "fake" and device.type != "cpu":
        raise ValueError("mode='fake' propagates CPU tensors; use mode='real' on a GPU")
    t = clips if clips is not None else cfg.data.num_clips
    d = cfg.data
    if mode == "fake" and cfg.model.kernel == "triton":
        raise ValueError("model.kernel='triton' cannot run on fake tensors")

    from torch._subclasses.fake_tensor import FakeTensorMode

    start = time.perf_counter()
    ctx = FakeTensorMode() if mode == "fake" else contextlib.nullcontext()
    with ctx:
        torch.manual_seed(seed)
        with device:
            tc = cfg.train
            model = AVBert(cfg.model).set_memory_options(tc)
            pre = Pretraining(model, cfg.objective) if scope == "pretraining" else None
        module = pre if pre is not None else model
        module.train()
        parts = _part_params(model, pre)
        params_in_scope = [p for p in module.parameters() if p.requires_grad]
        opt = build_optimizer(params_in_scope, cfg.train)
        if scope == "transformer":
            dim = cfg.model.dim
            inputs = [torch.randn(batch, t, dim, device=device, requires_grad=True) for _ in range(2)]
        else:
            inputs = list(random_clips(d, batch, device, t))
        gen = torch.Generator().manual_seed(seed)

        def step(counter: SavedTensorCounter | None) -> None:
            hooks = counter if counter is not None else contextlib.nullcontext()
            with hooks, torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                if scope == "transformer":
                    if counter is not None:
                        counter.phase = "transformer"
                    enc = model.encode(*inputs)
                    loss = sum(o.float().sum() for o in (enc.visual, enc.audio, enc.multimodal) if o is not None)
                elif scope == "model":
                    if counter is not None:
                        counter.phase = "cnn"
                    _, v_tok = model.embed_visual(inputs[0])
                    _, a_tok = model.embed_audio(inputs[1])
                    if counter is not None:
                        counter.phase = "transformer"
                    enc = model.encode(v_tok, a_tok)
                    loss = sum(o.float().sum() for o in (enc.visual, enc.audio, enc.multimodal) if o is not None)
                else:
                    loss = _pretraining_loss(pre, model, inputs, counter, gen)
            loss.backward()
            opt.step()

        counter = SavedTensorCounter()
        counter.exclude(module.parameters())
        counter.exclude(inputs)
        step(counter)

        in_scope = {"transformer": ("transformer", "embedding"), "model": PARTS[:4], "pretraining": PARTS}[scope]
        parts = {k: v for k, v in parts.items() if k in in_scope}
        seen: set[int] = set()
        weights = {k: _unique_bytes(list(ps), seen) for k, ps in parts.items()}
        seen_g: set[int] = set()
        grads = {k: _unique_bytes([p.grad for p in ps if p.grad is not None], seen_g) for k, ps in parts.items()}
        optimizer, steps, n_buffers = {}, [], set()
        seen_o: set[int] = set()
        for k, ps in parts.items():
            bufs: list[Tensor] = []
            for p in ps:
                b, s = _state_tensors(opt, p)
                if b:
                    n_buffers.add(len(b))
                bufs += b
                steps += s
            optimizer[k] = _unique_bytes(bufs, seen_o)
        step_bytes = _unique_bytes(steps, seen_o)
        params = {k: sum(p.numel() for p in parts.get(k, [])) for k in in_scope}
        input_bytes = _unique_bytes(inputs, set())

        peak = None
        if mode == "real" and device.type == "cuda":
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(None)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        opt = None  # drop the optimizer's references to the fake/real parameters before the model goes
    m = cfg.model
    return StepMemory(
        scope=scope,
        mode=mode,
        device=str(device),
        precision=precision,
        batch=batch,
        clips=t,
        sharing=m.sharing,
        dim=m.dim,
        layers=m.layers,
        heads=m.heads,
        ffn_dim=m.ffn_dim,
        rank=m.rank,
        params=params,
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        optimizer_steps=step_bytes,
        optimizer_buffers=max(n_buffers, default=0),
        activations=dict(counter.by_phase),
        weight_copies=counter.weight_copies,
        inputs=input_bytes,
        peak_allocated=peak,
        seconds=time.perf_counter() - start,
    )


def _pretraining_loss(
    pre: Pretraining | None, model: AVBert, inputs: list[Tensor], counter: SavedTensorCounter | None, gen: torch.Generator
) -> Tensor:
    """The real objective, with the counter's phase following the model's parts (CNN, Transformers, heads)."""
    assert pre is not None
    if counter is None:
        return pre(*inputs, generator=gen).loss
    originals = model.embed_visual, model.embed_audio, model.encode

    def phased(fn: Any, phase: str, after: str) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            counter.phase = phase
            out = fn(*a, **k)
            counter.phase = after
            return out

        return wrapped

    model.embed_visual = phased(originals[0], "cnn", "heads")  # type: ignore[method-assign]
    model.embed_audio = phased(originals[1], "cnn", "heads")  # type: ignore[method-assign]
    model.encode = phased(originals[2], "transformer", "heads")  # type: ignore[method-assign]
    try:
        return pre(*inputs, generator=gen).loss
    finally:
        del model.embed_visual, model.embed_audio, model.encode
