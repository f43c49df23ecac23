"""The seed's experiment as a user runs it: pymaml.train() on its defaults (275,000 iterations,
seed-sine, MAML), one thread; prints the seconds of training and the time per iteration.
`paper` instead runs 5,000 iterations of the MAML paper's setting (sine, 1-40-40-1, MSE, one
inner step, meta-batch 25, Adam); `reptile` 20,000 of the seed's task with Reptile. For
before/after comparisons, run it alternately in two trees, pinned to one core:

    taskset -c 1 python benchmarks/seed_time.py [paper | reptile]
"""

import os
import sys

import torch

import pymaml

SETTINGS = {
    "seed": {},
    "paper": dict(task="sine", sizes=(1, 40, 40, 1), loss="mse", inner_steps=1, inner_lr=0.01,
                  shots=10, meta_batch_size=25, iterations=5000, optimizer="adam",
                  outer_lr=1e-3, init="torch"),
    "reptile": dict(algorithm="reptile", iterations=20000),
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    name = sys.argv[1] if len(sys.argv) > 1 else "seed"
    run = pymaml.train(progress=False, log_every=0, **SETTINGS[name])
    tree = os.path.dirname(os.path.dirname(os.path.abspath(pymaml.__file__)))
    print(f"{tree} {name}: {run.iterations} iterations in {run.wall_time:.2f} s, "
          f"{run.wall_time / run.iterations * 1e6:.2f} us per iteration")
