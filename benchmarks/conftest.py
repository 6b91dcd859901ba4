"""Benchmarks run with pytest-benchmark. Quick mode (default) uses small shapes and one round, so CI proves
every benchmark works; `--full` runs the sizes the issues ask for. Keep numbers from full runs only:

    python -m pytest benchmarks/ --full --benchmark-json=benchmarks/results/<name>.json
    python -m avmt.bench run --full --out benchmarks/results/<name>.json      # the same, then the report

Every JSON written with --benchmark-json carries an "avmt" block (device, versions, command, date, mode) next
to pytest-benchmark's own machine_info / commit_info. Measured headline numbers (e.g. the lowrank/none ratio)
are printed in the terminal summary.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="run the full-size benchmark sweeps (slow)")


@pytest.fixture
def full(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--full"))


_SUMMARY: list[str] = []


@pytest.fixture
def summary_line():
    """``summary_line(text)`` prints ``text`` in the terminal summary of the run (after the tests)."""
    return _SUMMARY.append


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _SUMMARY:
        terminalreporter.section("avmt benchmark results")
        for line in _SUMMARY:
            terminalreporter.write_line(line)


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    output_json["avmt"] = {
        "device": device_description(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "command": " ".join(["python -m pytest", *sys.argv[1:]]) if "pytest" in sys.argv[0] else " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "full" if config.getoption("--full") else "quick",
    }
