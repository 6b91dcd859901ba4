"""avmt.bench.peak: the whole-step peak from the allocations (torch's MemTracker), fake vs real, what recompute
saves, and python -m avmt.bench peak."""

from __future__ import annotations

import json

import pytest
import torch
from bad_input import refused, snapshot

from avmt.bench.__main__ import main as bench_main
from avmt.bench.peak import step_peak
from avmt.config import load_config
from avmt.models import AVBert


def test_fake_estimate_equals_real_tensors_and_counts_every_parameter():
    cfg = load_config("tiny", overrides=["model.sharing=lowrank", "model.kernel=reference"])
    fake = step_peak(cfg, batch=2, mode="fake")
    real = step_peak(cfg, batch=2, mode="real")
    assert fake.peak_bytes == real.peak_bytes > 0 and fake.parts == real.parts
    n_params = sum(p.numel() for p in AVBert(cfg.model).parameters())
    assert fake.parts["PARAM"] == 4 * n_params  # fp32 parameters, each storage once
    assert fake.parts["OPT"] > 0  # steady state: the tracked step is the second, with AdamW's state allocated
    assert sum(fake.parts.values()) == fake.peak_bytes and fake.peak_at


def test_cnn_recompute_lowers_the_peak_activations():
    base = ["model.kernel=reference", "data.num_clips=4"]
    plain = step_peak(load_config("tiny", overrides=base), batch=4)
    recompute = step_peak(load_config("tiny", overrides=[*base, "train.cnn_checkpoint=true", "train.cnn_chunk=1"]), batch=4)
    assert recompute.parts["ACT"] < plain.parts["ACT"]
    assert recompute.parts["PARAM"] == plain.parts["PARAM"]


def test_bad_arguments_are_refused():
    cfg = load_config("tiny", overrides=["model.kernel=reference"])
    with pytest.raises(ValueError, match="needs mode='real'"):
        step_peak(cfg, 2, mode="fake", scope="pretraining")
    with pytest.raises(ValueError, match="expected mode"):
        step_peak(cfg, 2, mode="guess")


def test_cli_json(capsys):
    assert bench_main(["peak", "--preset", "tiny", "--batch", "2", "--schemes", "all,lowrank", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"all", "lowrank"}
    assert all(r["peak_bytes"] == sum(r["parts"].values()) and r["mode"] == "fake" for r in data.values())
    assert bench_main(["peak", "--preset", "tiny", "--schemes", "shared"]) == 2


BAD_PEAK = {  # name: (arguments after "peak --preset tiny", what the one line says); every case exits 2
    "batch 0": (["--batch", "0"], "--batch must be >= 1, got 0"),
    "negative batch": (["--batch", "-2"], "--batch must be >= 1, got -2"),
    "clips 0": (["--clips", "0"], "--clips must be >= 1, got 0"),
    "negative clips": (["--clips", "-4"], "--clips must be >= 1, got -4"),
    "clips past the position tables": (["--clips", "500"], "--clips 500 is more than model.max_clips=16"),
    "clips past the window": (["--clips", "5"], "data.num_clips=5 is invalid: expected at most window_seconds / clip_seconds = 4"),
    "unknown device": (["--mode", "real", "--device", "gpu0"], "--device 'gpu0'"),
    "meta device": (["--mode", "real", "--device", "meta"], "--device meta: expected cpu, cuda or cuda:N"),
    "fake mode, pretraining scope": (["--scope", "pretraining"], "scope='pretraining' needs mode='real'"),
    "fake mode, triton kernels": (["model.kernel=triton"], "model.kernel='triton' cannot run on fake tensors"),
    "unknown scheme": (["--schemes", "all,shared"], "unknown scheme 'shared'"),
    "unknown scope": (["--scope", "cnn"], "invalid choice: 'cnn'"),
}
if not torch.cuda.is_available():
    BAD_PEAK["cuda without CUDA"] = (["--mode", "real", "--device", "cuda"], "--device cuda: no such CUDA device here")


@pytest.mark.parametrize("case", list(BAD_PEAK))
def test_bad_cli_input_is_a_one_line_error(tmp_path, monkeypatch, capsys, case):
    args, message = BAD_PEAK[case]
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, line, out = refused(bench_main, ["peak", "--preset", "tiny", *args], capsys)
    assert code == 2 and line.startswith("python -m avmt.bench peak: error: ") and message in line, line
    assert out == "" and snapshot(tmp_path) == before
