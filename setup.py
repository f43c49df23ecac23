"""Builds pymaml's compiled core, pymaml._C, with torch's BuildExtension.

The CPU kernels are always built. The CUDA kernels (csrc/cuda/: the kernel layer *.cu and its
torch binding *.cpp) are added only when the installed torch has CUDA and nvcc is found (set
PYMAML_NO_CUDA=1 to skip them). TORCH_CUDA_ARCH_LIST picks the GPU architectures; without it,
torch builds for the GPUs it sees, and for 9.0 (H100) plus PTX (for newer GPUs) when it sees
none. Build against the torch already installed, without build isolation:

    pip install --no-build-isolation -e .
"""

import glob
import os
import re

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "pymaml", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    with_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
        and os.environ.get("PYMAML_NO_CUDA", "0") != "1"
    )
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to detect: torch would otherwise compile for every architecture it knows.
        # 9.0 (H100/H200) machine code plus its PTX, which the driver compiles at first load
        # for a GPU this build was not compiled for (newer than sm_90), instead of failing
        # with "no kernel image is available".
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
    # No fast-math anywhere (nor nvcc's --use_fast_math): it breaks parity with the reference.
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    macros = [("PYMAML_VERSION", '"%s"' % read_version())]
    if with_cuda:
        macros.append(("PYMAML_WITH_CUDA", None))
        return CUDAExtension(
            "pymaml._C",
            sources + cuda_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "pymaml._C",
        sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    version=read_version(),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
