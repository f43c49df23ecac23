"""Writes the old-format checkpoint fixtures of tests/test_old_checkpoints.py.

Run once with pymaml 0.1.0 before its outer optimizer moved to torch's fused kernels (commit
e6b44dc), from that version's tree:  cd <that tree> && python <this file> <output dir>.
Its "sgd" / "adam" optimizers were torch.optim's default (fused=None) ones, and its
checkpoints hold their state. For each run it writes the checkpoint at iteration 60
(<name>.ckpt) and what the uninterrupted 120-iteration run of that version ends with
(<name>.expected: params and losses), which a resume to 120 must reproduce.
"""

import os
import sys

import torch

import pymaml

RUNS = {
    "seed_sgd": dict(),  # the seed's experiment
    "sine_adam": dict(task="sine", optimizer="adam", outer_lr=1e-3, meta_batch_size=3,
                      optimizer_kwargs=dict(amsgrad=True)),
}


def main(out):
    torch.set_num_threads(1)
    for name, kw in RUNS.items():
        kw = dict(kw, progress=False, log_every=0)
        pymaml.train(iterations=60, checkpoint=os.path.join(out, name + ".ckpt"), **kw)
        whole = pymaml.train(iterations=120, **kw)
        torch.save(dict(pymaml_version=pymaml.__version__, params=whole.model.params,
                        losses=whole.losses), os.path.join(out, name + ".expected"))


if __name__ == "__main__":
    main(sys.argv[1])
