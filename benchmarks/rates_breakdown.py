"""Where Meta-SGD's and ANIL's extra time goes on W2 (1-40-40-1, MSE, K = Q = 10, S = 5,
T = 25, second order, one thread): the raw ops (plain, with [1, P] rates without and with the
rates' gradient, head only), the public loss + backward, and torch's fused Adam step over
[params] and over [params, rates], in turns, 10 calls per timing, thread CPU time; prints
medians. The figures in benchmarks/NOTES.md's issue-14 section come from it.

    taskset -c 1 python benchmarks/rates_breakdown.py [--rounds 15]
"""

import argparse
import statistics
import time

import torch

import pymaml.functional as F


def cases():
    ops = torch.ops.pymaml
    sizes, steps, T, K = [1, 40, 40, 1], 5, 25, 10
    P = F.num_params(sizes)
    g = torch.Generator().manual_seed(0)
    p = F.init_params(sizes, generator=g).requires_grad_()
    data = [torch.randn(T, K, 1, generator=g) for _ in range(4)]
    rates = torch.full((P,), 0.01, requires_grad=True)
    row = torch.full((1, P), 0.01)
    plain = torch.optim.Adam([p], lr=1e-3, fused=True)
    both = torch.optim.Adam([p, rates], lr=1e-3, fused=True)
    p.grad, rates.grad = torch.zeros_like(p), torch.zeros_like(rates)
    both.step()  # the state exists, as in a training loop
    hyper = (sizes, 0.0, steps, "relu", "mse", False, True, False)

    def raw_rates(layers, rate_grad):
        return lambda: ops.maml_loss(p.detach(), *data, *hyper, row, layers, rate_grad)
    return {
        "raw maml_loss": lambda: ops.maml_loss(p.detach(), *data, sizes, 0.01, steps, "relu",
                                               "mse", False, True),
        "raw rates, no rate grad": raw_rates([0, 1, 2], False),
        "raw rates, rate grad": raw_rates([0, 1, 2], True),
        "raw head only": raw_rates([2], False),
        "public MAML loss+backward": lambda: F.maml_loss(p, *data, sizes=sizes, inner_lr=0.01,
                                                         steps=steps).backward(),
        "public Meta-SGD loss+backward": lambda: F.maml_loss(p, *data, sizes=sizes,
                                                             inner_lr=rates,
                                                             steps=steps).backward(),
        "public ANIL loss+backward": lambda: F.maml_loss(p, *data, sizes=sizes, inner_lr=0.01,
                                                         steps=steps,
                                                         adapt_layers=[-1]).backward(),
        "Adam step [params]": lambda: (plain.zero_grad(set_to_none=False), plain.step()),
        "Adam step [params, rates]": lambda: (both.zero_grad(set_to_none=False), both.step()),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fns = cases()
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            fn()  # untimed: warm caches for this row
            t0 = time.thread_time()
            for _ in range(10):
                fn()
            times[name].append((time.thread_time() - t0) / 10)
    for name, ts in times.items():
        print(f"{name:32s} {statistics.median(ts) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
