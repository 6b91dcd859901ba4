"""The DALI loader: video decoded by DALI (NVDEC on a GPU), spatial augmentation in the DALI graph,
log-mel and SpecAugment as batched torch ops on the same device. Same batch contract as
:mod:`avmt.data.loader_cpu` (see there), minus ``failures`` (counted on the loader instead).

Graph (``device_id`` = a GPU index: decode ``mixed`` -> GPU; ``device_id=None``: everything on the CPU)::

    external_source (host) -> encoded file bytes [n] uint8, frame indices [T*F] int32,
                              resize (h, w), crop position, flip, audio windows [T, N] float32, label, index
    fn.decoders.video(bytes, frames=indices)          -> [T*F, H, W, 3] uint8     (FHWC)
    fn.resize(resize_y=h, resize_x=w, antialias)      -> [T*F, h, w, 3]
    fn.crop_mirror_normalize(crop, pos, mirror, dtype=UINT8, output_layout=CFHW) -> [3, T*F, crop, crop] uint8
    torch: reshape to [T, 3, F, crop, crop]; log_mel(audio) (+ spec_augment in train) -> [T, 1, n_mels, mel_frames]

The decoded frames never leave the device: DALI outputs are copied device-to-device into torch tensors
(``feed_ndarray``). The host only reads the file bytes and the audio windows (from the side-car:
DALI's audio decoder decodes whole files, wasteful for long videos; the window is small). The sequence
and crop plans come from the same functions and the same seeded generators as the CPU loader, so in
eval mode both loaders return the same content up to decoder/resize differences.

DALI's CPU decoder (``device_id=None``) has no H.264 decoder in the PyPI wheel: use VP9/webm there.

Failures: a sample whose bytes or audio cannot be read on the host is logged, counted and replaced by
another manifest row before it enters the graph. A decode error inside DALI fails the whole batch: it is
logged, the batch (and any batch DALI had already prefetched) is dropped and its samples counted in
``failures``, the pipeline is rebuilt and continues with the following batches, so that epoch is shorter.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avmt.config import DataConfig
from avmt.data.audio import MelSpec, log_mel, mel_filter_bank, spec_augment
from avmt.data.clips import View, shard_indices
from avmt.data.manifest import MODALITIES, load_manifest
from avmt.data.sample import SampleError, load_audio_clips, load_with_retries, plan_sample

log = logging.getLogger("avmt.data")


class _Source:
    """Host side of the pipeline: yields per-batch lists for ``fn.external_source``, epoch after epoch, from
    batch ``batch`` of epoch ``epoch`` on.

    Epoch ``e`` covers this shard's indices for ``e`` (shuffled in train mode) in batches of ``batch_size``
    (the last one smaller, or dropped with ``drop_last``). DALI prefetches, so the source runs ahead of the
    caller: ``pending`` tags every batch handed to DALI and not yet returned, in order."""

    def __init__(self, loader: DALILoader, epoch: int, batch: int):
        self.loader = loader
        self.epoch, self.batch = epoch, batch  # the next batch to hand to DALI
        self.pending: deque[tuple[int, int, int]] = deque()  # (epoch, batch, samples) handed, not yet returned
        self._indices: tuple[int, np.ndarray] | None = None  # this epoch's shard indices (one permutation per epoch)

    def position(self) -> tuple[int, int]:
        """(epoch, batch) of the next batch the caller will receive."""
        if self.pending:
            return self.pending[0][:2]
        if self.batch >= len(self.loader):
            return self.epoch + 1, 0
        return self.epoch, self.batch

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        L = self.loader
        if self.batch >= len(L):
            self.epoch, self.batch = self.epoch + 1, 0
        if self._indices is None or self._indices[0] != self.epoch:
            self._indices = (self.epoch, L.indices(self.epoch))
        batch = self._indices[1][self.batch * L.batch_size : (self.batch + 1) * L.batch_size]
        self.pending.append((self.epoch, self.batch, len(batch)))
        self.batch += 1
        cols: tuple[list[np.ndarray], ...] = tuple([] for _ in range(8))
        for i in batch:
            sample = L.host_sample(int(i), self.epoch)
            for c, v in zip(cols, sample):
                c.append(v)
        return cols


class DALILoader:
    """Iterate batches from a prepared manifest with a DALI pipeline (see the module docstring).

    ``device_id``: CUDA device for decoding and augmentation, or None for DALI's CPU backend.
    ``shard_id``/``num_shards``: DDP sharding as in :func:`avmt.data.clips.shard_indices`.
    ``len(loader)`` batches per epoch (only full ones with ``drop_last``). Iterating the loader yields the
    current epoch from its first batch and then advances ``epoch`` by itself, so ``for batch in loader`` twice
    gives two epochs. :meth:`set_epoch` + :meth:`iterate` give the CPU loader's interface: ``iterate(k)``
    starts at batch ``k`` of that epoch (resume), rebuilding the pipeline only when the requested batch is not
    where its prefetched stream continues (the first call, a resume, a jump); consecutive epochs stream on.
    """

    def __init__(
        self,
        manifest: str | Path | Sequence[dict],
        cfg: DataConfig,
        batch_size: int,
        train: bool,
        seed: int = 0,
        device_id: int | None = None,
        shard_id: int = 0,
        num_shards: int = 1,
        num_threads: int = 2,
        prefetch: int = 2,
        max_retries: int = 10,
        drop_last: bool = False,
        modalities: Sequence[str] = MODALITIES,
        view: View | None = None,
    ):
        if "video" not in modalities:
            raise ValueError("the DALI loader decodes video; for audio alone use the CPU loader (build_loader does)")
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise ImportError("the DALI loader needs nvidia-dali-cuda130: pip install 'avmt[dali]'") from e
        self.records = list(manifest) if not isinstance(manifest, (str, Path)) else load_manifest(manifest)
        self.cfg, self.batch_size, self.train, self.seed = cfg, batch_size, train, seed
        self.device_id, self.shard_id, self.num_shards = device_id, shard_id, num_shards
        self.num_threads, self.prefetch, self.max_retries, self.drop_last = num_threads, prefetch, max_retries, drop_last
        self.modalities, self.view = tuple(modalities), view
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.mel = MelSpec.for_clip(cfg.sample_rate, cfg.clip_seconds, cfg.n_mels, cfg.mel_frames)
        self.fbank = mel_filter_bank(self.mel.n_fft, cfg.sample_rate, cfg.n_mels)  # moved to the device on first use
        self.failures = 0
        self.epoch = 0
        self._shard_size = len(self.indices(0))  # the same every epoch (shard_indices pads every rank equally)
        self._pipe = None
        self._source: _Source | None = None

    # -- host side ---------------------------------------------------------------------------------
    def indices(self, epoch: int) -> np.ndarray:
        return shard_indices(len(self.records), epoch, self.seed, self.train, self.shard_id, self.num_shards)

    def __len__(self) -> int:
        n = self._shard_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch :meth:`iterate` reads (the CPU loader's interface)."""
        self.epoch = epoch

    def host_sample(self, i: int, epoch: int) -> tuple[np.ndarray, ...]:
        """Everything the graph needs for row ``i``, replacing failing rows (logged and counted)."""
        try:
            out, failed = load_with_retries(
                lambda idx, rng: self._host_load(idx, rng), i, self.records, self.seed, epoch, self.train, self.max_retries
            )
        except SampleError:
            self.failures += self.max_retries
            raise
        self.failures += failed
        return out

    def _host_load(self, idx: int, rng: np.random.Generator | None) -> tuple[np.ndarray, ...]:
        rec = self.records[idx]
        seq, crop = plan_sample(rec, self.cfg, self.train, rng, self.view)
        data = np.fromfile(rec["path"], dtype=np.uint8)
        if data.size == 0:
            raise ValueError("empty file")
        # without audio in the batch, a [T, 1] placeholder keeps the graph's inputs fixed; it is never turned into a batch
        if "audio" in self.modalities:
            audio = load_audio_clips(rec, seq, self.cfg.sample_rate)
        else:
            audio = np.zeros((len(seq.audio_starts), 1), np.float32)
        aug_seed = int(rng.integers(2**62)) if rng is not None else 0
        h, w = crop.size
        pos_y = crop.top / (h - crop.crop) if h > crop.crop else 0.0
        pos_x = crop.left / (w - crop.crop) if w > crop.crop else 0.0
        return (
            data,
            seq.frame_indices.reshape(-1).astype(np.int32),
            np.array([h, w], np.float32),
            np.array([pos_y, pos_x], np.float32),
            np.array(int(crop.flip), np.int32),
            audio,
            np.array(rec["label_index"], np.int64),
            np.array([idx, aug_seed], np.int64),
        )

    # -- the DALI graph ----------------------------------------------------------------------------
    def construct(self) -> Any:
        """Define the DALI graph and return the (unbuilt) pipeline. Needs no GPU even for ``device_id`` set,
        so the GPU graph's operators and arguments are checked on any machine; :meth:`build` needs CUDA."""
        from nvidia.dali import fn, pipeline_def, types

        cfg = self.cfg
        gpu = self.device_id is not None

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
            seed=self.seed,
            exec_dynamic=True,
        )
        def graph():
            enc, frames, size, pos, flip, audio, label, index = fn.external_source(
                source=self._source, num_outputs=8, batch=True, parallel=False, layout=[None, None, None, None, None, None, None, None]
            )
            video = fn.decoders.video(enc, device="mixed" if gpu else "cpu", frames=frames)  # FHWC uint8
            video = fn.resize(video, resize_y=size[0], resize_x=size[1], interp_type=types.INTERP_LINEAR, antialias=True)
            video = fn.crop_mirror_normalize(  # crop, flip and transpose only: uint8 out, normalised by the model
                video,
                crop_h=cfg.crop_size,
                crop_w=cfg.crop_size,
                crop_pos_y=pos[0],
                crop_pos_x=pos[1],
                mirror=flip,
                dtype=types.UINT8,
                output_layout="CFHW",
            )
            if gpu:
                audio = audio.gpu()
            return video, audio, label, index

        if self._source is None:  # a rebuilt pipeline continues where the previous source stopped
            self._source = _Source(self, self.epoch, 0)
        return graph()

    def build(self) -> None:
        """Construct and build the pipeline (done by the first iteration)."""
        pipe = self.construct()
        pipe.build()
        self._pipe = pipe
        self.fbank = self.fbank.to(self.device)

    def close(self) -> None:
        """Free the pipeline and its threads now (the next iteration rebuilds it). DALI keeps prefetching the
        following batches in its own threads, which read files with PyAV: a process that forks while one of
        them holds a lock (a ``fork``-started worker pool, ``DataLoader`` workers) can deadlock in the child,
        so close a loader you are done with instead of waiting for the garbage collector."""
        self._pipe, self._source = None, None
        import gc

        gc.collect()  # the pipeline's callback refers back to this loader: a reference cycle

    def _to_torch(self, out: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = out.as_tensor()
        if self.device_id is None:
            return torch.from_numpy(np.array(t))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dst = torch.empty(t.shape(), dtype=dtype, device=self.device)
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
        return dst

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iterate(0)

    def iterate(self, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``start_batch``.. of epoch ``self.epoch``; after its last batch ``self.epoch`` advances by one.

        A decode error inside DALI loses the failed batch and the ones DALI had prefetched: they are counted in
        ``failures`` and that epoch is shorter (a lost batch of the next epoch is re-read when that epoch starts,
        since the pipeline is then rebuilt at its first batch)."""
        if start_batch >= len(self):
            return
        want = (self.epoch, start_batch)
        if self._source is None or self._source.position() != want:
            self._source, self._pipe = _Source(self, *want), None  # drop whatever the old pipeline prefetched
        if self._pipe is None:
            self.build()
        cfg = self.cfg
        while self._source.position()[0] == want[0]:
            try:
                video_o, audio_o, label_o, index_o = self._pipe.run()
            except Exception as e:
                lost = sum(n for _, _, n in self._source.pending)  # the failed batch and any prefetched ones
                self.failures += lost
                self._source.pending.clear()
                log.warning(
                    "DALI batch failed (%s: %s); %d sample(s) dropped and counted as failed, rebuilding the pipeline",
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                    lost,
                )
                self._pipe = None
                self.build()
                continue
            self._source.pending.popleft()
            b = len(label_o)
            video = self._to_torch(video_o, torch.uint8)  # [B, 3, T*F, c, c] uint8
            video = video.reshape(b, 3, cfg.num_clips, cfg.frames, cfg.crop_size, cfg.crop_size).permute(0, 2, 1, 3, 4, 5)
            idx_seed = np.array(index_o.as_tensor())
            batch = {
                "video": video.contiguous(),
                "label": torch.from_numpy(np.array(label_o.as_tensor())).reshape(b),
                "index": torch.from_numpy(idx_seed[:, 0].copy()),
            }
            if "audio" in self.modalities:
                wave = self._to_torch(audio_o).to(self.device)  # [B, T, N]
                audio = log_mel(wave, self.mel, self.fbank)
                if self.train and cfg.spec_mask_rate > 0:
                    gen = torch.Generator().manual_seed(int(idx_seed[:, 1].sum() % (2**62)))
                    audio = spec_augment(audio, cfg.spec_mask_rate, gen)
                batch["audio"] = audio.unsqueeze(2)
            yield batch
        self.epoch = want[0] + 1
