"""Log-mel against an independent float64 numpy computation, and SpecAugment masks."""

import numpy as np
import pytest
import torch

from avmt.data.audio import MelSpec, log_mel, mel_filter_bank, spec_augment


def numpy_log_mel(wave: np.ndarray, sr: int, n_fft: int, hop: int, n_mels: int, frames: int) -> np.ndarray:
    """The documented formula, written independently in float64 numpy (explicit framing + rfft)."""
    pad = n_fft // 2
    x = np.pad(wave, (pad, pad), mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    spec = np.stack([np.abs(np.fft.rfft(x[i * hop : i * hop + n_fft] * win)) ** 2 for i in range(frames)], axis=1)

    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def inv(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    pts = inv(np.linspace(mel(0.0), mel(sr / 2), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    fb = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        lo, mid, hi = pts[m], pts[m + 1], pts[m + 2]
        fb[m] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    return np.log(1e-6 + fb @ spec)


@pytest.mark.parametrize("sr,seconds,n_mels,frames", [(16000, 1.3, 23, 37), (22050, 0.5, 40, 19)])
def test_log_mel_matches_float64_numpy(sr, seconds, n_mels, frames):
    spec = MelSpec.for_clip(sr, seconds, n_mels, frames)
    rng = np.random.default_rng(sr)
    t = np.arange(spec.num_samples) / sr
    waves = np.stack([0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + rng.normal(0, 0.05, t.size) for _ in range(3)])
    ref = np.stack([numpy_log_mel(w, sr, spec.n_fft, spec.hop, n_mels, frames) for w in waves])
    got64 = log_mel(torch.from_numpy(waves), spec).numpy()
    np.testing.assert_allclose(got64, ref, atol=1e-9, rtol=1e-9)
    got32 = log_mel(torch.from_numpy(waves).float(), spec)
    assert got32.shape == (3, n_mels, frames) and got32.dtype == torch.float32
    assert np.abs(got32.numpy() - ref).max() < 2e-3


def test_paper_geometry_and_batched_shape():
    spec = MelSpec.for_clip(44100, 2.0, 80, 128)
    assert (spec.num_samples, spec.hop, spec.n_fft) == (88200, 694, 2048)
    fb = mel_filter_bank(spec.n_fft, 44100, 80)
    assert fb.shape == (80, 1025) and (fb >= 0).all() and (fb.sum(1) > 0).all()  # no empty filter
    wave = torch.randn(2, 3, spec.num_samples) * 0.1
    out = log_mel(wave, spec, fb)
    assert out.shape == (2, 3, 80, 128)
    for chunk in (2, 3, 4):  # in pieces (the CPU loader's): 2 and 3 split the 6 windows, 4 does not
        torch.testing.assert_close(log_mel(wave, spec, fb, chunk=chunk), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="88200"):
        log_mel(torch.randn(2, 1000), spec)
    with pytest.raises(ValueError, match="at least 2"):
        log_mel(wave, spec, fb, chunk=1)


def test_log_mel_in_pieces_does_not_depend_on_the_thread_count():
    """What a loader worker (one thread) computes is what the main process (all threads) would: bit for bit."""
    spec = MelSpec.for_clip(16000, 1.0, 40, 32)
    wave = torch.randn(7, spec.num_samples)
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (max(2, threads), 1):
            torch.set_num_threads(n)
            got.append(log_mel(wave, spec, chunk=3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], got[1])


def test_spec_augment_masks_are_bounded_and_reproducible():
    mel = torch.randn(50, 40, 30)
    out = spec_augment(mel, 0.1, torch.Generator().manual_seed(3))
    again = spec_augment(mel, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    changed = out != mel
    rows = changed.all(dim=2).sum(dim=1)  # fully masked frequency rows per spectrogram
    cols = changed.all(dim=1).sum(dim=1)  # fully masked time columns
    assert rows.max() <= 4 and cols.max() <= 3  # floor(0.1 * 40), floor(0.1 * 30)
    assert (rows > 0).any() and (cols > 0).any()
    mean = mel.mean(dim=(1, 2), keepdim=True).expand_as(mel)
    assert torch.equal(out[changed], mean[changed])
    assert torch.equal(spec_augment(mel, 0.0, torch.Generator().manual_seed(0)), mel)
