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
    assert loader["selected"] == (
        "dali" if torch.cuda.is_available() and any(b["name"] == "dali" and b["available"] for b in loader["backends"]) else "cpu"
    )
    assert {b["name"] for b in loader["backends"]} == {"cpu", "dali"} and all(b["reason"] for b in loader["backends"])
    text = subprocess.run([sys.executable, "-m", "avmt.info"], capture_output=True, text=True, check=True).stdout
    assert "selected: cpp" in text or "selected: cuda" in text
    assert "selected by data.loader=auto: " in text


def test_extension_imports_on_its_own_and_says_what_it_was_built_with(tmp_path):
    """`import avmt._C` before (without) `import torch` finds torch's libraries through the module's RUNPATH."""
    code = "import avmt._C as c; print(c.cuda_built, c.build_torch, c.build_archs)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cuda_built, build_torch, *archs = out.stdout.split()
    assert build_torch == torch.__version__  # built against the torch that runs it
    summary = environment()["avmt._C"]
    if cuda_built == "True":  # a CUDA build names its architectures (TORCH_CUDA_ARCH_LIST or setup.py's default)
        assert archs and f"archs {archs[0]}" in summary and "CUDA" in summary
    else:
        assert not archs and summary.startswith("built (C++ CPU ops only")


def test_a_broken_interpreter_combination_says_why(monkeypatch):
    """Triton 3.6's interpreter with numpy >= 2.4 cannot run the kernels: the backend says so instead of failing."""
    import importlib.metadata

    from avmt import backends

    versions = {"triton": "3.6.0", "numpy": "2.4.6"}
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: versions[dist])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_triton_error", lambda: None)
    ok, why = backends.lowrank_status("cpu")["triton"]
    assert not ok and "numpy<2.4 or Triton>=3.7" in why
    versions["numpy"] = "2.3.5"
    assert backends.lowrank_status("cpu")["triton"][0]
    versions.update(triton="3.7.1", numpy="2.4.6")
    assert backends.lowrank_status("cpu")["triton"][0]
