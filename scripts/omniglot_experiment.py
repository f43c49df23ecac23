"""The README's Omniglot experiment: meta-train the MAML paper's Omniglot MLP on the characters
of some alphabets, test on the characters of the others (never seen in training), 5-way 1-shot
and 5-shot, against two baselines on the same episodes.

    python scripts/omniglot_experiment.py DIR [--iterations 1000] [--out docs/images/omniglot]

DIR holds Omniglot archives (the official small subset images_background_small1.zip is
enough: 5 alphabets, 136 characters). The alphabets named by --test (default: Early_Aramaic
and Greek) are held out; the others, with their rotations as more classes, are meta-trained on
with the MAML paper's Omniglot MLP and settings (784-256-128-64-64-5 ReLU, cross-entropy,
meta-batch 32, Adam 0.001) but the inner loop of its 20-way runs, five steps of 0.1 (its 5-way
one, one step of 0.4, trains a model that diverges after more steps at that rate without the
paper's batch normalisation: docs/training.md), and 15 queries per class. The training
characters' drawings also appear shifted by up to --shift pixels (default 2) in x and y, every
such move as one more drawing of the same character (24 more per drawing, before the
rotations; the held-out characters are never moved): with only 90 training characters the
MLP otherwise overfits them (1-shot, 1,000 iterations: 91 % after 5 steps on episodes of
their own characters against 68 % on the held-out ones). Every --every
iterations the held-out accuracy after 5 steps is measured on 200 episodes (the curve); at
the end pymaml.evaluate's table on 600 episodes (15 queries per class) after 1, 3, 5 and 10
steps, with the baselines. Writes OUT.png (the
curves and a few held-out episodes with the 1-shot model's predictions) and prints the
tables and the time taken.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import pymaml
from pymaml import plots, tasks

SETTINGS = dict(sizes=[784, 256, 128, 64, 64, 5], loss="cross_entropy", inner_lr=0.1,
                inner_steps=5, meta_batch_size=32, optimizer="adam", outer_lr=1e-3)
QUERIES = 15  # per class, in training and testing


def shifted(x, dx, dy):
    """The images x [N, H, W] moved dx pixels right and dy down (negative: left, up), the
    strip they leave blank."""
    out = torch.zeros_like(x)
    H, W = x.shape[-2:]
    out[:, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        x[:, max(-dy, 0):H - max(dy, 0), max(-dx, 0):W - max(dx, 0)]
    return out


def families(root, test_alphabets, shots, shift=0):
    """(meta-training Episodes over the other alphabets' characters and their rotations, each
    drawing also moved by every (dx, dy) in [-shift, shift]^2 as more drawings of its
    character, meta-test Episodes over the held-out alphabets' characters as they are)."""
    x, labels, names = tasks.load_omniglot(root)
    held_out = [i for i, n in enumerate(names) if n.split("/")[1] in test_alphabets]
    seen = [i for i in range(len(names)) if i not in set(held_out)]
    if not held_out or not seen:
        raise SystemExit(f"--test {test_alphabets} must name some, not all, of the alphabets "
                         f"under {root}: {sorted({n.split('/')[1] for n in names})}")
    rows = torch.isin(labels, torch.tensor(seen))
    moves = [(dx, dy) for dx in range(-shift, shift + 1) for dy in range(-shift, shift + 1)]
    x_train = torch.cat([shifted(x[rows], dx, dy) for dx, dy in moves])  # (0, 0): as drawn
    labels_train = labels[rows].repeat(len(moves))  # a moved drawing keeps its character
    train = tasks.Episodes(x_train, labels_train, ways=5, shots=shots, queries=QUERIES,
                           classes=seen, rotations=True, name="omniglot-train")
    test = tasks.Episodes(x, labels, ways=5, shots=shots, queries=QUERIES, classes=held_out,
                          name="omniglot-test")
    return train, test, len(seen), len(held_out)


def run(root, shots, args, workdir):
    """Meta-trains in segments of args.every iterations (resuming the checkpoint), measuring
    the held-out accuracy after each; returns (model, [(iteration, accuracy)], seconds)."""
    train, test, n_seen, n_held = families(root, args.test, shots, args.shift)
    print(f"{shots}-shot: meta-train on {n_seen} characters (x4 rotations"
          f"{f', each drawing also moved up to {args.shift} px in x and y' if args.shift else ''}), "
          f"test on {n_held} never seen")
    ckpt = os.path.join(workdir, f"{shots}shot.ckpt")
    curve, seconds, model = [], 0.0, None
    for done in range(args.every, args.iterations + 1, args.every):
        result = pymaml.train(train, iterations=done, seed=args.seed, checkpoint=ckpt,
                              resume=done > args.every, checkpoint_every=args.every,
                              progress=False, log_every=0, **SETTINGS)
        seconds += result.wall_time
        model = result.model
        acc = pymaml.evaluate(model, test, steps=5, num_tasks=200, seed=1,
                              baselines=False).accuracy
        curve.append((done, acc))
        print(f"  iteration {done:>6}: held-out accuracy after 5 steps {100 * acc:.1f} %")
    return model, test, curve, seconds


def figure(path, curves, model, test):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    for shots, curve in curves.items():
        ax.plot(*zip(*[(i, 100 * a) for i, a in curve]), marker="o", label=f"5-way {shots}-shot")
    ax.set_xlabel("meta-training iterations")
    ax.set_ylabel("held-out accuracy after 5 steps (%)")
    ax.set_title("Omniglot, characters never seen in training", fontsize=10)
    ax.axhline(20, color="grey", lw=0.8, ls=":")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".png", dpi=110)
    plots.plot_episodes(model, path + "-episodes.png", test, seed=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="directory holding the Omniglot archives")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--every", type=int, default=250, help="iterations between held-out checks")
    p.add_argument("--test", nargs="+", default=["Early_Aramaic", "Greek"],
                   help="the alphabets held out for meta-testing")
    p.add_argument("--shift", type=int, default=2,
                   help="the training drawings also appear moved by up to this many pixels in x "
                   "and y (0: only as drawn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="omniglot", help="figure path prefix")
    args = p.parse_args(argv)
    start = time.perf_counter()
    curves, tables = {}, []
    with tempfile.TemporaryDirectory() as workdir:
        for shots in (1, 5):
            model, test, curves[shots], seconds = run(args.root, shots, args, workdir)
            result = pymaml.evaluate(model, test, steps=[1, 3, 5, 10], num_tasks=600)
            tables.append(result.table())
            print(f"{shots}-shot: {args.iterations} iterations in {seconds:.0f} s of training")
            if shots == 1:
                one_shot = (model, test)
    figure(args.out, curves, *one_shot)
    print("\n\n".join(tables))
    print(f"\n{args.out}.png, {args.out}-episodes.png; {time.perf_counter() - start:.0f} s in all "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
