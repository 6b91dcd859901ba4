import copy
import itertools

import pytest
import torch

from avmt.bench import random_clips
from avmt.config import ConfigError, load_config
from avmt.models import AVBert, LowRankLinear, TransformerLayer
from avmt.models.avbert import CNNRunner, _choose_clips

COMBOS = [
    (s, f)
    for f, s in itertools.product(("mid", "late", "early"), ("none", "layers", "all", "lowrank"))
    if not (f == "early" and s in ("all", "lowrank"))
]


def tiny(*overrides):
    return load_config("tiny", overrides=list(overrides))


def inputs(cfg, b=2, t=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = cfg.data
    t = t or d.num_clips
    video = torch.randn(b, t, 3, d.frames, d.crop_size, d.crop_size, generator=g)
    audio = torch.randn(b, t, 1, d.n_mels, d.mel_frames, generator=g)
    return video, audio


@pytest.mark.parametrize("sharing, fusion", COMBOS)
def test_forward_backward_every_scheme_and_fusion(sharing, fusion):
    torch.manual_seed(0)
    cfg = tiny(f"model.sharing={sharing}", f"model.fusion={fusion}", "model.zero_init_residual=false")
    model = AVBert(cfg.model).train()
    b, t, d = 3, cfg.data.num_clips, cfg.model.dim
    out = model(*inputs(cfg, b))
    assert out.visual_features.shape == (b, t, 32 * cfg.model.visual_width)
    assert out.audio_features.shape == (b, t, 32 * cfg.model.audio_width)
    assert out.visual_embeddings.shape == out.audio_embeddings.shape == (b, t, d)
    if fusion == "early":
        assert out.visual is None and out.audio is None
    else:
        assert out.visual.shape == out.audio.shape == (b, 1 + t, d)
    if fusion == "late":
        assert out.multimodal is None
    else:
        assert out.multimodal.shape == (b, 2 * (1 + t), d)
    results = [x for x in (out.visual, out.audio, out.multimodal) if x is not None]
    assert all(torch.isfinite(x).all() for x in results)
    # a loss on the Transformer outputs only: gradients must still reach every parameter, CNNs included
    loss = sum((x * torch.randn_like(x)).sum() for x in results)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_sharing_uses_the_same_tensors():
    def layers(sharing):
        m = AVBert(tiny(f"model.sharing={sharing}").model)
        return m, {n: m.transformer_layers(n) for n in ("visual", "audio", "multimodal")}

    m, by = layers("none")
    assert len({id(layer) for ls in by.values() for layer in ls}) == 3 * m.cfg.layers
    m, by = layers("layers")
    for ls in by.values():
        assert all(layer is ls[0] for layer in ls)
    assert len({id(ls[0]) for ls in by.values()}) == 3
    for scheme in ("all", "lowrank"):
        m, by = layers(scheme)
        first = by["visual"][0]
        assert all(layer is first for ls in by.values() for layer in ls) and len(m.layers) == 1
    # lowrank: one U per map; V and A hold one slice per modality group
    q = m.layers[0].query
    assert isinstance(q, LowRankLinear) and q.V.shape[0] == q.A.shape[0] == 3
    # no tensor appears twice in the state dict (safe for safetensors, no duplicated checkpoint bytes)
    ptrs = [t.data_ptr() for t in m.state_dict().values() if t.numel()]
    assert len(ptrs) == len(set(ptrs))


def test_rotations_are_materialised_once_per_forward(monkeypatch):
    model = AVBert(tiny("model.sharing=lowrank").model)
    calls = []
    original = LowRankLinear.rotations

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(LowRankLinear, "rotations", counting)
    model(*inputs(load_config("tiny")))
    maps = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(maps) == 6  # Q, K, V, attention output, FFN in, FFN out of the single shared layer
    # 6 maps x 2 layers x 3 Transformers = 36 applications, but each map's R_m is computed once
    assert len(calls) == len(maps) and {id(c) for c in calls} == {id(m) for m in maps}
    # a layer called alone, without a cache, still computes its rotations itself
    calls.clear()
    model.layers[0](torch.randn(2, 5, model.cfg.dim), 1)
    assert len(calls) == 6


@pytest.mark.parametrize("sharing, fusion", [("lowrank", "mid"), ("none", "early"), ("all", "late")])
def test_padded_clips_do_not_change_real_outputs(sharing, fusion):
    torch.manual_seed(1)
    cfg = tiny(f"model.sharing={sharing}", f"model.fusion={fusion}", "data.num_clips=5", "data.window_seconds=10")
    model = AVBert(cfg.model).eval()  # eval: no dropout, BatchNorm uses running statistics
    video, audio = inputs(cfg, b=2, t=5)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = model(video, audio, mask)
    alone = model(video[1:, :2], audio[1:, :2])
    t = 2
    if out.visual is not None:
        torch.testing.assert_close(out.visual[1, : 1 + t], alone.visual[0])
        torch.testing.assert_close(out.audio[1, : 1 + t], alone.audio[0])
    if out.multimodal is not None:
        mm = out.multimodal[1]
        torch.testing.assert_close(torch.cat([mm[: 1 + t], mm[6 : 6 + 1 + t]]), alone.multimodal[0])
    torch.testing.assert_close(out.visual_embeddings[1, :t], alone.visual_embeddings[0])
    assert (out.visual_features[1, t:] == 0).all() and (out.audio_embeddings[1, t:] == 0).all()
    # the full sample is unaffected by its padded neighbour
    first = model(video[:1], audio[:1])
    for name in ("visual", "audio", "multimodal"):
        if getattr(out, name) is not None:
            torch.testing.assert_close(getattr(out, name)[:1], getattr(first, name))


def test_up_to_max_clips():
    cfg = tiny("model.max_clips=64", "data.num_clips=4")
    model = AVBert(cfg.model).eval()
    with torch.no_grad():
        out = model(*inputs(cfg, b=1, t=64))
    assert out.multimodal.shape == (1, 2 * 65, cfg.model.dim)
    with pytest.raises(ValueError, match=r"T=65 clips; this model accepts 1..64 \(model.max_clips\)"):
        model(*inputs(cfg, b=1, t=65))
    assert load_config("paper").model.max_clips >= 64


def test_bad_inputs_raise_clear_errors():
    cfg = tiny()
    model = AVBert(cfg.model)
    video, audio = inputs(cfg)
    with pytest.raises(ValueError, match=r"video must be \[B, T, 3, frames, height, width\]"):
        model(video[:, :, :2], audio)
    with pytest.raises(ValueError, match=r"audio must be \[B, T, 1, n_mels, frames\]"):
        model(video, audio[:, :, 0])
    with pytest.raises(ValueError, match="same \\[B, T\\]"):
        model(video, audio[:, :3])
    with pytest.raises(ValueError, match="video must be a floating-point tensor or uint8 RGB, got torch.int64"):
        model(video.long(), audio)
    with pytest.raises(ValueError, match="audio must be a floating-point tensor, got torch.uint8"):
        model(video, audio.to(torch.uint8))
    with pytest.raises(ValueError, match="clip_mask must be a bool tensor"):
        model(video, audio, torch.ones(2, 4))
    with pytest.raises(ValueError, match="no real clip"):
        model(video, audio, torch.tensor([[True] * 4, [False] * 4]))
    with pytest.raises(ValueError, match="tokens must both be"):
        model.encode(torch.randn(2, 4, cfg.model.dim), torch.randn(2, 3, cfg.model.dim))


def test_layer_is_post_ln_bert():
    """A hand-written BERT post-LN layer with the same weights gives the same output."""
    torch.manual_seed(0)
    d, h, s = 16, 4, 7
    layer = TransformerLayer(d, h, 24, dropout=0.0, attention_dropout=0.0, ln_eps=1e-12, init_std=0.2).eval()
    x = torch.randn(3, s, d, dtype=torch.float64)
    layer = layer.double()
    q, k, v = (m(x).view(3, s, h, d // h).transpose(1, 2) for m in (layer.query, layer.key, layer.value))
    att = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1) @ v
    hid = layer.attn_norm(x + layer.attn_out(att.transpose(1, 2).reshape(3, s, d)))
    ffn = layer.ffn_out(0.5 * layer.ffn_in(hid) * (1 + torch.erf(layer.ffn_in(hid) / 2**0.5)))
    torch.testing.assert_close(layer(x), layer.ffn_norm(hid + ffn))


def test_feature_batchnorm_spreads_the_clip_tokens():
    # Pooled CNN features share a large common part: without the feature BatchNorm, LayerNorm(Linear(f)) is nearly the
    # same token for every clip at init (the audio-token collapse seen in the small presets' pretraining).
    torch.manual_seed(0)
    video = torch.randn(4, 3, 3, 4, 32, 32)
    audio = torch.randn(1, 1, 1, 32, 32) + 0.1 * torch.randn(4, 3, 1, 32, 32)  # log-mels: mostly a shared floor
    spread = {}
    for norm in ("none", "batchnorm"):
        model = AVBert(load_config("tiny", overrides=[f"model.feature_norm={norm}"]).model)
        _, tokens = model.embed_audio(audio)
        spread[norm] = tokens.flatten(0, 1).std(0).mean().item()  # std across clips, mean over channels
    assert spread["batchnorm"] > 0.9 and spread["batchnorm"] > 2 * spread["none"], spread
    # one clip in training mode has no batch statistics: the running ones are used instead of failing
    model = AVBert(load_config("tiny").model).train()
    assert torch.isfinite(model(video[:1, :1], audio[:1, :1]).multimodal).all()
    with pytest.raises(Exception, match="feature_norm"):
        load_config("tiny", overrides=["model.feature_norm=layernorm"])


# -- per-clip CNNs in chunks, recomputed, or with gradients for some clips only ----------------------------------------
def _tiny_step_state(runner: CNNRunner, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Losses of ``steps`` fp32 pretraining steps of `tiny`, then every gradient and every BatchNorm buffer."""
    from avmt.objectives import Pretraining
    from avmt.optim import build_optimizer

    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = AVBert(cfg.model)
    model.cnn = runner
    pre = Pretraining(model, cfg.objective).train()
    opt = build_optimizer(pre.parameters(), cfg.train)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    video, audio = random_clips(cfg.data, 2, "cpu")
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = pre(video, audio, generator=gen).loss
        loss.backward()
        losses.append(loss.item())
        grads = {k: p.grad.clone() for k, p in pre.named_parameters() if p.grad is not None}
        opt.step()
    buffers = {k: b.clone() for k, b in model.named_buffers() if "running" in k or "num_batches" in k}
    return losses, grads, buffers


def test_cnn_checkpointing_changes_nothing_but_memory():
    """Recomputing each CNN chunk in backward gives the same losses, gradients and BatchNorm running statistics,
    bit for bit (fp32 on CPU, 3 steps); the statistics move once per forward, not again in the recompute."""
    plain = _tiny_step_state(CNNRunner(chunk=3))
    recomputed = _tiny_step_state(CNNRunner(chunk=3, checkpoint=True))
    assert plain[0] == recomputed[0]
    assert plain[1].keys() == recomputed[1].keys() and len(plain[1]) > 50
    assert all(torch.equal(plain[1][k], recomputed[1][k]) for k in plain[1]), "a gradient differs"
    assert all(torch.equal(plain[2][k], recomputed[2][k]) for k in plain[2]), "a BatchNorm buffer differs"
    whole = _tiny_step_state(CNNRunner(checkpoint=True))  # one chunk of every clip, recomputed
    assert whole[0] == _tiny_step_state(CNNRunner())[0]


def test_cnn_chunks_equal_one_call_in_eval_mode():
    # in eval mode BatchNorm uses its running statistics, so chunking cannot change the result
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = AVBert(cfg.model).eval()
    video = torch.randn(2, cfg.data.num_clips, 3, cfg.data.frames, cfg.data.crop_size, cfg.data.crop_size)
    want = model.embed_visual(video)[0]
    model.cnn = CNNRunner(chunk=3)  # 8 clips in chunks of 3, 3, 2
    torch.testing.assert_close(model.embed_visual(video)[0], want, rtol=1e-6, atol=1e-6)


def test_clips_with_grad_back_propagates_through_k_clips_per_sequence():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = AVBert(cfg.model).train()
    t = cfg.data.num_clips
    video = torch.randn(3, t, 3, cfg.data.frames, cfg.data.crop_size, cfg.data.crop_size)
    mask = torch.ones(3, t, dtype=torch.bool)
    mask[2, 1:] = False  # one sequence with a single real clip
    model.cnn = CNNRunner(clips_with_grad=2)
    chosen = _choose_clips(mask, 2, torch.Generator().manual_seed(5))
    assert chosen.sum(1).tolist() == [2, 2, 1] and not (chosen & ~mask).any()
    assert torch.equal(chosen, _choose_clips(mask, 2, torch.Generator().manual_seed(5)))  # seeded
    feats, _ = model.embed_visual(video, mask, torch.Generator().manual_seed(5))
    conv = next(model.visual_cnn.parameters())
    for clip_set, has_grad in ((chosen, True), (mask & ~chosen, False)):
        model.zero_grad(set_to_none=True)
        feats[clip_set].sum().backward(retain_graph=True)
        grad = conv.grad
        assert (grad is not None and grad.abs().sum() > 0) == has_grad
    # K >= T: every clip with gradients, the plain path's values
    model.cnn = CNNRunner(clips_with_grad=t)
    torch.manual_seed(3)
    a = model.embed_visual(video, mask, torch.Generator().manual_seed(5))[0]
    model.cnn = CNNRunner()
    torch.manual_seed(3)
    torch.testing.assert_close(a, model.embed_visual(video, mask)[0], rtol=0, atol=0)


def test_uint8_video_is_normalised_on_the_device_as_the_loaders_used_to():
    """The loaders hand over uint8; the model's (x/255 - 0.45) / 0.225 is the float32 the CPU loader used to make,
    bit for bit, and runs inside each CNN chunk (a recomputed chunk keeps only its uint8 input)."""
    from avmt.models.cnn import normalize_video

    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = AVBert(cfg.model).eval()
    d = cfg.data
    raw = torch.randint(0, 256, (2, d.num_clips, 3, d.frames, d.crop_size, d.crop_size), dtype=torch.uint8)
    old_loader = (raw.float() - torch.tensor(0.45).view(1, 1, 1, 1) * 255) / (torch.tensor(0.225).view(1, 1, 1, 1) * 255)
    assert torch.equal(normalize_video(raw), old_loader)
    assert torch.equal(model.embed_visual(raw)[0], model.embed_visual(old_loader)[0])
    model.train().cnn = CNNRunner(chunk=3, checkpoint=True)
    feats = model.embed_visual(raw)[0]
    feats.sum().backward()
    assert next(model.visual_cnn.parameters()).grad is not None


def test_channels_last_cnns_compute_the_same_features_and_gradients():
    """``train.cnn_channels_last`` only changes memory layout: features and CNN gradients match the default layout
    to fp32 rounding (the convolution kernels differ, so not bit for bit)."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    plain = AVBert(cfg.model).train()
    fast = copy.deepcopy(plain).set_memory_options(load_config("tiny", overrides=["train.cnn_channels_last=true"]).train)
    assert next(fast.visual_cnn.parameters()).is_contiguous(memory_format=torch.channels_last_3d)
    d = cfg.data
    video = torch.randn(2, d.num_clips, 3, d.frames, d.crop_size, d.crop_size)
    audio = random_clips(d, 2, "cpu")[1]
    for model in (plain, fast):
        (model.embed_visual(video)[0].square().mean() + model.embed_audio(audio)[0].square().mean()).backward()
    torch.testing.assert_close(fast.embed_visual(video)[0], plain.embed_visual(video)[0], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        if a.grad is not None and ("cnn" in name):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_cnn_options_are_checked():
    with pytest.raises(ConfigError, match=r"train.cnn_chunk=-1 is invalid"):
        load_config("tiny", overrides=["train.cnn_chunk=-1"])
    with pytest.raises(ConfigError, match=r"train.clips_with_grad=5 is invalid: expected 0 \(all\) to data.num_clips=4"):
        load_config("tiny", overrides=["train.clips_with_grad=5"])
    with pytest.raises(ConfigError, match=r"data.num_clips=17 is invalid: expected at most model.max_clips=16"):
        load_config("tiny", overrides=["data.num_clips=17", "data.window_seconds=34"])


def test_paper_preset_takes_240_clips_when_asked():
    """The paper preset with 8-minute sequences (model.max_clips, data.num_clips, data.window_seconds raised): the
    config builds and a whole forward runs (on fake tensors: shapes only, no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = load_config("paper", overrides=["model.max_clips=240", "data.num_clips=240", "data.window_seconds=480", "model.kernel=reference"])
    d = cfg.data
    with FakeTensorMode():
        model = AVBert(cfg.model)
        video = torch.randn(1, 240, 3, d.frames, d.crop_size, d.crop_size)
        audio = torch.randn(1, 240, 1, d.n_mels, d.mel_frames)
        with torch.no_grad():
            out = model(video, audio)
    assert out.multimodal.shape == (1, 2 * 241, cfg.model.dim) and out.visual.shape == (1, 241, cfg.model.dim)
