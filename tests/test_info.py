import json
import subprocess
import sys

import torch

from avmt.info import environment, op_statuses


def test_environment_reports_what_is_installed():
    env = environment()
    assert env["torch"] == torch.__version__
    assert env["cuda_available"] == torch.cuda.is_available()
    try:
        import triton  # noqa: F401
    except ImportError:
        assert env["triton"] is None
    else:
        assert env["triton"] is not None


def test_every_op_selects_an_available_backend():
    for op in op_statuses():
        chosen = [b for b in op.backends if b.name == op.selected]
        assert len(chosen) == 1 and chosen[0].available, op
        assert any(b.name == "reference" and b.available for b in op.backends)
        assert all(b.reason for b in op.backends)


def test_info_cli():
    out = subprocess.run([sys.executable, "-m", "avmt.info", "--json"], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert data["environment"]["python"].count(".") == 2
    ops = {o["op"].split()[0]: o for o in data["ops"]}
    assert ops["lowrank_linear"]["selected"] == "reference"
    assert ops["sample_negatives"]["selected"] == ("cuda" if torch.cuda.is_available() else "cpp")
    assert data["environment"]["avmt._C"].startswith("built")
    loader = data["data_loader"]
    assert loader["selected"] == ("dali" if torch.cuda.is_available() and any(b["name"] == "dali" and b["available"] for b in loader["backends"]) else "cpu")
    assert {b["name"] for b in loader["backends"]} == {"cpu", "dali"} and all(b["reason"] for b in loader["backends"])
    text = subprocess.run([sys.executable, "-m", "avmt.info"], capture_output=True, text=True, check=True).stdout
    assert "selected: cpp" in text or "selected: cuda" in text
    assert "selected by data.loader=auto: " in text
