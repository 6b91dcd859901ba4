"""Benchmarks run with pytest-benchmark. Quick mode (default) uses small shapes and one round, so CI proves
every benchmark works; `--full` runs the sizes the issues ask for. Keep numbers from full runs only:

    python -m pytest benchmarks/ --full --benchmark-json=benchmarks/results/<name>.json
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="run the full-size benchmark sweeps (slow)")


@pytest.fixture
def full(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--full"))
