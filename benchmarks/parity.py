"""The worst fused-vs-reference difference over many seeded random configurations, per dtype
and per quantity, as max |fused - reference| / max(1, max |reference|).

    python benchmarks/parity.py [--configs 320] [--device cuda]
    python benchmarks/parity.py --learned [--configs 320]
    python benchmarks/parity.py --daml [--configs 320]

--device runs the fused op there (the CUDA kernels) and the reference on the CPU. --learned
takes learned inner rates and frozen layers (pymaml.testing.random_learned_problem: every rate
shape, layer subsets, both orders, per-step batches) and compares three ways, the reference
against the torch.func oracle, the fused op against the reference and against the oracle, in
issue 14's measure: max |a - b| / max(max |b|, tiny), per quantity. --daml takes random DAML
configurations (base and loss networks of random depth and width, the loss network's output
width 1 to 5, relu / tanh, both losses, both adaptation losses, shared or per-step source
batches) and compares the fused op with the
reference (pymaml.daml.reference_loss) in the same measure: the loss, both gradients.
"""

import argparse

import torch

from pymaml.testing import (LARGE, backend_outputs, learned_oracle_outputs, learned_outputs,
                            max_relative, random_learned_problem, random_problem, relative_error,
                            to_device)


def plain(args, dtype):
    worst = {}
    # Small random configurations, then deeper and wider ones with longer inner loops.
    problems = [(s, random_problem(s, dtype)) for s in range(args.configs)]
    problems += [(s, random_problem(s, dtype, **LARGE)) for s in range(1000, 1012)]
    for seed, pb in problems:
        fused = backend_outputs(to_device(pb, args.device), "fused")
        ref = backend_outputs(pb, "reference")
        for key in ref:
            err = relative_error(fused[key], ref[key])
            if err >= worst.get(key, (-1.0, None))[0]:
                worst[key] = (err, seed)
    print(f"{dtype}, {len(problems)} configurations, fused on {args.device}:")
    for key, (err, seed) in worst.items():
        print(f"  {key:10s} worst {err:.3e}  (seed {seed})")


def learned(args, dtype):
    worst = {}
    problems = [(s, random_learned_problem(s, dtype)) for s in range(args.configs)]
    problems += [(s, random_learned_problem(s, dtype, **LARGE)) for s in range(1000, 1012)]
    for seed, lp in problems:
        outputs = dict(reference=learned_outputs(lp, "reference"),
                       oracle=learned_oracle_outputs(lp))
        pairs = [("reference", "oracle")]
        if not args.no_fused:
            outputs["fused"] = learned_outputs(lp, "fused")
            pairs += [("fused", "reference"), ("fused", "oracle")]
        for a, b in pairs:
            for key in outputs[b]:
                err = max_relative(outputs[a][key], outputs[b][key])
                if err >= worst.get((a, b, key), (-1.0, None))[0]:
                    worst[(a, b, key)] = (err, seed)
    print(f"{dtype}, {len(problems)} learned-rate configurations:")
    for (a, b, key), (err, seed) in worst.items():
        print(f"  {a:9s} vs {b:9s} {key:11s} worst {err:.3e}  (seed {seed})")


def random_daml(seed, dtype):
    """A random DAML call's arguments (seeded)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    sizes = [pick(1, 3)] + [pick(1, 12) for _ in range(pick(0, 3))] + [pick(1, 3)]
    # the loss network's output width cycles through 1 to 5 (the adaptation loss is the mean
    # over all its outputs), crossed with the shared / per-step source batches (seed % 2)
    loss_sizes = [sum(sizes[1:])] + [pick(1, 12) for _ in range(pick(0, 2))] + [1 + seed % 5]
    steps, T, K, Q = pick(1, 4), pick(1, 3), pick(1, 4), pick(1, 5)
    n_p = sum(o * i + o for i, o in zip(sizes[:-1], sizes[1:]))
    n_l = sum(o * i + o for i, o in zip(loss_sizes[:-1], loss_sizes[1:]))
    x_source = torch.randn(T, *((steps,) if seed % 2 else ()), K, sizes[0], generator=g)
    tensors = dict(params=torch.randn(n_p, generator=g) * 0.5,
                   loss_params=torch.randn(n_l, generator=g) * 0.5, x_source=x_source,
                   x_query=torch.randn(T, Q, sizes[0], generator=g),
                   y_query=torch.randn(T, Q, sizes[-1], generator=g))
    hyper = dict(sizes=sizes, loss_sizes=loss_sizes, inner_lr=float(torch.rand((), generator=g)) * 0.2,
                 steps=steps, activation=("relu", "tanh")[pick(0, 1)],
                 loss=("l1", "mse")[pick(0, 1)], adapt_loss=("l1", "mse")[pick(0, 1)])
    return {k: v.to(dtype) for k, v in tensors.items()}, hyper


def daml(args, dtype):
    from pymaml import daml as D
    worst = {}
    for seed in range(args.configs):
        tensors, hyper = random_daml(seed, dtype)
        out = {}
        for name, fn in (("fused", lambda **kw: D.daml_loss(**kw, backend="fused")),
                         ("reference", D.reference_loss)):
            weights = [tensors[k].clone().requires_grad_() for k in ("params", "loss_params")]
            loss = fn(*weights, tensors["x_source"], tensors["x_query"], tensors["y_query"],
                      **hyper) if name == "reference" else fn(
                params=weights[0], loss_params=weights[1], x_source=tensors["x_source"],
                x_query=tensors["x_query"], y_query=tensors["y_query"], **hyper)
            out[name] = dict(zip(("loss", "grad params", "grad loss"),
                                 (loss, *torch.autograd.grad(loss, weights))))
        widths = "output width 1" if hyper["loss_sizes"][-1] == 1 else "output widths 2-5"
        for key in out["reference"]:
            err = max_relative(out["fused"][key], out["reference"][key])
            if err >= worst.get((widths, key), (-1.0, None))[0]:
                worst[(widths, key)] = (err, seed)
    print(f"{dtype}, {args.configs} DAML configurations, fused vs reference:")
    for (widths, key), (err, seed) in sorted(worst.items()):
        print(f"  {widths:17s} {key:12s} worst {err:.3e}  (seed {seed})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=int, default=320)
    ap.add_argument("--device", default="cpu", help="where the fused op runs (default: cpu)")
    ap.add_argument("--learned", action="store_true",
                    help="learned inner rates and frozen layers, against torch.func too")
    ap.add_argument("--daml", action="store_true", help="random DAML configurations")
    ap.add_argument("--no-fused", action="store_true",
                    help="with --learned: the reference against torch.func only")
    args = ap.parse_args()
    for dtype in (torch.float64, torch.float32):
        (daml if args.daml else learned if args.learned else plain)(args, dtype)


if __name__ == "__main__":
    main()
