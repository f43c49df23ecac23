"""Issue 26's grid: the kernel at every scale, from W1 and W2 to the MAML paper's Omniglot MLP
(omni, cross-entropy on int64 labels, S = 1 and 5: also issue 24's benchmark item) and INR
fits of 256 and 1024 points (workloads.GRID). Rows: the public API (maml_loss + backward),
the raw op, the autograd loop (reference), torch.func over a list of weight tensors
(torchfunc_list) and JAX; each on one thread and on all threads (JAX: one thread only, XLA's
pool is sized at import). The report reads GFLOP/s against the one-thread and the all-thread
torch.mm rate, and the grid's targets (workloads.GRID_*).

    taskset -c 1 python -m pytest benchmarks/test_bench_grid.py -k thr1 --benchmark-json=grid.json
    python -m pytest benchmarks/test_bench_grid.py --benchmark-json=grid.json  # both thread counts
    python benchmarks/report.py grid.json
"""

import pytest
import torch

from harness import time_implementation
from workloads import GRID

ROWS = ("fused", "fused_op", "reference", "torchfunc_list", "jax")
ALL_THREADS = torch.get_num_threads()  # before the autouse fixture sets one
CASES = [pytest.param(w, name, n, id=f"grid-{w.test_id()}-{name}-thr{n}")
         for w in GRID for n in sorted({1, ALL_THREADS}) for name in ROWS
         if not (name == "jax" and n > 1)]


@pytest.mark.parametrize("w, name, threads", CASES)
def test_grid(benchmark, w, name, threads):
    torch.set_num_threads(threads)  # the autouse fixture restores one thread
    time_implementation(benchmark, "grid", w, name)
