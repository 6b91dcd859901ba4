import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from avmt.config import load_config
from avmt.models import AVBert, LowRankLinear
from avmt.objectives import Pretraining, choose_masked, gather_pool, swap_permutation


def test_swap_permutation_is_a_partial_derangement():
    swapped = []
    for seed in range(200):
        perm = swap_permutation(8, 0.5, torch.Generator().manual_seed(seed))
        assert sorted(perm.tolist()) == list(range(8))
        moved = perm != torch.arange(8)
        assert moved.sum() != 1  # a swapped sample never keeps its own audio, so never exactly one moves
        swapped.append(moved.float().mean())
    assert 0.4 < torch.stack(swapped).mean() < 0.6
    assert swap_permutation(1, 0.5, None).tolist() == [0]
    assert (swap_permutation(4, 1.0, torch.Generator().manual_seed(0)) != torch.arange(4)).all()


def test_choose_masked_counts_and_padding():
    valid = torch.tensor([[True] * 15, [True] * 4 + [False] * 11, [True] + [False] * 14])
    for seed in range(20):
        m = choose_masked(valid, 0.15, torch.Generator().manual_seed(seed))
        assert m.sum(1).tolist() == [2, 1, 1]  # round(0.15 * n), at least one
        assert not (m & ~valid).any()


def test_mask_rule_frequencies():
    cfg = load_config("tiny")
    pre = Pretraining(AVBert(cfg.model), cfg.objective)
    tokens = torch.randn(64, 10, cfg.model.dim)
    valid = torch.ones(64, 10, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    kinds = torch.zeros(3)
    for _ in range(30):
        out, masked = pre.mask_tokens(tokens, valid, "visual", g)
        changed = (out != tokens).any(-1)
        assert not (changed & ~masked).any()
        is_mask = (out == pre.mask_embedding["visual"].detach()).all(-1) & masked
        kinds += torch.tensor([is_mask.sum(), (changed & ~is_mask).sum(), (masked & ~changed).sum()])
    share = kinds / kinds.sum()
    assert abs(share[0] - 0.8) < 0.04 and abs(share[1] - 0.1) < 0.03 and abs(share[2] - 0.1) < 0.03


def batch(cfg, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, t = cfg.data, cfg.data.num_clips
    return torch.randn(b, t, 3, d.frames, d.crop_size, d.crop_size, generator=g), torch.randn(b, t, 1, d.n_mels, d.mel_frames, generator=g)


@pytest.mark.parametrize("fusion, sharing", [("mid", "lowrank"), ("mid", "none"), ("late", "all"), ("early", "layers")])
def test_losses_are_finite_and_gradients_reach_every_part(fusion, sharing):
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=[f"model.fusion={fusion}", f"model.sharing={sharing}", "model.zero_init_residual=false"])
    model = AVBert(cfg.model)
    pre = Pretraining(model, cfg.objective)
    out = pre(*batch(cfg, 6), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    expected = {"cpp_loss", "cpp_acc", "loss"} | ({"mep_visual_loss", "mep_audio_loss"} if fusion != "early" else set())
    expected |= {"mep_multimodal_loss"} if fusion != "late" else set()
    assert expected <= set(out.metrics)
    out.loss.backward()
    for name in ("visual_cnn", "audio_cnn"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters()), name
    for transformer in model.transformers:  # every Transformer's layers get a gradient through its own group
        group = model.transformers.index(transformer)
        for layer in model.transformer_layers(transformer):
            q = layer.query
            grad = q.V.grad[group] if isinstance(q, LowRankLinear) else q.weight.grad
            assert grad is not None and grad.abs().sum() > 0, transformer
    assert pre.mask_embedding["visual"].grad.abs().sum() > 0


def test_variable_clips_and_swaps():
    cfg = load_config("tiny", overrides=["data.num_clips=5", "data.window_seconds=10"])
    pre = Pretraining(AVBert(cfg.model), cfg.objective)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [True] * 4 + [False], [True] * 5])
    out = pre(*batch(cfg, 4), clip_mask=mask, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_a_few_hundred_steps_learn_mep_and_cpp():
    """A toy batch whose audio and video share a per-sample latent: MEP and CPP must get well above chance."""
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=["model.dropout=0", "model.attention_dropout=0"])
    pre = Pretraining(AVBert(cfg.model), cfg.objective)
    d, b, t = cfg.data, 8, cfg.data.num_clips
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(b, 1, 8, generator=g) + 0.5 * torch.randn(b, t, 8, generator=g)
    video = (latent @ torch.randn(8, 3 * d.frames * d.crop_size**2, generator=g)).view(b, t, 3, d.frames, d.crop_size, d.crop_size)
    audio = (latent @ torch.randn(8, d.n_mels * d.mel_frames, generator=g)).view(b, t, 1, d.n_mels, d.mel_frames)
    video, audio = video + 0.5 * torch.randn_like(video), audio + 0.5 * torch.randn_like(audio)
    opt = torch.optim.AdamW(pre.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1e-4, amsgrad=True)
    for _ in range(300):
        out = pre(video, audio, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():  # fresh masks and swaps; chance: MEP 1/32 (31 candidates), CPP 1/2
        evals = [pre(video, audio, generator=torch.Generator().manual_seed(100 + i)).metrics for i in range(10)]
    mean = {k: torch.stack([e[k] for e in evals]).mean().item() for k in evals[0]}
    assert min(mean["mep_visual_acc"], mean["mep_audio_acc"], mean["mep_multimodal_acc"]) > 0.25, mean  # 8x chance
    assert mean["cpp_acc"] > 0.7, mean


def _ddp_worker(rank: int, port: int, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        local = torch.full((3 + rank, 2), float(rank + 1), requires_grad=True)  # ranks differ in row count
        pool, offset = gather_pool(local)
        pool.sum().backward()
        result[rank] = (pool.detach().clone(), offset, local.grad.clone())
    finally:
        dist.destroy_process_group()


def test_gathered_pool_holds_both_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, result), nprocs=2, join=True)
    want = torch.cat([torch.full((3, 2), 1.0), torch.full((4, 2), 2.0)])
    for rank in (0, 1):
        pool, offset, grad = result[rank]
        torch.testing.assert_close(pool, want)
        assert offset == (0 if rank == 0 else 3)
        torch.testing.assert_close(grad, torch.ones(3 + rank, 2))  # this rank's rows keep their gradient
