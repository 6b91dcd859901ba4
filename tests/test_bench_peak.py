"""avmt.bench.peak: the whole-step peak from the allocations (torch's MemTracker), fake vs real, what recompute
saves, and python -m avmt.bench peak."""

from __future__ import annotations

import json

import pytest

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
