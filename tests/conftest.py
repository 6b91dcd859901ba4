import gc
import os

import pytest
import torch

# Triton kernels run on CPU tensors only through its interpreter, which must be switched on before triton is
# imported (triton.jit reads it when a kernel is defined). On a CUDA machine the real kernels run instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test():
    """Free unreachable DALI pipelines (reference cycles) after every test, in the process and at the time that made
    them: their destructor waits for DALI's threads, and a pipeline freed late by a garbage collection in some other
    test's code is a stall that is hard to place. (avmt's workers are spawned, so none of them inherits one.)"""
    yield
    gc.collect()


@pytest.fixture
def tmpfs():
    """``tmpfs(size)`` mounts a real tmpfs of ``size`` (mount syntax: "1536k") and returns its folder, unmounted
    after the test: a disk that really fills up. Needs mount rights (root here and in CI); skips with the reason
    elsewhere. The folder is outside pytest's basetemp, which pytest renames when pruning old runs."""
    import subprocess
    import tempfile
    from pathlib import Path

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = Path(tempfile.mkdtemp(prefix="avmt-small-disk-"))
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
        if proc.returncode != 0:
            mnt.rmdir()
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()
