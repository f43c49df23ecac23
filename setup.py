"""Builds pymaml's compiled core, pymaml._C, with torch's BuildExtension.

The CPU kernels are always built. The CUDA kernels (csrc/cuda/*.cu) are added only when the
installed torch has CUDA and nvcc is found (set PYMAML_NO_CUDA=1 to skip them). Build against
the torch already installed, without build isolation:

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
        and os.environ.get("PYMAML_NO_CUDA", "0") != "1"
    )
    # No fast-math anywhere: it breaks parity with the autograd reference.
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
