"""Which loader runs, and the one place that builds it: ``data.loader = auto | cpu | dali``.

- ``cpu``: :class:`avmt.data.loader_cpu.CPULoader` (PyAV in DataLoader workers; every codec FFmpeg has).
- ``dali``: :class:`avmt.data.loader_dali.DALILoader`, on the GPU of ``device`` (NVDEC) when it is a CUDA
  device, else DALI's CPU pipeline, whose decoder in the PyPI wheel reads VP9 and MJPEG but **not H.264**:
  there a manifest with other codecs is refused before any work.
- ``auto``: ``dali`` when ``device`` is a CUDA device and DALI imports, else ``cpu`` (on a CPU the PyAV
  loader is the reference and decodes everything).

Asking for ``dali`` where it cannot run raises :class:`LoaderError` with the reason, never a silent fallback.
Both loaders share the batch contract (see :mod:`avmt.data.loader_cpu`) and the iteration interface the
training loop uses: ``len(loader)`` batches per epoch, ``set_epoch(e)``, ``iterate(start_batch)`` (resume
mid-epoch without decoding the skipped batches) and the running count ``loader.failures``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from avmt.config import DataConfig
from avmt.data.clips import View
from avmt.data.manifest import MODALITIES, modalities_of


@runtime_checkable
class Loader(Protocol):
    """What the training loop and evaluation use of a loader (both :class:`~avmt.data.loader_cpu.CPULoader` and
    :class:`~avmt.data.loader_dali.DALILoader` are one): ``len(loader)`` batches per epoch, ``set_epoch(e)``,
    ``iterate(k)`` (the epoch's batches from batch ``k`` on, decoding nothing before it), the running count of
    replaced samples ``failures``, and ``close()`` (free threads and pipelines now)."""

    failures: int

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def iterate(self, start_batch: int = 0) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None: ...


LOADERS = ("cpu", "dali")
# Video codecs (PyAV/FFmpeg names, the manifest's ``video_codec``) that DALI's CPU decoder reads in the PyPI wheel.
DALI_CPU_CODECS = ("vp9", "mjpeg")


class LoaderError(RuntimeError):
    """The requested loader cannot run here, or cannot read this manifest; the message says why."""


def _dali_import_error() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:  # ImportError only: a broken install elsewhere should surface, not be hidden
        return f"nvidia.dali does not import ({e}); pip install --no-build-isolation -e '.[dali]'"
    return None


def loader_status(device: torch.device | str) -> dict[str, tuple[bool, str]]:
    """``{name: (can_run, why)}`` for every loader, for batches meant for ``device``."""
    device = torch.device(device)
    status = {"cpu": (True, "PyAV decoding in DataLoader worker processes; every codec FFmpeg has (the reference)")}
    err = _dali_import_error()
    if err is not None:
        status["dali"] = (False, err)
    elif device.type == "cuda":
        status["dali"] = (True, f"DALI pipeline on {device}: NVDEC decode, resize/crop on the GPU")
    else:
        status["dali"] = (True, f"DALI's CPU pipeline only (no CUDA device): decodes {'/'.join(DALI_CPU_CODECS)}, not H.264")
    return status


def select_loader(choice: str, device: torch.device | str) -> str:
    """The loader ``data.loader=choice`` runs for ``device``: ``cpu`` or ``dali``. Raises LoaderError if forced and impossible."""
    device = torch.device(device)
    status = loader_status(device)
    if choice == "auto":
        return "dali" if device.type == "cuda" and status["dali"][0] else "cpu"
    if choice not in LOADERS:
        raise LoaderError(f"data.loader={choice!r} is invalid: expected 'auto', 'cpu' or 'dali'")
    ok, why = status[choice]
    if not ok:
        raise LoaderError(f"data.loader={choice!r} cannot run here: {why}")
    return choice


def check_dali_cpu_codecs(records: Sequence[dict]) -> None:
    """Raise LoaderError if DALI's CPU decoder cannot read every video of ``records`` (checked before any
    work: a whole manifest of H.264 would otherwise fail batch after batch inside the pipeline)."""
    bad = [r for r in records if r.get("video_codec") not in DALI_CPU_CODECS]
    if bad:
        codecs = sorted({str(r.get("video_codec")) for r in bad})
        raise LoaderError(
            f"data.loader='dali' without a CUDA device runs DALI's CPU decoder, which reads only {', '.join(DALI_CPU_CODECS)}: "
            f"{len(bad)} of {len(records)} videos are {', '.join(codecs)} (e.g. {bad[0]['path']}). "
            "Use data.loader=cpu (or auto), re-encode to VP9/webm, or run on a GPU"
        )


def worker_count(num_workers: int) -> int:
    """``data.num_workers`` resolved: -1 is the cores this process may use (its CPU affinity), divided between the
    ``LOCAL_WORLD_SIZE`` processes torchrun starts on this machine; other values as given."""
    if num_workers >= 0:
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def check_records(records: Sequence[dict], cfg: DataConfig, modalities: Sequence[str] = MODALITIES) -> None:
    """Raise LoaderError, before any decoding, if ``records`` cannot feed ``cfg``: a record without a modality the
    caller needs (reported with how many and which, never skipped), or audio extracted at another sample rate than
    ``data.sample_rate`` (every sample would fail, one by one, after retries)."""
    for m in modalities:
        lacking = [r for r in records if m not in modalities_of(r)]
        if lacking:
            raise LoaderError(
                f"{len(lacking)} of {len(records)} manifest records have no {m} (e.g. {lacking[0]['path']}), and this needs "
                f"{' and '.join(modalities)}: leave them out of the manifest, or use what they have"
            )
    if "audio" not in modalities:
        return
    bad = [r for r in records if r.get("sample_rate") != cfg.sample_rate]
    if bad:
        rates = sorted({str(r.get("sample_rate")) for r in bad})
        raise LoaderError(
            f"{len(bad)} of {len(records)} manifest records hold audio at {', '.join(rates)} Hz, but data.sample_rate="
            f"{cfg.sample_rate} (e.g. {bad[0]['path']}): prepare again with --sample-rate {cfg.sample_rate}, or set data.sample_rate"
        )


def build_loader(
    manifest: str | Path | Sequence[dict],
    cfg: DataConfig,
    batch_size: int,
    train: bool,
    device: torch.device | str,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    drop_last: bool = False,
    choice: str | None = None,
    modalities: Sequence[str] = MODALITIES,
    view: View | None = None,
) -> Loader:
    """The loader ``choice`` (default ``cfg.loader``) selects for ``device``, over a manifest path or its records.

    Batches are ``[B, ...]`` tensors on ``device`` for DALI on a GPU, on the CPU otherwise (the caller moves them).
    ``drop_last``: only full batches (training: every step and every DDP rank sees ``batch_size`` sequences).
    ``modalities``: what each batch holds (every record must have it); audio alone always reads through the CPU
    loader (DALI's part is video decoding). ``view``: one deterministic test view in eval mode.
    """
    from avmt.data.manifest import load_manifest

    device = torch.device(device)
    name = select_loader(choice or cfg.loader, device)
    try:
        records = load_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
    except (OSError, ValueError) as e:  # a missing file, a malformed record (its line and field named)
        raise LoaderError(str(e)) from None
    check_records(records, cfg, modalities)
    if name == "cpu" or "video" not in modalities:
        from avmt.data.loader_cpu import CPULoader

        return CPULoader(
            records,
            cfg,
            batch_size,
            train=train,
            seed=seed,
            num_workers=worker_count(cfg.num_workers),
            pin_memory=device.type == "cuda",  # page-locked batches: an asynchronous host-to-device copy
            shard_id=shard_id,
            num_shards=num_shards,
            drop_last=drop_last,
            modalities=modalities,
            view=view,
        )
    from avmt.data.loader_dali import DALILoader

    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    else:
        device_id = None
        check_dali_cpu_codecs(records)
    # DALI's own thread pool replaces the DataLoader workers: num_workers sets its size (at least one thread)
    return DALILoader(
        records,
        cfg,
        batch_size,
        train=train,
        seed=seed,
        device_id=device_id,
        shard_id=shard_id,
        num_shards=num_shards,
        num_threads=max(1, worker_count(cfg.num_workers)),
        drop_last=drop_last,
        modalities=modalities,
        view=view,
    )
