"""avmt.bench: the saved-tensor counter, FakeTensor vs real measurements, the largest-batch search and the report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from avmt.bench.__main__ import main as bench_main
from avmt.bench.memory import SavedTensorCounter, measure_step
from avmt.bench.report import load_results, memory_records, render, transformer_ratio
from avmt.bench.search import largest_fitting_batch
from avmt.config import SHARING_SCHEMES, load_config


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
    assert real.inputs == (2 * 3 * 5 * cfg.model.dim * 4 if scope == "transformer" else
                           3 * 5 * 4 * (3 * cfg.data.frames * cfg.data.crop_size**2 + cfg.data.n_mels * cfg.data.mel_frames))


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


# -- largest batch -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 5, 7, 8, 9, 100, 1000, 4096])
@pytest.mark.parametrize("start", [1, 4, 64])
def test_largest_fitting_batch(threshold, start):
    calls: list[int] = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= threshold

    best, trials = largest_fitting_batch(fits, start=start, limit=4096)
    assert best == min(threshold, 4096)
    assert len(calls) == len(set(calls)) == len(trials)  # no batch tried twice
    assert trials == [(b, b <= threshold) for b in calls]
    assert len(calls) <= 2 * math.ceil(math.log2(4096)) + 2


def test_largest_fitting_batch_stops_at_the_limit_and_checks_arguments():
    best, trials = largest_fitting_batch(lambda b: True, start=3, limit=20)
    assert best == 20 and trials[-1] == (20, True)
    with pytest.raises(ValueError):
        largest_fitting_batch(lambda b: True, start=0)
    with pytest.raises(ValueError):
        largest_fitting_batch(lambda b: True, start=8, limit=4)


# -- report ------------------------------------------------------------------------------------------------------------
def _bench_json(path, records, mode="quick"):
    path.write_text(json.dumps({
        "datetime": "2026-01-01T00:00:00", "machine_info": {}, "avmt": {"device": "cpu: test", "torch": torch.__version__, "mode": mode,
                                                                       "date": "2026-01-01T00:00:00+00:00", "command": "pytest benchmarks"},
        "benchmarks": [{"name": n, "stats": st, "extra_info": info} for n, st, info in records],
    }))


def test_report_renders_measured_records(tmp_path):
    """From a JSON of real measure_step records: the ratio, the tables, the plots, and no GPU numbers invented."""
    records = []
    for s in SHARING_SCHEMES:
        cfg = load_config("tiny", overrides=[f"model.sharing={s}"])
        r = measure_step(cfg, scope="transformer", mode="fake", batch=2)
        records.append((f"mem[{s}]", {"mean": 0.1}, dict(kind="memory", preset="paper", variant="paper", **r.to_dict())))
        records.append((f"step[{s}]", {"mean": 0.5, "min": 0.4, "median": 0.45, "max": 0.7, "rounds": 3},
                        dict(kind="step", preset="tiny", sharing=s, batch=2, clips=4, device="cpu", precision="fp32", sequences_per_s=4.0,
                             loadavg=1.5, cpus=2)))
    _bench_json(tmp_path / "suite.json", records)
    (tmp_path / "junk.json").write_text("[1, 2]")
    res = load_results([tmp_path])
    ratio = transformer_ratio(memory_records(res))
    none, lowrank = (next(i for _, _, i in records if i.get("kind") == "memory" and i["sharing"] == s) for s in ("none", "lowrank"))
    # fp32 weights + gradients + 3 AMSGrad buffers: 20 bytes per parameter, so the byte ratio is the parameter ratio
    assert ratio["ratio"] == pytest.approx(none["params"]["transformer"] / lowrank["params"]["transformer"])
    out = tmp_path / "out"
    md = render(res, out)
    assert f"{ratio['ratio']:.1f}× smaller" in md
    assert f"{none['params']['transformer']:,}" in md
    assert "No GPU results yet" in md and "junk.json" in md
    for png in ("memory_transformer_paper_b2_t4_fp32.png", "speed_step.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in md


def test_report_kernel_speedups_only_from_gpu_records(tmp_path):
    def rec(impl, ms, device="NVIDIA H100", interp=False):
        return (f"k[{impl}]", {"median": ms / 1e3, "mean": ms / 1e3}, dict(impl=impl, tokens=4096, n=768, m=3072, gelu=True, backward=False,
                                                                         device=device, interpreter=interp, gb_per_s=100.0))

    _bench_json(tmp_path / "cpu.json", [rec("triton", 50.0, "cpu (2 threads)", True), rec("reference", 1.0, "cpu (2 threads)")])
    md = render(load_results([tmp_path / "cpu.json"]), tmp_path, plots=False)
    assert "No GPU results yet" in md
    _bench_json(tmp_path / "gpu.json", [rec("triton", 1.0), rec("reference", 2.5), rec("compiled", 1.5)], mode="full")
    md = render(load_results([tmp_path / "gpu.json"]), tmp_path)
    assert "2.50×" in md and "1.50×" in md and (tmp_path / "kernel_speedup.png").exists()


def test_report_cli(tmp_path, capsys):
    assert bench_main(["report", str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bench_main(["report", str(empty), "--out", str(tmp_path / "r.md")]) == 1
    cfg = load_config("tiny", overrides=["model.sharing=lowrank"])
    r = measure_step(cfg, batch=1)
    _bench_json(empty / "x.json", [("m", {"mean": 1.0}, dict(kind="memory", preset="tiny", variant="tiny", **r.to_dict()))])
    assert bench_main(["report", str(empty), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    assert "`lowrank`" in (tmp_path / "r.md").read_text()
