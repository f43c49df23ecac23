"""The cuda section (skipped without a GPU): W2 on the GPU at T = 1 to 65536, the meta-gradient
alone (no optimizer step: the kernels' launches and their work), every implementation side by
side; the reference and torch.func only where harness's GFLOP caps let them finish. The report
adds tasks/s and TFLOP/s against the GPU's float32 matmul rate (TF32 off) and the H100 targets.
"""

import pytest
import torch

from harness import IMPLEMENTATIONS, time_implementation
from workloads import W2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA_T = (1, 25, 256, 4096, 65536)
CASES = [pytest.param(W2.replace(T=T), name, id=f"cuda-{W2.replace(T=T).test_id()}-{name}")
         for T in CUDA_T for name in IMPLEMENTATIONS]


@pytest.mark.parametrize("w, name", CASES)
def test_cuda_meta_gradient(benchmark, w, name):
    time_implementation(benchmark, "cuda", w, name, device="cuda", grad_only=True)
