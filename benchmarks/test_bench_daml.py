"""DAML's meta-iteration (issue 15, item 4), every implementation in
harness.DAML_IMPLEMENTATIONS side by side on the seed's DAML workload (D1: base 1-32-32-1
ReLU, loss network 65-32-32-1, L1 inner and outer losses, 5 inner steps at 0.03 on one fresh
unlabeled source input each, 4 target points, one task, float32, SGD 0.01 on both networks)
and on D1 with T=25; each meta-gradient (both networks') is checked against the autograd
reference's before it is timed. One thread (conftest.py).

    taskset -c 1 python -m pytest benchmarks -k daml --benchmark-json=daml.json \
        --benchmark-columns=median,iqr,rounds && python benchmarks/report.py daml.json

Rows (group "daml: D1 2nd order", "daml: D1 T=25 2nd order"):
  fused              the public API: pymaml.functional.daml_loss(..., backend="fused"),
                     .backward() into params and loss_params, torch.optim.SGD(fused=True) step
                     over both
  fused_op           the raw op torch.ops.pymaml.daml_loss (gradients returned, no autograd),
                     then the same step
  fused_op, no step  the raw op alone
  train_chunk        torch.ops.pymaml.daml_train_chunk, as pymaml.train runs DAML: 100
                     meta-iterations per call, on meta-batches drawn beforehand (the report
                     divides the time by extra_info["iterations"])
  reference          the public API with backend="reference": the autograd loop
                     (pymaml.daml.reference_loss, create_graph=True), then the same step
  torchfunc          pymaml.testing.torch_func_daml: torch.func.grad through the unrolled inner
                     loop (functional_call, second order), vmap over the tasks
The report marks issue 15's target on D1: the fused row >= 30x faster than the reference row.
"""

import pytest

from harness import DAML_IMPLEMENTATIONS, time_implementation
from workloads import D1

WORKLOADS = [D1, D1.replace(T=25)]


@pytest.mark.parametrize("w, name", [pytest.param(w, name, id=f"daml-{w.test_id()}-{name}")
                                     for w in WORKLOADS for name in DAML_IMPLEMENTATIONS])
def test_daml_meta_iteration(benchmark, w, name):
    time_implementation(benchmark, "daml", w, name)


@pytest.mark.parametrize("w", WORKLOADS, ids=[f"daml-{w.test_id()}-fused_op-no-step"
                                              for w in WORKLOADS])
def test_daml_meta_gradient_alone(benchmark, w):
    # In the workload's group: the raw op's meta-gradient without the optimizer step.
    time_implementation(benchmark, "daml", w, "fused_op", grad_only=True)
