"""The worst fused-vs-reference difference over many seeded random configurations, per dtype
and per quantity, as max |fused - reference| / max(1, max |reference|).

    python benchmarks/parity.py [--configs 320] [--device cuda]
    python benchmarks/parity.py --learned [--configs 320]

--device runs the fused op there (the CUDA kernels) and the reference on the CPU. --learned
takes learned inner rates and frozen layers (pymaml.testing.random_learned_problem: every rate
shape, layer subsets, both orders, per-step batches) and compares three ways, the reference
against the torch.func oracle, the fused op against the reference and against the oracle, in
issue 14's measure: max |a - b| / max(max |b|, tiny), per quantity.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=int, default=320)
    ap.add_argument("--device", default="cpu", help="where the fused op runs (default: cpu)")
    ap.add_argument("--learned", action="store_true",
                    help="learned inner rates and frozen layers, against torch.func too")
    ap.add_argument("--no-fused", action="store_true",
                    help="with --learned: the reference against torch.func only")
    args = ap.parse_args()
    for dtype in (torch.float64, torch.float32):
        (learned if args.learned else plain)(args, dtype)


if __name__ == "__main__":
    main()
