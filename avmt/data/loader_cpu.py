"""The CPU loader (PyAV + torch DataLoader workers): the fallback, and the reference for the DALI loader.

Batch contract (both loaders):

- ``video [B, T, 3, F, crop, crop]`` uint8 RGB (resized, cropped, flipped); the model normalises it on its
  device (:func:`avmt.models.cnn.normalize_video`: mean 0.45, std 0.225 per channel, as the released AVBERT
  code), so workers, pinned memory and the host-to-device copy move 4x fewer bytes than float32;
- ``audio [B, T, 1, n_mels, mel_frames]`` float32 log-mel (:mod:`avmt.data.audio`), spec-augmented in train mode;
- ``label [B]`` int64 (``label_index`` of the manifest), ``index [B]`` int64 (manifest row actually loaded);
- ``failures [B]`` int64: how many samples failed and were replaced before this one loaded.

``video`` and ``audio`` are present when the loader's ``modalities`` (default both) name them: a protocol that
needs one modality loads only that one (audio-only or video-only records need no stand-in for the other).
``view`` (eval mode) picks one of the deterministic test views (:class:`avmt.data.clips.View`).

T is fixed (the short-video rule in :mod:`avmt.data.clips` never drops clips), so there is no ``clip_mask``.
A sample that fails to load is logged (``logging`` warning with path and error), counted and replaced by
another manifest row drawn from a seeded generator; after ``max_retries`` failures in a row the loader
raises, naming the last error (a dataset that is mostly broken should stop the run, not spin).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avmt.config import DataConfig
from avmt.data.audio import MelSpec, log_mel, mel_filter_bank, spec_augment
from avmt.data.clips import CropPlan, View, shard_indices
from avmt.data.loader import LoaderError
from avmt.data.manifest import MODALITIES, load_manifest
from avmt.data.media import read_frames
from avmt.data.sample import SampleError, load_audio_clips, load_with_retries, plan_sample
from avmt.workers import context

log = logging.getLogger("avmt.data")


def frame_slots(video: Tensor, crop: CropPlan) -> np.ndarray:
    """The writable ``[T, F, crop, crop, 3]`` view of one sequence's ``video [T, 3, F, crop, crop]`` uint8 slot that
    the frame reader writes RGB frames into (mirrored when the plan flips): the frames land in the batch's layout with
    no copy in between. The normalisation to float runs on the training device, in the model
    (:func:`avmt.models.cnn.normalize_video`)."""
    view = video.numpy().transpose(0, 2, 3, 4, 1)
    return view[:, :, :, ::-1] if crop.flip else view


class SequenceDataset(torch.utils.data.Dataset):
    """Map-style dataset over a prepared manifest; item ``i`` is one sequence dict (the batch contract
    without the batch dimension). Randomness comes from ``sample_rng(seed, epoch, i, attempt)``, so a
    sample is reproducible in any worker; call :meth:`set_epoch` between epochs. ``decode_threads``: the frame
    reader's ``threads`` (None: none in a DataLoader worker, where one worker per core fills the cores, else FFmpeg's
    choice)."""

    # (path, frame indices [T, F], fps, height=, width=, box=, threads=, out=) -> out, the frames written into it as
    # [T, F, box h, box w, 3] uint8 (read_frames' contract); the loader benchmark swaps it (a module-level function:
    # spawned workers import it by name)
    frame_reader = staticmethod(read_frames)

    def __init__(
        self,
        manifest: str | Path | Sequence[dict],
        cfg: DataConfig,
        train: bool,
        seed: int = 0,
        max_retries: int = 10,
        decode_threads: int | None = None,
        modalities: Sequence[str] = MODALITIES,
        view: View | None = None,
    ):
        self.records = list(manifest) if not isinstance(manifest, (str, Path)) else load_manifest(manifest)
        self.cfg, self.train, self.seed, self.max_retries = cfg, train, seed, max_retries
        self.modalities, self.view = tuple(modalities), view
        self.decode_threads = decode_threads  # None: 1 in a DataLoader worker (one per core), FFmpeg's choice otherwise
        self.epoch = 0
        # the class's reader when the dataset is made, kept on the instance: it is pickled into spawned workers with the
        # dataset (a class attribute changed later would not reach them)
        self.frame_reader = type(self).frame_reader
        # set by CPULoader for its workers: row [worker id] = (manifest row being loaded or -1, since when in ms, pid)
        self.busy: Tensor | None = None
        self.mel = MelSpec.for_clip(cfg.sample_rate, cfg.clip_seconds, cfg.n_mels, cfg.mel_frames)
        self.fbank = mel_filter_bank(self.mel.n_fft, cfg.sample_rate, cfg.n_mels)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of one sample's ``video`` and ``audio`` (those of the loaded modalities)."""
        c = self.cfg
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if "video" in self.modalities:
            out["video"] = ((c.num_clips, 3, c.frames, c.crop_size, c.crop_size), torch.uint8)
        if "audio" in self.modalities:
            out["audio"] = ((c.num_clips, 1, c.n_mels, c.mel_frames), torch.float32)
        return out

    def load(self, i: int, rng: np.random.Generator | None, out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Load row ``i`` (raises on any failure) into ``out``: a tensor per modality of :meth:`shapes` (a batch's
        slots: the frames are written there as they are decoded), allocated when None. Returns them with ``label``
        and ``index``."""
        rec = self.records[i]
        worker = torch.utils.data.get_worker_info()
        if self.busy is not None and worker is not None:  # for the loader's timeout message: who reads what, since when
            self.busy[worker.id] = torch.tensor([i, int(time.time() * 1000), os.getpid()])
        seq, crop = plan_sample(rec, self.cfg, self.train, rng, self.view)
        if out is None:
            out = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in self.shapes().items()}
        if "video" in self.modalities:
            box = (crop.top, crop.left, crop.crop, crop.crop)
            threads = self.decode_threads
            if threads is None:
                threads = 1 if torch.utils.data.get_worker_info() is not None else 0
            self.frame_reader(
                rec["path"],
                seq.frame_indices,
                rec["fps"],
                height=crop.size[0],
                width=crop.size[1],
                box=box,
                threads=threads,
                out=frame_slots(out["video"], crop),
            )
        if "audio" in self.modalities:
            wave = torch.from_numpy(load_audio_clips(rec, seq, self.cfg.sample_rate))
            audio = log_mel(wave, self.mel, self.fbank, chunk=3)
            if self.train and self.cfg.spec_mask_rate > 0:
                gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
                audio = spec_augment(audio, self.cfg.spec_mask_rate, gen)
            out["audio"][:, 0] = audio
        label = torch.tensor(rec["label_index"], dtype=torch.int64)
        if self.busy is not None and worker is not None:
            self.busy[worker.id, 0] = -1
        return {**out, "label": label, "index": torch.tensor(i, dtype=torch.int64)}

    def _key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        return int(epoch), int(i)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        """Sample ``key`` = row ``i`` (of the current epoch) or ``(epoch, i)`` (what the CPU loader's sampler yields,
        so that persistent workers, whose copy of the dataset never sees ``set_epoch``, draw the right epoch)."""
        epoch, i = self._key(key)
        out, failed = load_with_retries(self.load, i, self.records, self.seed, epoch, self.train, self.max_retries)
        out["failures"] = torch.tensor(failed, dtype=torch.int64)
        return out

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> dict[str, Tensor]:
        """A whole batch (what the DataLoader asks a worker for): each sample is loaded straight into its slot of
        batch tensors allocated in shared memory in a worker, so no collate copy follows and the main process maps
        the batch as it is (18 MB per paper sequence that is not copied twice)."""
        n, shared = len(keys), torch.utils.data.get_worker_info() is not None
        batch = {k: _empty((n, *shape), dtype, shared) for k, (shape, dtype) in self.shapes().items()}
        label, index, failures = (torch.empty(n, dtype=torch.int64) for _ in range(3))
        for b, key in enumerate(keys):
            epoch, i = self._key(key)
            load = functools.partial(self.load, out={k: v[b] for k, v in batch.items()})
            got, failures[b] = load_with_retries(load, i, self.records, self.seed, epoch, self.train, self.max_retries)
            label[b], index[b] = got["label"], got["index"]
        return {**batch, "label": label, "index": index, "failures": failures}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> Tensor:
    """An uninitialised tensor, in shared memory when ``shared`` (as torch's own collate allocates a worker's batch:
    a tensor sent from a worker is otherwise copied into shared memory when it is pickled)."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if not shared or new_shared is None:
        return torch.empty(shape, dtype=dtype)
    storage = new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _as_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The DataLoader's collate step: :meth:`SequenceDataset.__getitems__` already made the batch."""
    return batch


class _KeySampler(torch.utils.data.Sampler):
    """The ``(epoch, row)`` keys of the batches to load, set by :meth:`CPULoader.iterate` before each pass (a
    persistent DataLoader reads its sampler anew at every ``iter``)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


class CPULoader:
    """Batches of the contract above from PyAV decoding in ``num_workers`` DataLoader workers.

    ``shard_id``/``num_shards`` split each epoch between DDP ranks (:func:`avmt.data.clips.shard_indices`).
    ``failures`` is the running count of replaced samples seen by this loader. ``pin_memory`` (set by
    :func:`avmt.data.loader.build_loader` for a CUDA device) gives page-locked batches.

    The workers are spawned (:func:`avmt.workers.context`: nothing of this process's FFmpeg or thread state is
    inherited), once: they live across epochs until :meth:`close`. A batch that takes longer than
    ``cfg.batch_timeout_s`` raises :class:`LoaderError` naming each busy worker, the file it is reading and for how
    long.
    """

    def __init__(
        self,
        manifest: str | Path | Sequence[dict],
        cfg: DataConfig,
        batch_size: int,
        train: bool,
        seed: int = 0,
        num_workers: int = 2,
        shard_id: int = 0,
        num_shards: int = 1,
        drop_last: bool = False,
        max_retries: int = 10,
        pin_memory: bool = False,
        modalities: Sequence[str] = MODALITIES,
        view: View | None = None,
    ):
        self.dataset = SequenceDataset(manifest, cfg, train, seed, max_retries, modalities=modalities, view=view)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.num_workers, self.shard_id, self.num_shards, self.drop_last = num_workers, shard_id, num_shards, drop_last
        self.pin_memory, self.persistent = pin_memory, num_workers > 0  # spawned workers cost seconds: kept across epochs
        self.timeout_s = cfg.batch_timeout_s if num_workers > 0 else 0.0
        if num_workers > 0:
            self.dataset.busy = torch.full((num_workers, 3), -1, dtype=torch.int64).share_memory_()
        self.epoch = 0
        self.failures = 0
        self._sampler = _KeySampler()
        self._dl: torch.utils.data.DataLoader | None = None  # kept across epochs when its workers persist

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def close(self) -> None:
        """End persistent worker processes now (without them, workers live only while an epoch is iterated)."""
        self._dl = None

    def indices(self) -> np.ndarray:
        return shard_indices(len(self.dataset), self.epoch, self.seed, self.train, self.shard_id, self.num_shards)

    def __len__(self) -> int:
        n = len(self.indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iterate()

    def iterate(self, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """The epoch's batches from batch ``start_batch`` on (resuming mid-epoch decodes nothing it skips)."""
        self._sampler.keys = [(self.epoch, int(i)) for i in self.indices()[start_batch * self.batch_size :]]
        dl = self._dl if self.persistent else None
        if dl is None:
            dl = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=self._sampler,
                num_workers=self.num_workers,
                drop_last=self.drop_last,
                persistent_workers=self.persistent,
                collate_fn=_as_batch,
                pin_memory=self.pin_memory,
                prefetch_factor=2 if self.num_workers else None,
                multiprocessing_context=context() if self.num_workers else None,
                timeout=self.timeout_s,
                # own generator: a DataLoader draws its base seed from the global RNG otherwise, which would shift the
                # model's dropout stream and break exact resumption (per-sample randomness comes from sample_rng)
                generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch),
            )
            self._dl = dl if self.persistent else None
        try:
            yield from self._count_failures(dl)
        except SampleError as e:  # from a worker, its message wrapped in the worker's traceback: keep the reason
            reason = re.sub(r"^[\w.]*SampleError: ", "", str(e).strip().splitlines()[-1])
            raise LoaderError(f"data loading stopped: {reason}") from None
        except RuntimeError as e:
            if self.timeout_s <= 0 or "DataLoader timed out" not in str(e):
                raise
            raise LoaderError(f"data loading stopped: {self.stuck()}") from None

    def stuck(self) -> str:
        """What the workers are doing, for the message of a batch that did not come within ``data.batch_timeout_s``."""
        now = int(time.time() * 1000)
        busy = self.dataset.busy
        rows = [] if busy is None else [(w, *map(int, busy[w])) for w in range(len(busy)) if int(busy[w, 0]) >= 0]
        head = f"no batch came within data.batch_timeout_s={self.timeout_s:g} s"
        if not rows:
            return f"{head}, and no worker is reading a file (they are starting up, or stuck outside decoding)"
        rows.sort(key=lambda r: r[2])  # the longest-busy worker first: the one the batch waits for
        said = [
            f"worker {w} (pid {pid}) has been reading {self.dataset.records[row]['path']} (manifest row {row}) for "
            f"{(now - since) / 1000:.0f} s"
            for w, row, since, pid in rows
        ]
        return f"{head}: {'; '.join(said)}"

    def _count_failures(self, dl: Any) -> Iterator[dict[str, Any]]:
        for batch in dl:
            n_fail = int(batch["failures"].sum())
            if n_fail:
                self.failures += n_fail
                log.warning("%d sample(s) replaced in this batch (%d so far)", n_fail, self.failures)
            yield batch
