"""avmt.bench.sweep: the peak sweep's configs, the longest-T fit, and python -m avmt.bench peak-sweep."""

from __future__ import annotations

import json
import os

import pytest
from bad_input import refused, snapshot

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
    assert "--clips='0,2': expected finite positive numbers" in capsys.readouterr().err
    assert bench_main([*args, "--variants", "plainn"]) == 2
    assert bench_main(["peak-sweep", "--preset", "small", "--out", str(out)]) == 2  # the file holds another sweep


BASE = ["peak-sweep", "--preset", "tiny", "--batch", "2", "--clips", "2,3", "--variants", "plain", "--precisions", "fp32"]
BAD_SWEEP = {  # name: (arguments after BASE, what the one line says); every case exits 2 and measures nothing
    "jobs 0": (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    "negative jobs": (["--jobs", "-2"], "--jobs must be >= 1, got -2"),
    "batch 0": (["--batch", "0"], "--batch must be >= 1, got 0"),
    "NaN clips": (["--clips", "2,nan"], "--clips='2,nan': expected finite positive numbers"),
    "infinite clips": (["--clips", "inf"], "--clips='inf': expected finite positive numbers"),
    "fractional clips": (["--clips", "2.5"], "--clips='2.5': expected whole numbers of clips"),
    "clips twice": (["--clips", "2,2"], "--clips='2,2': a value is given twice"),
    "NaN budget": (["--fits", "nan"], "--fits='nan': expected finite positive numbers"),
    "unknown variant": (["--variants", "plainn"], "unknown variant or precision 'plainn'"),
    "unknown precision": (["--precisions", "fp16"], "unknown variant or precision 'fp16'"),
    "unknown scheme": (["--schemes", "nope"], "unknown scheme 'nope'"),
    "out is a folder": (["--out", "{tmp}/folder"], "is a folder; name the file to write"),
    "out under a file": (["--out", "{tmp}/file/sweep.json"], "file is not a writable folder"),
    "out is a FIFO": (["--out", "{tmp}/fifo"], "fifo is not a regular file"),
    "out holds junk": (["--out", "{tmp}/junk.json"], "junk.json holds no readable JSON (JSONDecodeError)"),
    "out holds another result": (["--out", "{tmp}/peak.json"], "peak.json is not a peak-sweep result"),
    "out holds another sweep": (["--batch", "3", "--out", "{tmp}/sweep.json"], "sweep.json holds preset=tiny batch=2"),
}


@pytest.mark.parametrize("case", list(BAD_SWEEP))
def test_bad_cli_input_is_a_one_line_error_that_changes_nothing(tmp_path, monkeypatch, capsys, case):
    args, message = BAD_SWEEP[case]
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "peak.json").write_text(json.dumps({"bench": "whole-step peak", "runs": {}}))
    (tmp_path / "sweep.json").write_text(json.dumps({"bench": "peak sweep", "preset": "tiny", "batch": 2, "results": {}}))
    monkeypatch.chdir(tmp_path)
    argv = [*BASE, "--out", str(tmp_path / "new.json"), *[a.format(tmp=tmp_path) for a in args]]
    before = snapshot(tmp_path)
    code, line, out = refused(bench_main, argv, capsys)
    assert code == 2 and line.startswith("python -m avmt.bench peak-sweep: error: ") and message in line, line
    assert out == "" and snapshot(tmp_path) == before
