"""Benchmark settings: one thread unless a benchmark says otherwise (ratios between
implementations are what we read; `pytest` alone never collects this folder: testpaths is
tests/), and the facts the JSON's machine_info needs beside pytest-benchmark's own."""

import pytest
import torch

import pymaml
from harness import matmul_gflops


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(
        torch_version=torch.__version__, torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        default_threads=torch.get_num_threads(), pymaml_version=pymaml.__version__,
        fused_available=pymaml.fused_available(), cuda_compiled=pymaml.cuda_compiled(),
        cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        matmul_gflops={d: matmul_gflops(d) for d in ("cpu", "cuda")
                       if d == "cpu" or torch.cuda.is_available()})
