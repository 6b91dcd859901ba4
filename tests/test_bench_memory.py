"""avmt.bench.memory: the saved-tensor counter, FakeTensor vs real measurements of a step."""

from __future__ import annotations

import pytest
import torch
from bad_input import refused, snapshot

from avmt.bench.__main__ import main as bench_main
from avmt.bench.memory import SavedTensorCounter, measure_step
from avmt.config import load_config


# -- the counter -------------------------------------------------------------------------------------------------------
def test_counter_counts_each_storage_once_and_skips_excluded():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(101, generator=g, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(101, generator=g))
    counter = SavedTensorCounter()
    counter.exclude([a, w])
    with counter:
        counter.phase = "one"
        b = a.sin()  # saves a: excluded
        c = (b * w).exp()  # mul saves b (new, 404 B) and w (excluded); exp saves its result c (404 B)
        d = c * c  # saves c twice: already counted
        e = c[:50].cos()  # saves a view of c: same storage
        counter.phase = "two"
        f = (d + e.sum()).tanh()  # saves its result f (404 B)
    assert counter.by_phase == {"one": 2 * 101 * 4, "two": 101 * 4}
    assert counter.saved_calls >= 7
    f.sum().backward()  # the hooks returned the tensors themselves: backward still works
    assert a.grad is not None and torch.isfinite(a.grad).all()


# -- FakeTensor == real ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["none", "lowrank"])
@pytest.mark.parametrize("scope", ["transformer", "model"])
def test_fake_equals_real(scope, scheme):
    """The shape-only measurement gives exactly the bytes of a real CPU step (odd batch, non-default T)."""
    cfg = load_config("tiny", overrides=[f"model.sharing={scheme}"])
    real = measure_step(cfg, scope=scope, mode="real", batch=3, clips=5)
    fake = measure_step(cfg, scope=scope, mode="fake", batch=3, clips=5)
    assert real.activations == fake.activations and real.activation_bytes > 0
    assert (real.weights, real.grads, real.optimizer, real.inputs) == (fake.weights, fake.grads, fake.optimizer, fake.inputs)
    # exact accounting against the parameter counts of avmt.params
    for part, n in real.params.items():
        assert real.weights[part] == 4 * n and real.grads[part] == 4 * n and real.optimizer[part] == 3 * 4 * n
    assert real.inputs == (
        2 * 3 * 5 * cfg.model.dim * 4
        if scope == "transformer"
        else 3 * 5 * (3 * cfg.data.frames * cfg.data.crop_size**2 + 4 * cfg.data.n_mels * cfg.data.mel_frames)  # uint8 video
    )


def test_fake_equals_real_bf16_autocast():
    cfg = load_config("tiny", overrides=["model.sharing=lowrank"])
    real = measure_step(cfg, scope="model", mode="real", batch=2, precision="bf16")
    fake = measure_step(cfg, scope="model", mode="fake", batch=2, precision="bf16")
    fp32 = measure_step(cfg, scope="model", mode="fake", batch=2)
    # CPU bf16 convolutions (oneDNN) keep a few KiB more than FakeTensor propagates (0.25% at tiny): not bit-exact here
    assert real.activations.keys() == fake.activations.keys()
    assert all(fake.activations[k] == pytest.approx(v, rel=0.01) for k, v in real.activations.items())
    assert real.activations["transformer"] == fake.activations["transformer"]
    assert real.weight_copies == fake.weight_copies > 0 and fp32.weight_copies == 0
    assert real.activation_bytes < fp32.activation_bytes  # autocast keeps bf16 copies for the matmuls and convolutions


def test_activations_grow_with_batch_and_clips():
    cfg = load_config("tiny", overrides=["model.sharing=all"])
    a = measure_step(cfg, scope="transformer", batch=2).activation_bytes
    assert measure_step(cfg, scope="transformer", batch=4).activation_bytes == pytest.approx(2 * a, rel=0.05)
    assert measure_step(cfg, scope="transformer", batch=2, clips=8).activation_bytes > 1.5 * a


def test_measure_step_rejects_what_it_cannot_measure():
    cfg = load_config("tiny")
    with pytest.raises(ValueError, match="data-dependent|needs mode='real'"):
        measure_step(cfg, scope="pretraining", mode="fake")
    with pytest.raises(ValueError, match="scope"):
        measure_step(cfg, scope="everything")


# -- python -m avmt.bench memory: bad input ------------------------------------------------------------------------------

BAD_MEMORY = {  # name: (arguments after "memory --preset tiny", what the one line says); every case exits 2
    "batch 0": (["--batch", "0"], "--batch must be >= 1, got 0"),
    "negative batch": (["--batch", "-3"], "--batch must be >= 1, got -3"),
    "clips 0": (["--clips", "0"], "--clips must be >= 1, got 0"),
    "negative clips": (["--clips", "-1"], "--clips must be >= 1, got -1"),
    "clips past the position tables": (["--clips", "500"], "--clips 500 is more than model.max_clips=16"),
    "unknown scheme": (["--schemes", "shared"], "unknown scheme 'shared'"),
    "no scheme": (["--schemes", ""], "unknown scheme ''"),
    "a scheme twice": (["--schemes", "lowrank,lowrank"], "a scheme twice in 'lowrank,lowrank'"),
    "pretraining scope": (["--scope", "pretraining"], "invalid choice: 'pretraining'"),
    "unknown precision": (["--precision", "fp16"], "invalid choice: 'fp16'"),
    "batch not a number": (["--batch", "four"], "invalid int value: 'four'"),
    "invalid config": (["model.dim=-1"], "model.dim=-1 is invalid"),
    "unknown config key": (["model.dimm=8"], "unknown config key 'model.dimm'"),
}


@pytest.mark.parametrize("case", list(BAD_MEMORY))
def test_bad_cli_input_is_a_one_line_error(tmp_path, monkeypatch, capsys, case):
    args, message = BAD_MEMORY[case]
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, line, out = refused(bench_main, ["memory", "--preset", "tiny", *args], capsys)
    assert code == 2 and "error: " in line and message in line, line
    assert out == "" and snapshot(tmp_path) == before  # no numbers printed, nothing written
