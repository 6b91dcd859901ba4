"""Build of the avmt package and its compiled ops (`avmt._C`).

Install with `pip install --no-build-isolation -e .`: the extension must build against the torch already
installed (build isolation would download a fresh torch). The C++ CPU ops always build. The CUDA ops build when
torch is a CUDA build and a CUDA toolkit (nvcc and libcudart) is found; no GPU needs to be visible.

Environment:
    AVMT_NO_CUDA=1          C++ CPU ops only, even with a CUDA torch and toolkit.
    CUDA_HOME=/path         the toolkit to build with (default: asked of the `nvcc` on the PATH, which also works
                            when that nvcc is a wrapper script; then /usr/local/cuda).
    TORCH_CUDA_ARCH_LIST    GPU architectures to build for (default: DEFAULT_ARCHS below, those this nvcc supports,
                            with PTX for the newest so that later GPUs JIT-compile it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

# sm_80 (A100; its cubin also runs on every 8.x GPU), sm_90 (H100/H200), sm_100 (B200), sm_120 (RTX 50xx)
DEFAULT_ARCHS = ("8.0", "9.0", "10.0", "12.0")
ROOT = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"avmt setup: {msg}", file=sys.stderr, flush=True)


def _has_cudart(home: str) -> bool:
    # the folders torch.utils.cpp_extension links -lcudart from (lib64, else lib)
    return any((Path(home) / d / "libcudart.so").exists() for d in ("lib64", "lib"))


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit root as nvcc itself reports it (`#$ TOP=...` of a dry run): right even for a wrapper script."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit root, why) for a CUDA build of the extension; root None means: build the C++ ops only."""
    if torch.version.cuda is None:
        return None, "torch is a CPU build"
    if os.environ.get("AVMT_NO_CUDA") == "1":
        return None, "AVMT_NO_CUDA=1"
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if given:
        if not _has_cudart(given):
            sys.exit(
                f"avmt setup: error: CUDA_HOME={given} has no lib64/libcudart.so (nor lib/): point CUDA_HOME at the "
                "CUDA toolkit's root folder, or set AVMT_NO_CUDA=1 to build the C++ CPU ops only"
            )
        return given, "CUDA_HOME"
    nvcc = shutil.which("nvcc")
    candidates = [c for c in (_nvcc_top(nvcc) if nvcc else None, "/usr/local/cuda") if c]
    for home in candidates:
        if _has_cudart(home) and (Path(home) / "bin" / "nvcc").exists():
            return home, f"nvcc on the PATH ({nvcc})" if nvcc else "/usr/local/cuda"
    if nvcc:
        sys.exit(
            f"avmt setup: error: found {nvcc} but no CUDA toolkit with libcudart.so (looked in {', '.join(candidates)}): "
            "set CUDA_HOME to the toolkit's root folder, or AVMT_NO_CUDA=1 to build the C++ CPU ops only"
        )
    return None, "no CUDA toolkit found (no nvcc on the PATH, no /usr/local/cuda)"


def default_arch_list(cuda_home: str) -> str:
    """DEFAULT_ARCHS that this toolkit can compile, the newest also as PTX."""
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
        supported = {int(v) for v in re.findall(r"compute_(\d+)", out)}
    except (OSError, subprocess.SubprocessError):
        supported = set()
    archs = [a for a in DEFAULT_ARCHS if not supported or int(a.replace(".", "")) in supported]
    if not archs:
        sys.exit(f"avmt setup: error: the nvcc in {cuda_home} supports none of {', '.join(DEFAULT_ARCHS)}; set TORCH_CUDA_ARCH_LIST")
    return ";".join(archs) + "+PTX"


cuda_home, why = find_cuda_home()
archs = ""
if cuda_home is not None:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported, just below
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(cuda_home)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    log(f"building the C++ and CUDA ops: CUDA {torch.version.cuda} toolkit {cuda_home} ({why}), TORCH_CUDA_ARCH_LIST={archs}")
else:
    log(f"building the C++ CPU ops only: {why}")

from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import TORCH_LIB_PATH, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# What was built, compiled into the module (avmt._C.build_torch / build_cuda / build_archs, shown by
# `python -m avmt.info`); not in git. Rewritten only when it changes, so that an unchanged build stays incremental.
build_info = (
    "// written by setup.py at each build\n#pragma once\n"
    f'#define AVMT_BUILD_TORCH "{torch.__version__}"\n'
    f'#define AVMT_BUILD_CUDA "{torch.version.cuda if cuda_home else ""}"\n'
    f'#define AVMT_BUILD_ARCHS "{archs}"\n'
)
header = ROOT / "csrc" / "build_info.h"
if not header.exists() or header.read_text() != build_info:
    header.write_text(build_info)

openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # at::parallel_for is inlined: the pragma needs it here
cxx = ["-O3", *openmp]
# RUNPATH to torch's libraries (and the CUDA runtime), so `import avmt._C` works before `import torch`: relative
# for an installed wheel (site-packages/avmt/_C*.so -> site-packages/torch/lib), absolute for an editable install
rpaths = ["$ORIGIN/../torch/lib", TORCH_LIB_PATH]
sources = ["csrc/sampling.cpp"]
if cuda_home is not None:
    rpaths.append(str(Path(cuda_home) / "lib64"))
link = [*openmp, *(f"-Wl,-rpath,{p}" for p in rpaths)]
if cuda_home is not None:
    extension = CUDAExtension(
        "avmt._C",
        [*sources, "csrc/sampling_cuda.cu"],
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        extra_link_args=link,
    )
else:
    extension = CppExtension("avmt._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)

# kernels/ (Triton sources at the repo root) installs as avmt.kernels; there is no top-level "kernels" package
setup(
    packages=[*find_packages(include=["avmt", "avmt.*"]), "avmt.kernels"],
    package_dir={"avmt.kernels": "kernels"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
