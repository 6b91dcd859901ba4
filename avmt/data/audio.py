"""Log-mel spectrograms in pure torch (``torch.stft`` + our own mel filter bank) and SpecAugment masks.

torchaudio does not work with the CPU torch of the development machines, so the filter bank is
written here. Everything is a batched tensor op, so the same code runs on CPU and GPU tensors.

Layout per clip: a window of ``N = round(clip_seconds * sample_rate)`` mono samples becomes
``[n_mels, mel_frames]`` with a centred STFT (reflect padding), hop ``N // (mel_frames - 1)`` (the
largest hop that still yields ``mel_frames`` frames; extra frames are dropped), a periodic Hann window
of ``n_fft`` = the next power of two >= 2 * hop, the power spectrum, a triangular HTK-mel filter bank
over [0, sample_rate / 2] without area normalisation, and ``log(1e-6 + mel)``. Paper preset: 2 s at
44.1 kHz = 88200 samples, hop 694, n_fft 2048 -> 80 x 128.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_EPS = 1e-6


def hz_to_mel(f: Tensor | float) -> Tensor:
    """HTK mel scale: ``2595 * log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filter_bank(
    n_fft: int,
    sample_rate: int,
    n_mels: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Triangular HTK-mel filters ``[n_mels, n_fft // 2 + 1]``: filter m rises linearly from mel point m to
    m+1 and falls to m+2, where the ``n_mels + 2`` points are evenly spaced in mel over [f_min, f_max]."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"mel band [{f_min}, {f_max}] Hz is invalid: expected 0 <= f_min < f_max <= sample_rate/2={sample_rate / 2}")
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    pts = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2, dtype=torch.float64))
    lo, mid, hi = pts[:-2, None], pts[1:-1, None], pts[2:, None]
    up = (freqs - lo) / (mid - lo)
    down = (hi - freqs) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0).to(dtype=dtype, device=device)


@dataclass(frozen=True)
class MelSpec:
    """STFT/mel geometry for clip windows of ``num_samples`` samples (see the module docstring)."""

    sample_rate: int
    num_samples: int
    n_mels: int
    mel_frames: int
    hop: int
    n_fft: int

    @classmethod
    def for_clip(cls, sample_rate: int, clip_seconds: float, n_mels: int, mel_frames: int) -> MelSpec:
        n = int(round(clip_seconds * sample_rate))
        if mel_frames < 2 or n < mel_frames:
            raise ValueError(f"cannot make {mel_frames} mel frames from {n} samples ({clip_seconds} s at {sample_rate} Hz)")
        hop = n // (mel_frames - 1)
        n_fft = 1 << max(1, math.ceil(math.log2(2 * hop)))
        return cls(sample_rate, n, n_mels, mel_frames, hop, n_fft)


def log_mel(wave: Tensor, spec: MelSpec, fbank: Tensor | None = None, chunk: int | None = None) -> Tensor:
    """``wave [..., num_samples]`` float -> log-mel ``[..., n_mels, mel_frames]`` in the dtype of ``wave``.

    ``fbank`` (``[n_mels, n_fft//2+1]``, from :func:`mel_filter_bank`) may be passed to avoid rebuilding it.
    ``chunk``: transform the windows in pieces of ``chunk`` to ``2 * chunk - 1`` (the CPU loader: a paper sequence's
    15 windows at once need ~50 MB of STFT buffers, which the allocator maps and faults in anew for every sequence;
    3 at a time stay in the heap and the cache). None: all at once (on a GPU). ``chunk >= 2``, so that no piece is
    a single window when there are more: a single window's mel projection is a plain matrix product, whose float32
    sums depend on the thread count, and a worker (one thread) must give the bytes the main process would.
    """
    if wave.shape[-1] != spec.num_samples:
        raise ValueError(f"audio windows have {wave.shape[-1]} samples, expected {spec.num_samples}")
    lead = wave.shape[:-1]
    flat = wave.reshape(-1, spec.num_samples)
    if chunk is not None and chunk < 2:
        raise ValueError(f"chunk={chunk}: pieces must hold at least 2 windows")
    if fbank is None:
        fbank = mel_filter_bank(spec.n_fft, spec.sample_rate, spec.n_mels, dtype=wave.dtype, device=wave.device)
    if chunk is not None and flat.shape[0] >= 2 * chunk:
        parts = [log_mel(piece, spec, fbank) for piece in torch.tensor_split(flat, flat.shape[0] // chunk)]
        return torch.cat(parts).reshape(*lead, spec.n_mels, spec.mel_frames)
    window = torch.hann_window(spec.n_fft, periodic=True, dtype=wave.dtype, device=wave.device)
    stft = torch.stft(flat, spec.n_fft, hop_length=spec.hop, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = stft.real.square() + stft.imag.square()  # [N, n_fft//2+1, frames]
    mel = torch.matmul(fbank, power[..., : spec.mel_frames])
    return torch.log(LOG_EPS + mel).reshape(*lead, spec.n_mels, spec.mel_frames)


def spec_augment(mel: Tensor, max_rate: float, generator: torch.Generator | None = None) -> Tensor:
    """One frequency mask and one time mask per spectrogram, each of width uniform in
    ``[0, floor(max_rate * size)]`` at a uniform position; masked cells get that spectrogram's mean.

    ``mel [..., n_mels, frames]`` -> same shape (a new tensor). Random draws use ``generator`` on the CPU
    and are moved to ``mel``'s device, so results are reproducible across devices.
    """
    *lead, n_f, n_t = mel.shape
    flat = mel.reshape(-1, n_f, n_t)
    b = flat.shape[0]

    def band(size: int) -> Tensor:
        width_max = int(max_rate * size)
        width = torch.randint(0, width_max + 1, (b,), generator=generator)
        start = (torch.rand(b, generator=generator) * (size - width + 1)).long()
        pos = torch.arange(size)
        return ((pos >= start[:, None]) & (pos < (start + width)[:, None])).to(mel.device)  # [b, size]

    mask = band(n_f)[:, :, None] | band(n_t)[:, None, :]
    mean = flat.mean(dim=(1, 2), keepdim=True)
    return torch.where(mask, mean, flat).reshape(*lead, n_f, n_t)
