"""Benchmark settings: one thread unless a benchmark says otherwise (ratios between
implementations are what we read; `pytest` alone never collects this folder: testpaths is
tests/), and what the JSON needs beside pytest-benchmark's own: the versions (machine_info)
and the float32 matmul rate (matmul_gflops, the higher of the session's start and end: load
from other processes can only lower it; outside machine_info, which --benchmark-compare
expects to be the same from run to run)."""

import pytest
import torch

import pymaml
from harness import matmul_gflops


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
START_RATES = {}
ALL_THREADS = torch.get_num_threads()


def pytest_sessionstart(session):
    START_RATES.update({d: matmul_gflops(d) for d in DEVICES})
    START_RATES["all"] = matmul_gflops(threads=ALL_THREADS)


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
        cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["matmul_gflops"] = {d: max(START_RATES.get(d, 0.0), matmul_gflops(d)) for d in DEVICES}
    # issue 26: the all-thread rate, that rows timed on several threads are read against
    output_json["matmul_gflops_threads"] = {
        str(ALL_THREADS): max(START_RATES.get("all", 0.0), matmul_gflops(threads=ALL_THREADS))}
