"""The worst fused-vs-reference difference over many seeded random configurations, per dtype
and per quantity, as max |fused - reference| / max(1, max |reference|).

    python benchmarks/parity.py [--configs 320] [--device cuda] [--loss all]
    python benchmarks/parity.py --learned [--configs 320]
    python benchmarks/parity.py --daml [--configs 320]

Every mode runs its configurations twice, grouped in the report: as regression problems
(random MSE or L1, "mse/l1") and as classification problems ("cross_entropy": 2 to 20
classes, labels as int64 indices, one-hot, soft or unnormalised class weights, by seed);
--loss picks one group.

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

from pymaml.testing import (LARGE, backend_outputs, class_labels, learned_oracle_outputs,
                            learned_outputs, max_relative, random_learned_problem, random_problem,
                            relative_error, to_device)

GROUPS = {"regression": None, "cross_entropy": "cross_entropy"}  # report group: the loss drawn


def groups(args):
    """(report name, random_problem's loss) of the groups to run."""
    names = GROUPS if args.loss == "all" else [args.loss]
    return [("mse/l1" if name == "regression" else name, GROUPS[name]) for name in names]


def seeded(make, args, dtype, loss):
    """(seed, problem) of `make` (random_problem or random_learned_problem): small random
    configurations, then deeper and wider ones with longer inner loops."""
    problems = [(s, make(s, dtype, loss=loss)) for s in range(args.configs)]
    return problems + [(s, make(s, dtype, loss=loss, **LARGE)) for s in range(1000, 1012)]


def plain(args, dtype):
    worst, count = {}, 0
    for group, loss in groups(args):
        problems = seeded(random_problem, args, dtype, loss)
        count += len(problems)
        for seed, pb in problems:
            fused = backend_outputs(to_device(pb, args.device), "fused")
            ref = backend_outputs(pb, "reference")
            for key in ref:
                err = relative_error(fused[key], ref[key])
                if err >= worst.get((group, key), (-1.0, None))[0]:
                    worst[(group, key)] = (err, seed)
    print(f"{dtype}, {count} configurations, fused on {args.device}:")
    for (group, key), (err, seed) in worst.items():
        print(f"  {group:13s} {key:10s} worst {err:.3e}  (seed {seed})")


def learned(args, dtype):
    worst = {}
    problems = [(f"{group} {s}", lp) for group, loss in groups(args)
                for s, lp in seeded(random_learned_problem, args, dtype, loss)]
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
                group = seed.rsplit(" ", 1)[0]
                if err >= worst.get((group, a, b, key), (-1.0, None))[0]:
                    worst[(group, a, b, key)] = (err, seed.rsplit(" ", 1)[1])
    print(f"{dtype}, {len(problems)} learned-rate configurations:")
    for (group, a, b, key), (err, seed) in worst.items():
        print(f"  {group:13s} {a:9s} vs {b:9s} {key:11s} worst {err:.3e}  (seed {seed})")


def random_daml(seed, dtype, loss=None):
    """A random DAML call's arguments (seeded); loss "cross_entropy": 2 to 13 classes (the
    other draws as for the regression losses) and class labels as y_query."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    sizes = [pick(1, 3)] + [pick(1, 12) for _ in range(pick(0, 3))] + [pick(1, 3)]
    if loss == "cross_entropy":
        sizes[-1] += 1 + seed % 11
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
    if loss == "cross_entropy":
        hyper["loss"] = loss
        tensors["y_query"] = class_labels(tensors["y_query"], seed)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, hyper


def daml(args, dtype):
    from pymaml import daml as D
    worst = {}
    for group, loss in groups(args):
        for seed in range(args.configs):
            daml_config(D, group, seed, *random_daml(seed, dtype, loss), worst)
    print(f"{dtype}, {args.configs} DAML configurations per group, fused vs reference:")
    for (group, widths, key), (err, seed) in sorted(worst.items()):
        print(f"  {group:13s} {widths:17s} {key:12s} worst {err:.3e}  (seed {seed})")


def daml_config(D, group, seed, tensors, hyper, worst):
    """One DAML configuration, fused against the reference: its errors into `worst`."""
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
        if err >= worst.get((group, widths, key), (-1.0, None))[0]:
            worst[(group, widths, key)] = (err, seed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=int, default=320)
    ap.add_argument("--device", default="cpu", help="where the fused op runs (default: cpu)")
    ap.add_argument("--learned", action="store_true",
                    help="learned inner rates and frozen layers, against torch.func too")
    ap.add_argument("--daml", action="store_true", help="random DAML configurations")
    ap.add_argument("--no-fused", action="store_true",
                    help="with --learned: the reference against torch.func only")
    ap.add_argument("--loss", choices=["all", *GROUPS], default="all",
                    help="the configurations' losses: regression (MSE / L1), cross_entropy, "
                         "or both (default)")
    args = ap.parse_args()
    for dtype in (torch.float64, torch.float32):
        (daml if args.daml else learned if args.learned else plain)(args, dtype)


if __name__ == "__main__":
    main()
