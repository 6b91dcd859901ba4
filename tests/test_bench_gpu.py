"""The one-shot GPU check (avmt.bench.gpu): the orchestrator's JSON, budget and kill handling, parts in their own
processes, the accuracy rule it applies, and the report. The whole dry run (`python -m avmt.bench gpu --dry-run`)
is README command 2's last step, so CI runs it end to end."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bad_input import refused, snapshot

import avmt.bench.gpu as gpu
from avmt.bench.__main__ import main as bench_main
from avmt.bench.report import load_results, render
from avmt.numerics import error_report


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(budget_s=100.0, out=str(tmp_path / "check.json"), parts=None, dry_run=True, no_build=False, commit="abc123", argv=[])
    return argparse.Namespace(**(base | kw))


def test_json_is_written_after_every_part_and_failures_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "ensure_built", lambda no_build: {"status": "passed", "action": "already built"})
    out = tmp_path / "check.json"
    seen_before = {}

    def spawn(name, dry_run, timeout, part_file):
        seen_before[name] = json.loads(out.read_text())["parts"]  # what a kill at this moment would leave
        if name == "lowrank":
            return {"status": "timeout", "reason": "killed", "accuracy": [1, 2]}
        return {"status": "passed", "value": name, "timeout": timeout}

    rc = gpu.run_check(_args(tmp_path, parts="sampling,lowrank,step"), spawn=spawn)
    assert rc == 1  # a timed-out part fails the check
    doc = json.loads(out.read_text())
    assert doc["kind"] == gpu.KIND and doc["commit"] == "abc123" and doc["dry_run"] is True
    assert list(doc["parts"]) == ["build", "sampling", "lowrank", "step"]
    assert doc["parts"]["sampling"]["status"] == "passed" and doc["parts"]["lowrank"]["accuracy"] == [1, 2]
    assert doc["parts"]["step"]["value"] == "step"
    # while lowrank ran, sampling's result was already on disk, and lowrank was marked running
    assert seen_before["lowrank"]["sampling"]["value"] == "sampling"
    assert seen_before["lowrank"]["lowrank"]["status"] == "running" and seen_before["lowrank"]["step"]["status"] == "pending"
    assert doc["parts"]["sampling"]["timeout"] == gpu.CAPS_S["sampling"]  # its cap: well inside the 100 s budget


def test_budget_skips_the_parts_that_no_longer_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "ensure_built", lambda no_build: {"status": "passed"})
    timeouts = {}

    def spawn(name, dry_run, timeout, part_file):
        timeouts[name] = timeout
        time.sleep(1.2)
        return {"status": "passed"}

    rc = gpu.run_check(_args(tmp_path, budget_s=gpu.MIN_PART_S + 1.0, parts="sampling,step"), spawn=spawn)
    doc = json.loads((tmp_path / "check.json").read_text())
    assert rc == 0 and doc["parts"]["sampling"]["status"] == "passed"
    assert timeouts["sampling"] <= gpu.MIN_PART_S + 1.0  # a part's limit never exceeds what is left of the budget
    assert doc["parts"]["step"]["status"] == "skipped" and "budget" in doc["parts"]["step"]["reason"]


def test_unknown_part_is_an_error(tmp_path, capsys):
    assert gpu.run_check(_args(tmp_path, parts="sampling,nope")) == 2
    assert "unknown part" in capsys.readouterr().err


def test_a_part_runs_in_its_own_process_and_a_hung_one_is_killed(tmp_path):
    result = gpu.spawn_part("sampling", True, 120, tmp_path / "s.json")
    assert result["status"] == "passed", result
    assert set(result["rows_equal_to_reference"]) == {
        f"{m}/{d}" for m in ("similar", "dissimilar", "uniform", "sequence") for d in ("float32", "bfloat16")
    }
    assert all(v == 1.0 for v in result["rows_equal_to_reference"].values())  # cpp == reference exactly on the CPU
    assert result["speed"] and all(r["cpp_s"] > 0 for r in result["speed"])
    t0 = time.time()
    killed = gpu.spawn_part("sampling", True, 1.0, tmp_path / "k.json")  # cannot even import torch in 1 s
    assert killed["status"] == "timeout" and "killed after" in killed["reason"] and time.time() - t0 < 30


def test_count_syncs_is_none_on_cpu():
    with gpu.count_syncs(torch.device("cpu")) as syncs:
        torch.ones(3).sum().item()
    assert syncs == [None]


def test_error_report_applies_the_2x_rule():
    truth = [torch.tensor([1.0, 2.0], dtype=torch.float64)]
    ref = [torch.tensor([1.0, 2.1])]
    assert error_report([torch.tensor([1.0, 2.2])], ref, truth)[0]["passed"]  # 0.2 <= 2 x 0.1 (+ floor)
    assert not error_report([torch.tensor([1.0, 2.35])], ref, truth)[0]["passed"]
    assert not error_report([torch.tensor([1.0, float("nan")])], ref, truth)[0]["passed"]
    exact = error_report([torch.tensor([1.0, 2.0 + 1e-7])], [torch.tensor([1.0, 2.0])], truth, floor=1e-6)[0]
    assert exact["passed"] and exact["reference_error"] == 0.0  # the floor keeps exact references from demanding bit-exactness


def test_report_renders_a_gpu_check(tmp_path):
    doc = {
        "kind": gpu.KIND,
        "dry_run": False,
        "date": "2026-12-01T00:00:00+00:00",
        "commit": "abc",
        "budget_s": 480,
        "total_s": 300,
        "device": {"name": "NVIDIA H200", "cuda": True},
        "versions": {"torch": "2.11.0", "triton": "3.6.0"},
        "parts": {
            "build": {"status": "passed", "seconds": 60},
            "sampling": {
                "status": "passed",
                "fast_backend": "cuda",
                "speed": [{"np": 1024, "d": 768, "k": 32, "cuda_s": 0.001, "reference_s": 0.004, "cpp_s": 0.01, "syncs_per_call": 0}],
            },
            "lowrank": {
                "status": "failed",
                "reason": "1 of 2 accuracy cases break the 2x rule",
                "accuracy": [
                    {"passed": True, "worst_ratio": 0.9, "dtype": "bfloat16", "n": 768, "m": 768, "impl": "triton"},
                    {"passed": False, "worst_ratio": 3.1, "dtype": "float16", "n": 768, "m": 3072, "impl": "triton"},
                ],
                "speed": [
                    {
                        "n": 768,
                        "m": 3072,
                        "gelu": True,
                        "tokens": 1024,
                        "dtype": "bfloat16",
                        "reference_fwd_bwd_s": 0.003,
                        "triton_fwd_bwd_s": 0.001,
                        "compiled_fwd_bwd_s": 0.002,
                        "triton_syncs_per_fwd_bwd": 0,
                    }
                ],
            },
            "step": {
                "status": "passed",
                "steps": {
                    "lowrank": {
                        "preset": "paper",
                        "batch": 4,
                        "clips": 15,
                        "precision": "bf16",
                        "seconds_per_step": 0.5,
                        "sequences_per_s": 8.0,
                        "peak_allocated_bytes": 2**30,
                        "syncs_per_step": 3,
                    }
                },
            },
            "largest_batch": {
                "status": "passed",
                "largest_batch": {
                    "none": {"largest_batch": 40, "trials": [[4, True]]},
                    "lowrank": {"largest_batch_at_least": 32, "trials": [[4, True]]},
                },
            },
            "dali": {"status": "skipped", "reason": "not importable here: nvidia.dali, av"},
        },
    }
    (tmp_path / "gpu-nvidia-h200-x.json").write_text(json.dumps(doc))
    md = render(load_results([tmp_path]), tmp_path, plots=False)
    assert "### NVIDIA H200, 2026-12-01" in md
    assert "| lowrank | failed | - | 1 of 2 accuracy cases break the 2x rule |" in md
    assert "| 1024 | 1 | 4 | 10 | 4.0× | 0 |" in md  # sampling: ms per call and the speed-up over the reference
    assert "1 of 2 accuracy cases within 2×" in md and "worst ratio 3.10" in md
    assert "| 768→3072 +GELU | 1024 | bfloat16 | 3 | 1 | 2 | 3.00× | 2.00× | 0 |" in md
    assert "| `lowrank` | 0.5 | 8 | 1,024.0 | - | - | 3 |" in md
    assert "| `lowrank` | ≥ 32 (stopped) | 1 |" in md and "| `none` | 40 | 1 |" in md


BAD_GPU = {  # name: (arguments after "gpu --dry-run", what the one line says); every case exits 2 before any work
    "negative budget": (
        ["--budget-s=-5"],
        "--budget-s must be a finite number of seconds >= 15 (the least a part is started with), got -5",
    ),
    "NaN budget": (["--budget-s", "nan"], "got nan"),
    "infinite budget": (["--budget-s", "inf"], "got inf"),
    "zero budget": (["--budget-s", "0"], "got 0"),
    "budget below one part": (["--budget-s", "10"], "got 10"),
    "budget not a number": (["--budget-s", "soon"], "invalid float value: 'soon'"),
    "unknown part": (["--parts", "sampling,nope"], "unknown part(s) ['nope']"),
    "no part": (["--parts", ""], "unknown part(s) ['']"),
    "a part twice": (["--parts", "sampling,sampling"], "a part twice in 'sampling,sampling'"),
    "out is a folder": (["--out", "{tmp}/folder"], "is a folder; name the file to write"),
    "out under a file": (["--out", "{tmp}/file/check.json"], "file is not a writable folder"),
    "out is a FIFO": (["--out", "{tmp}/fifo"], "fifo is not a regular file"),
}


@pytest.mark.parametrize("case", list(BAD_GPU))
def test_bad_cli_input_is_a_one_line_error_that_changes_nothing(tmp_path, monkeypatch, capsys, case):
    args, message = BAD_GPU[case]
    monkeypatch.setattr(gpu, "ensure_built", lambda no_build: pytest.fail("the build ran"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    os.mkfifo(tmp_path / "fifo")
    argv = ["gpu", "--dry-run", "--out", str(tmp_path / "check.json"), *[a.format(tmp=tmp_path) for a in args]]
    before = snapshot(tmp_path)
    code, line, out = refused(bench_main, argv, capsys)
    assert code == 2 and "python -m avmt.bench gpu: error: " in line and message in line, line
    assert out == "" and snapshot(tmp_path) == before  # no JSON, no stray .NAME.tmp


def test_write_json_leaves_no_temporary_file_when_it_fails(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        gpu.write_json(tmp_path / "taken", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_part_dies_with_a_killed_orchestrator(tmp_path):
    """The part runs in its own session (its timeout kills its group), so no terminal signal reaches it: the kernel
    ends it when the orchestrator dies, whenever that happens."""
    (tmp_path / "sitecustomize.py").write_text(  # the part's process, started with this on its path, hangs in its first call
        "import time\nimport avmt.backends\navmt.backends.select_sampling = lambda device: time.sleep(600)\n"
    )
    code = f"import pathlib, avmt.bench.gpu as g; g.spawn_part('sampling', True, 120, pathlib.Path({str(tmp_path)!r}) / 's.json')"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    orchestrator = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline, part = time.time() + 60, None
        while part is None and time.time() < deadline:
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                    if int(fields[1]) == orchestrator.pid and "--child" in (stat.parent / "cmdline").read_text():
                        part = int(stat.parent.name)
                except (OSError, ValueError, IndexError):
                    continue
            time.sleep(0.1)
        assert part is not None, "the part never started"
        time.sleep(1.0)  # well into its imports
    finally:
        orchestrator.kill()
        orchestrator.wait(timeout=30)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            with open(f"/proc/{part}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie waiting for its reaper is dead too
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(part, 9)
    pytest.fail(f"part {part} outlived its killed orchestrator by 20 s")
