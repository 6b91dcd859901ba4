"""Typed configuration: presets, YAML files and dotted command-line overrides.

A :class:`Config` has four frozen sections (``model``, ``data``, ``objective``, ``train``). It is built from a
preset (``paper``, ``small``, ``tiny``), then an optional YAML file, then ``section.key=value``
overrides, in that order::

    cfg = load_config("tiny", overrides=["model.sharing=layers", "train.lr=3e-4"])

Every value is type-checked and range-checked when a section is constructed, so a bad value fails
before any work starts, with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

import yaml

_SECTIONS = ("model", "data", "objective", "train")

Sharing = Literal["none", "layers", "all", "lowrank"]
Kernel = Literal["auto", "triton", "reference"]  # backend of the lowrank maps (avmt.backends.select_lowrank)
KernelBackward = Literal["triton", "torch"]  # backward of the Triton lowrank maps
Fusion = Literal["early", "mid", "late"]
FeatureNorm = Literal["none", "batchnorm"]  # on the pooled CNN features, before the input projection

SHARING_SCHEMES: tuple[str, ...] = get_args(Sharing)
FUSION_MODES: tuple[str, ...] = get_args(Fusion)


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key, the value and what is allowed."""


Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: v > 0, "a number > 0")
NON_NEGATIVE: Check = (lambda v: v >= 0, "a number >= 0")
PROBABILITY: Check = (lambda v: 0 <= v < 1, "a number in [0, 1)")
SECONDS_OR_OFF: Check = (lambda v: 0 <= v < float("inf"), "a finite number of seconds >= 0 (0: no limit)")
ALL_POSITIVE: Check = (lambda v: len(v) > 0 and all(x > 0 for x in v), "a non-empty list of numbers > 0")


