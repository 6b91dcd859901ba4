"""avmt.bench.sweep: the peak sweep's configs, the longest-T fit, and python -m avmt.bench peak-sweep."""

from __future__ import annotations

import json

import pytest

from avmt.bench.__main__ import main as bench_main
from avmt.bench.sweep import fit_quadratic, holdout_error, largest_clips, point_config
from avmt.config import load_config


def test_fit_recovers_a_quadratic_and_refuses_to_bend_down():
    pts = [(t, 1000 + 30 * t + 2 * t * t) for t in (15, 30, 60, 120)]
    assert fit_quadratic(pts) == pytest.approx((1000, 30, 2))
    assert holdout_error(pts) == pytest.approx(0, abs=1e-9)
    concave = [(1, 10), (2, 19), (3, 27)]  # c < 0: the straight line instead
    a, b, c = fit_quadratic(concave)
    assert c == 0 and b == pytest.approx(8.5)
    with pytest.raises(ValueError, match="3 distinct T"):
        fit_quadratic([(1, 1), (1, 2), (2, 3)])


def test_largest_clips_by_hand():
    line = [(10, 200), (20, 300), (40, 500)]  # peak = 100 + 10 T
    assert largest_clips(line, 1000) == {"largest_clips": 90, "extrapolated": True}
    assert largest_clips(line, 400) == {"largest_clips": 30, "extrapolated": False}
    assert largest_clips(line, 50) == {"largest_clips": 0, "extrapolated": False}
    assert largest_clips(line, 1e12, limit=1000) == {"largest_clips_at_least": 1000, "extrapolated": True}


def test_point_config_keeps_the_clip_spacing():
    base = load_config("paper")
    cfg = point_config(base, 120, "cnn_checkpoint", "bf16", "lowrank")
    assert (cfg.data.num_clips, cfg.data.window_seconds, cfg.model.max_clips) == (120, 240, 120)
    assert cfg.train.cnn_checkpoint and cfg.train.cnn_chunk == 4 and cfg.model.sharing == "lowrank"
    assert point_config(base, 30, "clips_with_grad", "fp32", "none").train.clips_with_grad == 9
    kept = point_config(load_config("paper", overrides=["model.rank=64"]), 15, "plain", "fp32", "none")
    assert kept.model.rank == 64  # the user's overrides survive


def test_cli_sweeps_resumes_and_fits(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    args = ["peak-sweep", "--preset", "tiny", "--batch", "2", "--clips", "2,3,4", "--variants", "cnn_checkpoint"]
    args += ["--precisions", "fp32", "--schemes", "lowrank", "--fits", "1", "--out", str(out)]
    assert bench_main(args) == 0
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 3 and all(r["peak_bytes"] > 0 for r in doc["results"].values())
    fit = doc["fits"]["cnn_checkpoint fp32 lowrank"]
    assert fit["measured_clips"] == [2, 3, 4] and fit["budgets"]["1"]["extrapolated"]
    seconds = {k: r["seconds"] for k, r in doc["results"].items()}
    assert bench_main(args) == 0  # resumed: nothing left to run, the points are the ones already measured
    assert {k: r["seconds"] for k, r in json.loads(out.read_text())["results"].items()} == seconds
    capsys.readouterr()
    assert bench_main([*args, "--clips", "0,2"]) == 2
    assert "--clips='0,2': expected positive numbers" in capsys.readouterr().err
    assert bench_main([*args, "--variants", "plainn"]) == 2
    assert bench_main(["peak-sweep", "--preset", "small", "--out", str(out)]) == 2  # the file holds another sweep
