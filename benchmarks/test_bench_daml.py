"""DAML's meta-iteration on the seed's workload (issue 15, item 4), implementations side by side:
the meta-gradient of one task (base 1-32-32-1 ReLU, loss network 65-32-32-1, 5 inner steps on
one fresh unlabeled source input each, L1 on 4 target points, float32) and the outer SGD step
on both networks. Each implementation's meta-gradient is checked against the autograd
reference before it is timed. One thread (conftest.py).

    python -m pytest benchmarks/test_bench_daml.py --benchmark-columns=median,ops

Rows (group "daml: seed workload"):
  fused        the public API: pymaml.daml_loss(...).backward(), torch.optim.SGD(fused=True)
  fused_op     torch.ops.pymaml.daml_loss (gradients returned, no autograd), the same step
  train_chunk  torch.ops.pymaml.daml_train_chunk, CHUNK iterations per call, as pymaml.train
               runs them (the row's time is per call: divide by CHUNK, extra_info has it)
  reference    the autograd reference (Python loop, create_graph=True), as the seed would
  torch.func   torch.func.grad over the reference's inner loop written with torch.func.grad
The issue's target: the fused meta-step >= 30x faster than the reference (one thread).
"""

import pytest
import torch

import pymaml
from pymaml import daml as D
from pymaml._layout import num_params

SIZES, LOSS_SIZES = [1, 32, 32, 1], [65, 32, 32, 1]
HYPER = dict(sizes=SIZES, loss_sizes=LOSS_SIZES, inner_lr=0.03, steps=5, activation="relu",
             loss="l1", adapt_loss="l1")
CHUNK = 100
TOLERANCE = 1e-4
SPEEDUP_TARGET = 30.0

pytestmark = pytest.mark.skipif(not D.fused_available(), reason="the fused DAML ops are not built")


def _data(n=None):
    family = pymaml.tasks.DAMLSine()
    g = torch.Generator().manual_seed(0)
    if n is None:
        return family.sample_daml(1, steps=5, generator=g)
    return family.sample_daml_many(n, 1, steps=5, generator=g)


def _weights():
    g = torch.Generator().manual_seed(0)
    return torch.cat([pymaml.init_params(s, generator=g, zero_bias=True)
                      for s in (SIZES, LOSS_SIZES)])


P = num_params(SIZES)


def _grad_fused(w, batch):
    p, psi = w[:P].detach().requires_grad_(), w[P:].detach().requires_grad_()
    pymaml.daml_loss(p, psi, *batch, **HYPER).backward()
    return torch.cat([p.grad, psi.grad])


def _grad_op(w, batch):
    _, gp, gpsi = torch.ops.pymaml.daml_loss(
        w[:P], w[P:], *batch, SIZES, LOSS_SIZES, 0.03, 5, "relu", "l1", "l1", True)
    return torch.cat([gp, gpsi])


def _grad_reference(w, batch):
    p, psi = w[:P].detach().requires_grad_(), w[P:].detach().requires_grad_()
    loss = D.reference_loss(p, psi, *batch, **HYPER)
    return torch.cat(torch.autograd.grad(loss, [p, psi]))


_func_grad = torch.func.grad(lambda p, psi, xs, xq, yq: D.reference_loss(p, psi, xs, xq, yq,
                                                                         **HYPER),
                             argnums=(0, 1))


def _grad_torch_func(w, batch):
    return torch.cat(_func_grad(w[:P], w[P:], *batch))


GRADS = {"fused": _grad_fused, "fused_op": _grad_op, "reference": _grad_reference,
         "torch.func": _grad_torch_func}


@pytest.mark.parametrize("name", list(GRADS) + ["train_chunk"])
def test_daml_meta_iteration(benchmark, name):
    batch = _data()
    w0 = _weights()
    want = _grad_reference(w0, batch)
    benchmark.group = "daml: seed workload (1-32-32-1 + 65-32-32-1, T=1, S=5, K_s=1, Q=4)"
    benchmark.extra_info.update(section="daml", impl=name, threads=torch.get_num_threads(),
                                timed="meta-iteration")
    if name == "train_chunk":
        chunk = _data(CHUNK)
        weights = w0.clone()
        # the first iteration of the chunk is the checked meta-gradient's step
        first = w0.clone()
        torch.ops.pymaml.daml_train_chunk(first, [], chunk.x_source[:1], chunk.x_query[:1],
                                          chunk.y_query[:1], SIZES, LOSS_SIZES, 0.03, 5, "relu",
                                          "l1", "l1", "sgd", [1.0, 0, 0, 0, 0, 0])
        got = w0 - first  # lr 1: the step is the gradient
        want = _grad_reference(w0, pymaml.tasks.DAMLBatch(chunk.x_source[0], chunk.x_query[0],
                                                          chunk.y_query[0]))
        benchmark.extra_info["iterations_per_call"] = CHUNK

        def step():
            torch.ops.pymaml.daml_train_chunk(weights, [], *chunk, SIZES, LOSS_SIZES, 0.03, 5,
                                              "relu", "l1", "l1", "sgd",
                                              [1e-2, 0, 0, 0, 0, 0])
    else:
        grad_fn = GRADS[name]
        got = grad_fn(w0, batch)
        weights = w0.clone().requires_grad_()
        opt = torch.optim.SGD([weights], lr=1e-2, fused=True)

        def step():
            weights.grad = grad_fn(weights.detach(), batch)
            opt.step()
    err = ((got - want).abs().max() / want.abs().max()).item()
    benchmark.extra_info["max_rel_err_vs_reference"] = err
    assert err <= TOLERANCE, f"{name}: meta-gradient differs from the reference by {err:.2e}"
    benchmark(step)
    assert torch.isfinite(weights).all()
