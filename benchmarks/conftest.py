"""Benchmark settings: one thread unless a benchmark says otherwise (ratios between
implementations are what we read; `pytest` alone never collects this folder: testpaths is tests/)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
