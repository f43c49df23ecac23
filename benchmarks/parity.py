"""The worst fused-vs-reference difference over many seeded random configurations, per dtype
and per quantity, as max |fused - reference| / max(1, max |reference|).

    python benchmarks/parity.py [--configs 320] [--device cuda]

--device runs the fused op there (the CUDA kernels) and the reference on the CPU.
"""

import argparse

import torch

from pymaml.testing import LARGE, backend_outputs, random_problem, relative_error, to_device


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=int, default=320)
    ap.add_argument("--device", default="cpu", help="where the fused op runs (default: cpu)")
    args = ap.parse_args()
    for dtype in (torch.float64, torch.float32):
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


if __name__ == "__main__":
    main()
