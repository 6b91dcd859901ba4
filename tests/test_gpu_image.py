"""The GPU machine's image has torch, Triton, pytest, pyyaml and safetensors but no PyAV, DALI or matplotlib: every
test module must still be collected there (``python -m avmt.bench gpu`` runs the ``gpu``-marked tests), skipping only
what needs the missing packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _without(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment whose Python cannot import ``modules``: a module of each name first on the path, which raises
    ModuleNotFoundError (what an absent package raises)."""
    for name in modules:
        parts = name.split(".")
        folder = tmp_path.joinpath(*parts[:-1])
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(1, len(parts)):
            init = tmp_path.joinpath(*parts[:k], "__init__.py")
            if not init.exists():
                init.write_text("")
        (folder / f"{parts[-1]}.py").write_text(f"raise ModuleNotFoundError('{name} is not installed here (test)')\n")
    import os

    return os.environ | {"PYTHONPATH": str(tmp_path)}


def test_every_gpu_test_is_collected_without_pyav_dali_and_matplotlib(tmp_path):
    env = _without(tmp_path / "blocked", "av", "nvidia.dali", "matplotlib")
    check = subprocess.run([sys.executable, "-c", "import av"], env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode != 0 and "not installed here" in check.stderr  # the block works
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout.lower().splitlines()[-1], proc.stdout[-2000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(collected) >= 20, proc.stdout[-2000:]  # the GPU tests (about 30)