def _field(default: Any, check: Check | None = None) -> Any:
    return field(default=default, metadata={"check": check})


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the field type ``tp`` or raise a ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise _fail(key, value, "one of " + ", ".join(repr(c) for c in choices))
        return value
    if origin is tuple:
        item_tp = get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, f"a list of {item_tp.__name__}")
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _fail(key, value, "an integer")
        try:
            as_float = float(value)
        except ValueError:
            raise _fail(key, value, "an integer") from None
        if not as_float.is_integer():
            raise _fail(key, value, "an integer")
        return int(as_float)
    if tp is float:
        # PyYAML reads "1e-4" as a string (YAML 1.1), so strings that parse as numbers are accepted.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _fail(key, value, "a number")
        try:
            number = float(value)
        except ValueError:
            raise _fail(key, value, "a number") from None
        if not math.isfinite(number):  # no setting means anything at inf or nan (train.lr=inf used to be taken)
            raise _fail(key, value, "a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise _fail(key, value, "a string")
        return value
    raise TypeError(f"unsupported config field type {tp!r} for {key}")  # a bug in this module, not user input


class _Section:
    """Shared validation for the config sections: field types, field ranges, then ``_check``."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            key = f"{self.section}.{f.name}"
            value = _coerce(key, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            check = f.metadata.get("check")
            if check is not None and not check[0](value):
                raise _fail(key, value, check[1])
        self._check()

    def _check(self) -> None:
        """Cross-field checks of one section."""

    def _require(self, ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise _fail(f"{self.section}.{name}", getattr(self, name), allowed)


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The AVBERT model (docs/method.md §1-2). Defaults are the paper's numbers."""

    section: ClassVar[str] = "model"

    dim: int = _field(768, POSITIVE)  # D, width of every Transformer
    layers: int = _field(6, POSITIVE)  # L, layers per Transformer
    heads: int = _field(12, POSITIVE)
    ffn_dim: int = _field(3072, POSITIVE)
    dropout: float = _field(0.1, PROBABILITY)  # hidden dropout (embeddings, residual branches)
    attention_dropout: float = _field(0.1, PROBABILITY)  # on attention probabilities, as in BERT
    ln_eps: float = _field(1e-12, POSITIVE)  # LayerNorm eps of the Transformers (BERT)
    init_std: float = _field(0.02, POSITIVE)  # N(0, init_std) init of dense weights and embeddings
    sharing: Sharing = "lowrank"
    fusion: Fusion = "mid"
    rank: int = _field(128, POSITIVE)  # O, inner size of the low-rank maps
    lowrank_eps: float = _field(1e-6, POSITIVE)  # normalize(z) = z / max(||z||, eps)
    kernel: Kernel = "auto"  # lowrank maps: fused Triton on CUDA (auto), forced triton (raises if it cannot run), reference
    kernel_backward: KernelBackward = "triton"  # Triton path's backward: fused kernels, or "torch" (fp32 matmuls, reference)
    max_clips: int = _field(64, POSITIVE)  # largest T a forward accepts (size of the position tables)
    visual_width: int = _field(64, POSITIVE)  # stem channels of the 3D ResNet; features = 32 * width
    visual_depths: tuple[int, ...] = _field((3, 4, 6, 3), ALL_POSITIVE)  # bottlenecks per stage
    visual_temporal_kernels: tuple[int, ...] = _field((1, 1, 3, 3), ALL_POSITIVE)  # first 1x1 conv, per stage
    audio_width: int = _field(32, POSITIVE)  # stem channels of the 2D ResNet; features = 32 * width
    audio_depths: tuple[int, ...] = _field((3, 4, 6, 3), ALL_POSITIVE)
    audio_separable_stages: int = _field(2, NON_NEGATIVE)  # first stages whose 3x3 is split into 3x1 + 1x3
    bn_eps: float = _field(1e-5, POSITIVE)
    # zero the last BN of every bottleneck (the released code's choice); off in the small presets, where it blinds the
    # visual stream at init (docs/experiments.md, "What it took", 2.)
    zero_init_residual: bool = True
    # "batchnorm": standardise the pooled CNN features over the batch's clips (no affine) before the projection, which
    # keeps the small presets' audio tokens from collapsing (docs/experiments.md, 1.); "none" is the paper's
    feature_norm: FeatureNorm = "none"

    def _check(self) -> None:
        self._require(self.dim % self.heads == 0, "heads", f"a divisor of model.dim={self.dim}")
        self._require(
            len(self.visual_temporal_kernels) == len(self.visual_depths) and all(k % 2 == 1 for k in self.visual_temporal_kernels),
            "visual_temporal_kernels",
            f"one odd kernel size per stage of model.visual_depths ({len(self.visual_depths)} stages)",
        )
        self._require(
            self.audio_separable_stages <= len(self.audio_depths),
            "audio_separable_stages",
            f"at most the number of audio stages ({len(self.audio_depths)})",
        )
        if self.fusion == "early" and self.sharing in ("all", "lowrank"):
            raise ConfigError(
                f"model.sharing={self.sharing!r} is invalid with model.fusion='early': early fusion has a single "
                "Transformer, so there is nothing to share across Transformers or modalities; "
                "expected 'none' or 'layers' (or fusion 'mid'/'late')"
            )


@dataclass(frozen=True)
class DataConfig(_Section):
    """How a training sequence is cut from a video (docs/method.md §5). Defaults are the paper's numbers."""

    section: ClassVar[str] = "data"

    num_clips: int = _field(15, POSITIVE)  # T, clips per sequence
    window_seconds: float = _field(30.0, POSITIVE)  # the window the T clips are spread over
    clip_seconds: float = _field(2.0, POSITIVE)  # one segment; a clip and its audio window lie inside it
    frames: int = _field(32, POSITIVE)  # frames per clip
    fps: float = _field(16.0, POSITIVE)  # frame rate the clip's frames are sampled at
    crop_size: int = _field(112, POSITIVE)
    scale_range: tuple[int, ...] = _field((128, 160), ALL_POSITIVE)  # train: random short side, then crop
    sample_rate: int = _field(44100, POSITIVE)
    n_mels: int = _field(80, POSITIVE)
    mel_frames: int = _field(128, POSITIVE)  # log-mel frames per clip window
    spec_mask_rate: float = _field(0.05, PROBABILITY)  # max width of frequency/time masks, as a fraction
    manifest: str = ""  # a prepared manifest.jsonl (python -m avmt.data.prepare); "" = the synthetic dataset
    # CPU loader worker processes (DALI: its thread pool size, at least 1); -1: the cores this process may use, shared
    # between the processes of this machine under torchrun (avmt.data.loader.worker_count); 0: load in the main process
    num_workers: int = _field(-1, (lambda v: v >= -1, "-1 (auto), 0 (in the main process) or a number of workers"))
    # auto: DALI on a CUDA device when it imports, else the PyAV CPU loader; dali: raises where it cannot run
    # (without CUDA it is DALI's CPU pipeline, VP9/MJPEG only). See avmt.data.loader.
    loader: Literal["auto", "cpu", "dali"] = "auto"
    # CPU loader with workers: a batch that takes longer stops the run, naming the worker and the file it is reading
    batch_timeout_s: float = _field(300.0, SECONDS_OR_OFF)

    def _check(self) -> None:
        self._require(
            len(self.scale_range) == 2 and self.scale_range[0] <= self.scale_range[1],
            "scale_range",
            "two sizes [low, high] with low <= high",
        )
        self._require(self.crop_size <= self.scale_range[0], "crop_size", f"at most data.scale_range[0]={self.scale_range[0]}")
        self._require(
            self.num_clips * self.clip_seconds <= self.window_seconds + 1e-9,
            "num_clips",
            f"at most window_seconds / clip_seconds = {self.window_seconds / self.clip_seconds:g}",
        )
        self._require(
            self.frames / self.fps <= self.clip_seconds + 1e-9,
            "frames",
            f"at most fps * clip_seconds = {self.fps * self.clip_seconds:g} (a clip must fit in its segment)",
        )


@dataclass(frozen=True)
class ObjectiveConfig(_Section):
    """Pretraining objectives (docs/method.md §3) and negative sampling (docs/method.md §4)."""

    section: ClassVar[str] = "objective"

    mask_ratio: float = _field(0.15, (lambda v: 0 < v <= 1, "a fraction in (0, 1]"))  # clips masked per sequence (>= 1)
    mask_token: float = _field(0.8, PROBABILITY)  # of the masked clips: replaced by the learned mask embedding
    mask_random: float = _field(0.1, PROBABILITY)  # ... replaced by another clip's embedding; the rest are kept
    negatives: int = _field(32, POSITIVE)  # K
    sampling: Literal["similar", "dissimilar", "uniform", "sequence"] = "similar"
    trim: float = _field(0.025, (lambda v: 0 <= v < 0.5, "a fraction in [0, 0.5)"))
    sampling_space: Literal["features", "embeddings"] = "features"  # CNN features, or the projected clip tokens
    sampling_backend: Literal["auto", "reference", "cpp", "cuda"] = "auto"
    swap_prob: float = _field(0.5, (lambda v: 0 <= v <= 1, "a probability in [0, 1]"))  # CPP: audio swapped
    # BOS outputs the CPP classifier reads; auto: the multimodal ones when the fusion mode has that Transformer
    cpp_input: Literal["auto", "multimodal", "unimodal"] = "auto"
    mep_visual: float = _field(1.0, NON_NEGATIVE)  # loss weights
    mep_audio: float = _field(1.0, NON_NEGATIVE)
    mep_multimodal: float = _field(1.0, NON_NEGATIVE)
    cpp: float = _field(1.0, NON_NEGATIVE)

    def _check(self) -> None:
        self._require(self.mask_token + self.mask_random <= 1, "mask_random", f"at most 1 - objective.mask_token = {1 - self.mask_token:g}")


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Optimisation. The optimizer numbers are the paper's (docs/method.md §6); the schedule is our default."""

    section: ClassVar[str] = "train"

    batch_size: int = _field(8, POSITIVE)  # sequences per process per micro-step
    lr: float = _field(1e-4, POSITIVE)
    weight_decay: float = _field(1e-4, NON_NEGATIVE)
    betas: tuple[float, ...] = _field((0.9, 0.98), (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"))
    amsgrad: bool = True
    warmup_steps: int = _field(1000, NON_NEGATIVE)
    max_steps: int = _field(220_000, POSITIVE)
    grad_clip: float = _field(1.0, NON_NEGATIVE)  # max global grad norm; 0 disables clipping
    grad_accum: int = _field(1, POSITIVE)
    min_lr_ratio: float = _field(0.1, (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"))  # cosine floor, x lr
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    activation_checkpointing: bool = False  # recompute Transformer layers in backward (less memory)
    # per-clip CNNs (avmt.models.avbert.CNNRunner): clips per CNN call (0 = all at once; BatchNorm statistics per
    # chunk), recompute each chunk in backward, and K clips per sequence with gradients (0 = all)
    cnn_chunk: int = _field(0, NON_NEGATIVE)
    cnn_checkpoint: bool = False
    clips_with_grad: int = _field(0, NON_NEGATIVE)
    cnn_channels_last: bool = False  # CNN weights and inputs in channels-last layout (a GPU experiment: docs/training.md)
    run_dir: str = "runs/avmt"  # checkpoints, metrics.jsonl, TensorBoard events
    init_from: str = ""  # a checkpoint (avmt, or converted by python -m avmt.convert) whose model weights start the run
    log_every: int = _field(10, POSITIVE)
    save_every: int = _field(500, POSITIVE)
    max_nonfinite: int = _field(20, POSITIVE)  # consecutive non-finite losses before the run stops
    deterministic: bool = False  # torch.use_deterministic_algorithms for the run (CUDA; the CPU path already is)
    dist_timeout_s: float = _field(1800.0, POSITIVE)  # a collective waiting longer fails the job (a hung rank)
    # no optimizer step completed for this long: every thread's stack is written to the run folder and the process exits
    watchdog_s: float = _field(1800.0, SECONDS_OR_OFF)
    seed: int = 0


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``preset`` records which preset it started from."""

    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.data.num_clips > self.model.max_clips:
            raise _fail("data.num_clips", self.data.num_clips, f"at most model.max_clips={self.model.max_clips}")
        if self.train.clips_with_grad > self.data.num_clips:
            raise _fail("train.clips_with_grad", self.train.clips_with_grad, f"0 (all) to data.num_clips={self.data.num_clips}")
        fusion, cpp_input = self.model.fusion, self.objective.cpp_input
        if (fusion == "late" and cpp_input == "multimodal") or (fusion == "early" and cpp_input == "unimodal"):
            raise ConfigError(
                f"objective.cpp_input={cpp_input!r} is invalid with model.fusion={fusion!r}: that fusion mode has no "
                f"{cpp_input} Transformer; expected {'unimodal' if fusion == 'late' else 'multimodal'}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), suitable for YAML/JSON."""

        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {"preset": self.preset} | {
            name: {k: plain(v) for k, v in dataclasses.asdict(getattr(self, name)).items()} for name in _SECTIONS
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


PRESETS: dict[str, Config] = {
    # docs/method.md §1-2 exactly: D=768, L=6, 12 heads, FFN 3072, O=128, ResNet-50s, 15 clips x 32 frames at 112^2.
    "paper": Config(preset="paper"),
    # A real but small model for quick GPU runs; a training step (batch 16) takes ~3-6 s on 2 CPU cores.
    "small": Config(
        preset="small",
        model=ModelConfig(
            dim=256,
            layers=4,
            heads=4,
            ffn_dim=1024,
            rank=64,
            max_clips=32,
            visual_width=16,
            visual_depths=(1, 2, 2, 1),
            audio_width=16,
            audio_depths=(1, 2, 2, 1),
            feature_norm="batchnorm",
            zero_init_residual=False,
        ),
        data=DataConfig(
            num_clips=8,
            window_seconds=16.0,
            frames=16,
            fps=8.0,
            crop_size=64,
            scale_range=(72, 88),
            sample_rate=16000,
            n_mels=64,
            mel_frames=64,
        ),
        train=TrainConfig(batch_size=16, lr=3e-4, warmup_steps=200, max_steps=20_000),
    ),
    # For tests and the CPU demo; batch 16 because batch-8 BatchNorm statistics held CPP back (docs/experiments.md, 5.)
    "tiny": Config(
        preset="tiny",
        model=ModelConfig(
            dim=64,
            layers=2,
            heads=2,
            ffn_dim=128,
            rank=16,
            max_clips=16,
            visual_width=8,
            visual_depths=(1, 1, 1, 1),
            audio_width=8,
            audio_depths=(1, 1, 1, 1),
            feature_norm="batchnorm",
            zero_init_residual=False,
        ),
        data=DataConfig(
            num_clips=4,
            window_seconds=8.0,
            frames=4,
            fps=4.0,
            crop_size=32,
            scale_range=(36, 44),
            sample_rate=16000,
            n_mels=32,
            mel_frames=32,
        ),
        train=TrainConfig(batch_size=16, lr=1e-3, warmup_steps=100, max_steps=2500),
    ),
}


def _suggest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _apply(cfg: Config, updates: Mapping[str, Mapping[str, Any]]) -> Config:
    """Return ``cfg`` with ``{section: {key: value}}`` applied; unknown keys raise ConfigError."""
    changed = {}
    for section, values in updates.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section {section!r}: expected one of {', '.join(_SECTIONS)}{_suggest(section, _SECTIONS)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section {section!r} must be a mapping of keys to values, got {values!r}")
        current = getattr(cfg, section)
        names = [f.name for f in fields(current)]
        for key in values:
            if key not in names:
                raise ConfigError(f"unknown config key '{section}.{key}'{_suggest(key, names)}; {section} keys are: {', '.join(names)}")
        changed[section] = dataclasses.replace(current, **values)
    return dataclasses.replace(cfg, **changed)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``"section.key=value"`` into (section, key, value); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is invalid: expected section.key=value, e.g. model.sharing=lowrank")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {dotted!r} is invalid: expected section.key with section in {', '.join(_SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value: {e}") from None
    return parts[0], parts[1], value


def load_config(preset: str | None = None, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a Config: preset, then the YAML file at ``path``, then ``section.key=value`` overrides.

    The preset is ``preset`` if given, else the file's top-level ``preset:`` key, else ``paper``.
    """
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        file_values = dict(loaded)
    name = preset or file_values.pop("preset", None) or "paper"
    file_values.pop("preset", None)
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is invalid: expected one of {', '.join(PRESETS)}{_suggest(name, list(PRESETS))}")
    cfg = _apply(PRESETS[name], file_values)
    cli: dict[str, dict[str, Any]] = {}
    for text in overrides:
        section, key, value = parse_override(text)
        cli.setdefault(section, {})[key] = value
    return _apply(cfg, cli)


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """The Config that :meth:`Config.to_dict` produced (e.g. from a checkpoint), validated like any other."""
    values = dict(values)
    name = values.pop("preset", "paper")
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is invalid: expected one of {', '.join(PRESETS)}")
    return _apply(PRESETS[name], values)


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str = "paper") -> None:
    """Add ``--preset``, ``--config`` and positional ``section.key=value`` overrides to a CLI parser."""
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help=f"starting preset (default: {default_preset}, or the config file's)"
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML file with model/data/objective/train sections")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. model.sharing=lowrank train.lr=3e-4")


def config_from_args(args: argparse.Namespace, default_preset: str = "paper") -> Config:
    """The Config described by the arguments that :func:`add_config_arguments` added."""
    preset = args.preset or (None if args.config else default_preset)
    return load_config(preset, args.config, args.overrides)
