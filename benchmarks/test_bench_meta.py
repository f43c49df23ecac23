"""One meta-iteration (the meta-gradient of a meta-batch, then the outer optimizer's step) of
every implementation in harness.IMPLEMENTATIONS side by side, one pytest-benchmark group per
workload; each meta-gradient is checked against the reference's before it is timed.

    python -m pytest benchmarks --benchmark-json=bench.json && python benchmarks/report.py bench.json

Sections (the first part of each test id and group, for -k): core (W1, W2, W2 S=1, W2 S=50),
layers (the raw op's meta-gradient alone: what the optimizer step and the public API add),
T, S and width (sweeps on W2), threads (the public fused API on one and two threads), rates
(issue 14: W2 as plain MAML, with Meta-SGD's learned per-parameter rates and as ANIL, the head
alone adapting; the rows that serve them: the public fused API, the reference, torch.func).
Each in second and first order except threads. One thread except in threads (see conftest.py).
"""

import pytest
import torch

from harness import IMPLEMENTATIONS, time_implementation
from workloads import W1, W2, W2_ANIL, W2_METASGD

ORDERS = (False, True)
SECTIONS = {
    "core": [w.replace(first_order=fo) for w in (W1, W2, W2.replace(S=1), W2.replace(S=50))
             for fo in ORDERS],
    "T": [W2.replace(T=T, first_order=fo) for fo in ORDERS for T in (1, 4, 16, 64, 256, 1024, 4096)],
    "S": [W2.replace(S=S, first_order=fo) for fo in ORDERS for S in (2, 10, 20)],
    "width": [W2.replace(sizes=(1, n, n, 1), first_order=fo) for fo in ORDERS
              for n in (32, 64, 128, 256)],
    # plain W2 again, so that the ratios of the targets read rows timed side by side
    "rates": [w.replace(first_order=fo) for fo in ORDERS for w in (W2, W2_METASGD, W2_ANIL)],
}
# W2 (T=25), S=1, 5 and 50 are in core: the sweeps read them from there.
CASES = [pytest.param(section, w, name, id=f"{section}-{w.test_id()}-{name}")
         for section, workloads in SECTIONS.items() for w in workloads for name in IMPLEMENTATIONS
         if (section != "rates" or IMPLEMENTATIONS[name].learned)
         and not IMPLEMENTATIONS[name].grid_only]


@pytest.mark.parametrize("section, w, name", CASES)
def test_meta_iteration(benchmark, section, w, name):
    time_implementation(benchmark, section, w, name)


@pytest.mark.parametrize("w", SECTIONS["core"], ids=[f"layers-{w.test_id()}" for w in SECTIONS["core"]])
def test_meta_gradient_alone(benchmark, w):
    # In the workload's core group: beside fused_op's meta-iteration, the cost of the step.
    time_implementation(benchmark, "core", w, "fused_op", grad_only=True)


@pytest.mark.parametrize("w", SECTIONS["rates"][:3], ids=[f"rates-{w.test_id()}-fused-no-step"
                                                        for w in SECTIONS["rates"][:3]])
def test_rates_meta_gradient_alone(benchmark, w):
    # Beside each second-order rates group's meta-iteration: the public API's meta-gradient
    # without the optimizer step (which for Meta-SGD also steps the P rates).
    time_implementation(benchmark, "rates", w, "fused", grad_only=True)


@pytest.mark.parametrize("w, threads", [
    pytest.param(W2.replace(T=T), n, id=f"threads-{W2.replace(T=T).test_id()}-{n}thr")
    for T in (25, 64, 256) for n in (1, 2)])
def test_threads(benchmark, w, threads):
    # The tasks of a meta-batch are spread over threads; the autouse fixture restores one thread.
    torch.set_num_threads(threads)
    time_implementation(benchmark, "threads", w, "fused")
