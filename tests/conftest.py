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
