"""pymaml.train per meta-iteration, end to end (sampling, the fused meta-gradient, the
optimizer step, the loop), on W1 (the seed's experiment) and W2: one group per workload,
the report divides each call's time by its iterations (extra_info["iterations"]).

Rows per algorithm (MAML, FO-MAML and Reptile on W1; MAML, Meta-SGD and ANIL on W2) and path: "chunked", the
named task family, which the trainer's fast path runs a chunk of iterations at a time in one C++
call; "per-iteration", the same family given as a plain sampler function, which the trainer
runs one iteration at a time (one op call, torch.optim).
"""

import pytest
import torch

import pymaml
from harness import Runner, train_kwargs
from pymaml import tasks
from workloads import W1, W2

# iterations per timed train() call, the same on both paths (pytest-benchmark's own ratio
# column then compares them): 50-100 ms a call on the chunked path
ITERATIONS = {"W1": 5_000, "W2": 100}
PATHS = ("chunked", "per-iteration")


# Reptile's inner loop trains on support and query together (8 points on W1); "reptile-mb4"
# takes its paper's minibatches, 4 points per step (pymaml.train's inner_batch).
# On W2, Meta-SGD (per-parameter rates learned with the weights) and ANIL (the head adapts)
# beside MAML: issue 14's ratios as pymaml.train runs them.
ALGORITHMS = {"maml": {}, "fomaml": {}, "reptile": {}, "reptile-mb4": dict(inner_batch=4),
              "metasgd": {}, "anil": {}}
CASES = [pytest.param(w, algorithm, path, id=f"train-{w.base}-{algorithm}-{path}")
         for w, algorithms in ((W1, ("maml", "fomaml", "reptile", "reptile-mb4")),
                               (W2, ("maml", "metasgd", "anil")))
         for algorithm in algorithms for path in PATHS]


def train_runner(w, algorithm: str, path: str) -> Runner:
    """The row: step() is one pymaml.train call of ITERATIONS[w.base] iterations, and returns
    its result. No meta_grad or weights: the train rows are not checked against the reference
    (tests/ checks pymaml.train). benchmarks/in_turns.py times these rows too."""
    kwargs = dict(train_kwargs(w), backend="fused", algorithm=algorithm.split("-")[0],
                  **ALGORITHMS[algorithm], iterations=ITERATIONS[w.base])
    if path == "per-iteration":
        family = tasks.get_family(w.task, shots=w.K, queries=w.Q)
        kwargs.update(task=lambda T, generator: tuple(family.sample(T, generator=generator)),
                      shots=None, queries=None)
    return Runner(None, lambda: pymaml.train(**kwargs), None, ITERATIONS[w.base])


@pytest.mark.skipif(not pymaml.fused_available(), reason="pymaml._C is not built")
@pytest.mark.parametrize("w, algorithm, path", CASES)
def test_train(benchmark, w, algorithm, path):
    runner = train_runner(w, algorithm, path)
    benchmark.group = f"train: {w.label()}, pymaml.train per iteration"
    benchmark.extra_info.update(section="train", workload=w.label(), order=w.order,
                                impl=f"pymaml.train {algorithm} {path}", device="cpu", threads=1,
                                iterations=runner.iterations)
    run = benchmark.pedantic(runner.step, rounds=3, warmup_rounds=1)
    assert run.iterations == runner.iterations and torch.isfinite(run.losses).all()
