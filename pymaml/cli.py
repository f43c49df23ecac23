"""The command line: `python -m pymaml <command>` (or the `pymaml` console script).

    demo   meta-train the seed's sine task briefly with the fused op, and time the fused op
           against the autograd reference on the same data
    info   build facts: version, whether the fused op and its CUDA kernels are compiled in
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from . import _ops
from ._version import __version__
from . import functional as F

SEED_SIZES = [1, 32, 32, 1]


def seed_sine_batch(T, K, generator, dtype=torch.float32):
    """The seed's task: y = sin(x + b), b in {0, pi}, x ~ U(-2pi, 2pi); support and query."""
    b = torch.randint(0, 2, (T, 1, 1), generator=generator).to(dtype) * math.pi
    x = (torch.rand(2, T, K, 1, generator=generator, dtype=dtype) * 4 - 2) * math.pi
    y = torch.sin(x + b)
    return x[0], y[0], x[1], y[1]


def _time_per_call(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def demo(args) -> int:
    g = torch.Generator().manual_seed(args.seed)
    hyper = dict(sizes=SEED_SIZES, inner_lr=3e-2, steps=5, activation="relu", loss="l1")
    backend = "fused" if _ops.available() else "reference"
    if backend == "reference":
        print(f"note: {_ops.unavailable_reason(torch.device('cpu'), torch.float32)}; "
              "running the reference backend")
    params = F.init_params(SEED_SIZES, generator=g).requires_grad_()
    held_out = seed_sine_batch(200, 4, torch.Generator().manual_seed(12345))

    def held_out_loss():
        with torch.no_grad():
            return F.maml_loss(params, *held_out, backend=backend, **hyper).item()

    print(f"pymaml {__version__}: MAML on the seed's sine task "
          f"(1-32-32-1 ReLU, L1, K=4, 5 inner steps, meta-batch {args.meta_batch}, {backend} backend)")
    print(f"  post-adaptation query L1 on 200 held-out tasks, before: {held_out_loss():.4f}")
    opt = torch.optim.Adam([params], lr=1e-3)
    start = time.perf_counter()
    for _ in range(args.iterations):
        opt.zero_grad()
        F.maml_loss(params, *seed_sine_batch(args.meta_batch, 4, g), backend=backend, **hyper).backward()
        opt.step()
    elapsed = time.perf_counter() - start
    print(f"  after {args.iterations} meta-iterations ({elapsed:.1f} s):  {held_out_loss():.4f}")

    if backend == "fused":
        batch = seed_sine_batch(args.meta_batch, 4, g)
        p = params.detach().clone().requires_grad_()

        def step(which):
            return lambda: F.maml_loss(p, *batch, backend=which, **hyper).backward()

        fused = _time_per_call(step("fused"), 200)
        ref = _time_per_call(step("reference"), 20)
        print(f"  one meta-gradient, meta-batch {args.meta_batch}: fused {fused * 1e3:.3f} ms, "
              f"reference {ref * 1e3:.3f} ms ({ref / fused:.0f}x); "
              f"see benchmarks/ for the measured suite")
    return 0


def info(args) -> int:
    print(f"pymaml {__version__}")
    print(f"torch {torch.__version__} (CUDA: {torch.version.cuda})")
    print(f"fused op compiled: {_ops.available()}")
    if not _ops.available():
        print(f"  why not: {_ops.unavailable_reason(torch.device('cpu'), torch.float32)}")
    print(f"CUDA kernels compiled: {_ops.cuda_compiled()}")
    print(f"threads: {torch.get_num_threads()}")
    return 0


def _count(minimum):
    """argparse type: an int >= minimum, with an error that names the bound."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pymaml", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="a short meta-training run and a fused-vs-reference timing")
    p_demo.add_argument("--iterations", type=_count(0), default=1500)
    p_demo.add_argument("--meta-batch", type=_count(1), default=16)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(run=demo)
    sub.add_parser("info", help="build facts").set_defaults(run=info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
