"""Where a user's W1 meta-iteration goes (1-32-32-1 ReLU, L1, K=Q=4, S=5, T=1; one thread,
the garbage collector off): the whole step of a user's loop, the raw op with and without the
optimizer step, pymaml.functional.maml_loss's forward and backward, torch.optim's own part, and
pymaml.MAML (an nn.Sequential) against the functional call (both forward + backward, gradients
accumulating), then those two again taken in turns for their ratio. Median of 9 x 3000 calls
per line.
It runs on older trees too (without pymaml.MAML's line), for before/after comparisons.

    taskset -c 1 python benchmarks/api_layers.py
"""

import gc
import time

import torch

import pymaml
from pymaml import functional as F

SIZES = [1, 32, 32, 1]
HYPER = dict(sizes=SIZES, inner_lr=0.03, steps=5, activation="relu", loss="l1")


def median_us(fn, calls=3000, rounds=9) -> float:
    for _ in range(500):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return sorted(times)[rounds // 2]


def rows():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 1))
    has_wrapper = hasattr(pymaml, "MAML")
    maml = pymaml.MAML(model, inner_lr=0.03, steps=5, loss="l1") if has_wrapper else None
    params = F.init_params(SIZES, generator=g).requires_grad_()
    data = [torch.randn(1, 4, 1, generator=g) for _ in range(4)]
    opt = torch.optim.SGD([params], lr=0.01, fused=True)
    op_args = (SIZES, 0.03, 5, "relu", "l1", False, True)
    grad = torch.zeros_like(params)

    def user_step():
        opt.zero_grad()
        F.maml_loss(params, *data, **HYPER).backward()
        opt.step()

    def op_step():
        opt.zero_grad()
        params.grad = torch.ops.pymaml.maml_loss(params.detach(), *data, *op_args)[1]
        opt.step()

    def wrapper():  # gradients accumulate, as on the functional line (no zero_grad on either)
        maml(*data).backward()
    return [("user step: zero_grad, maml_loss, backward, step", user_step),
            ("raw op + step", op_step),
            ("raw op alone", lambda: torch.ops.pymaml.maml_loss(params.detach(), *data, *op_args)),
            ("F.maml_loss forward", lambda: F.maml_loss(params, *data, **HYPER)),
            ("F.maml_loss forward + backward",
             lambda: F.maml_loss(params, *data, **HYPER).backward()),
            ("zero_grad + step (fused SGD)",
             lambda: (opt.zero_grad(), setattr(params, "grad", grad), opt.step())),
            ("pymaml.MAML(model) forward + backward", wrapper)][:7 if maml else 6]


def in_turns(fns, rounds=30, calls=20) -> list:
    """Median thread time of each fn, taken in turns (blocks of `calls` after an untimed one),
    so that the machine's drift hits them alike. (As harness.time_in_turns, but without the
    harness, which needs this tree's pymaml: this script runs on older trees too.)"""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            fn()
            for _ in range(calls):
                t0 = time.thread_time()
                fn()
                ts.append(time.thread_time() - t0)
    return [sorted(ts)[len(ts) // 2] * 1e6 for ts in times]


if __name__ == "__main__":
    torch.set_num_threads(1)
    gc.disable()
    table = rows()
    for name, fn in table:
        print(f"{name:45s} {median_us(fn):8.1f} us", flush=True)
    if len(table) == 7:  # the wrapper's target, taken in turns: same speed as the functional call
        functional, wrapper = in_turns([table[4][1], table[6][1]])
        print(f"in turns: pymaml.MAML {wrapper:.1f} us / functional {functional:.1f} us = "
              f"{wrapper / functional:.2f}x")
