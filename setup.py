"""Build of the avmt package and its compiled ops (`avmt._C`).

Install with `pip install --no-build-isolation -e .`: the extension must build against the torch already
installed (build isolation would download a fresh torch). The C++ CPU ops always build; the CUDA ops build
when torch is a CUDA build and the CUDA toolkit is found (set AVMT_NO_CUDA=1 to skip them).
"""

import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("AVMT_NO_CUDA") != "1"
openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # at::parallel_for is inlined: the pragma needs it here
cxx = ["-O3", *openmp]
sources = ["csrc/sampling.cpp"]
if with_cuda:
    extension = CUDAExtension(
        "avmt._C", [*sources, "csrc/sampling_cuda.cu"], define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=openmp,
    )
else:
    extension = CppExtension("avmt._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)

# kernels/ (Triton sources at the repo root) installs as avmt.kernels; there is no top-level "kernels" package
setup(
    packages=[*find_packages(include=["avmt", "avmt.*"]), "avmt.kernels"],
    package_dir={"avmt.kernels": "kernels"},
    ext_modules=[extension], cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
