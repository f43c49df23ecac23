"""The chunked fast path with learned inner rates and frozen layers (train_chunk with rates):
Meta-SGD and per-parameter-step rates, ANIL and other layer subsets, Reptile with frozen
layers, with SGD (with and without momentum) and Adam, give bitwise the per-iteration path's
losses, weights and rates; tied modes and Reptile with frozen layers keep the per-iteration
path."""

import pytest
import torch

import pymaml

from conftest import requires_fused
from test_fast_path import QUIET, own_class

pytestmark = requires_fused

CASES = {
    "metasgd-adam": dict(algorithm="metasgd", optimizer="adam", outer_lr=1e-3),
    "metasgd-sgd": dict(algorithm="metasgd"),
    "metasgd-momentum": dict(algorithm="metasgd", optimizer_kwargs=dict(momentum=0.9)),
    "param-step-fomaml": dict(algorithm="fomaml", learn_inner_lr="per-parameter-step",
                              optimizer="adam", outer_lr=1e-3),
    "anil-adam": dict(algorithm="anil", optimizer="adam", outer_lr=1e-3),
    "layers-0-2-sgd": dict(algorithm="maml", adapt_layers=[0, 2]),
    "anil-metasgd": dict(algorithm="metasgd", adapt_layers=[-1], optimizer="adam", outer_lr=1e-3),
}


def run(dtype, own, optimizer="sgd", **kw):
    kw.setdefault("outer_lr", 0.01)
    if own:  # the same fused kernel, stepped by torch.optim per iteration
        kw["optimizer_kwargs"] = dict(kw.get("optimizer_kwargs", {}), fused=True)
    return pymaml.train("seed-sine", iterations=60, dtype=dtype, seed=3, meta_batch_size=2,
                        optimizer=own_class(optimizer) if own else optimizer, **QUIET, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_chunked_rates_are_bitwise_the_per_iteration_path(case, dtype):
    fast, slow = run(dtype, False, **CASES[case]), run(dtype, True, **CASES[case])
    assert fast.fast_iterations > 0 and slow.fast_iterations == 0
    assert torch.equal(fast.losses, slow.losses)
    assert torch.equal(fast.model.params, slow.model.params)
    if fast.model.learned_lr is not None:
        assert torch.equal(fast.model.learned_lr, slow.model.learned_lr)
        assert not torch.equal(fast.model.learned_lr,
                               torch.full_like(fast.model.learned_lr, fast.model.inner_lr))


@pytest.mark.parametrize("kw", [dict(algorithm="maml", learn_inner_lr="per-layer-step"),
                                dict(algorithm="maml", learn_inner_lr="per-step",
                                     optimizer="adam", outer_lr=1e-3),
                                dict(algorithm="reptile", adapt_layers=[-1])],
                         ids=["per-layer-step", "per-step", "reptile-head"])
def test_what_the_chunked_op_cannot_serve_keeps_the_per_iteration_path(kw):
    assert run(torch.float32, False, **kw).fast_iterations == 0
