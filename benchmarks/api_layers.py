"""Where a user's W1 meta-iteration goes (1-32-32-1 ReLU, L1, K=Q=4, S=5, T=1; one thread,
the garbage collector off): the whole step of a user's loop, the raw op with and without the
optimizer step, pymaml.functional.maml_loss's forward and backward, torch.optim's own part, and
pymaml.MAML (an nn.Sequential) against the functional call. Median of 9 x 3000 calls per line.
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

    def wrapper():
        model.zero_grad()
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


if __name__ == "__main__":
    torch.set_num_threads(1)
    gc.disable()
    for name, fn in rows():
        print(f"{name:45s} {median_us(fn):8.1f} us", flush=True)
