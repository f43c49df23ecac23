"""SHA-256 fingerprints of the named experiments, to prove a refactor bitwise unchanged.

For each experiment below it trains through the public API (pymaml.train) on one thread and
records the SHA-256 of
  before: the initial weights, i.e. the model of the same call with iterations=0 (train seeds
          the initial weights before anything else, so this is the run's starting point);
  losses: result.losses as float64 bytes;
  after:  the trained tensors: model.params, plus model.learned_lr for runs that learn inner
          rates and model.loss_params for DAML (each hashed as "dtype shape" then its bytes).

    python benchmarks/compat_hashes.py [--quick] [--out FILE]      # print (and write) the JSON
    python benchmarks/compat_hashes.py --compare FILE              # rerun FILE's mode, compare

The experiments: the seed's (train() defaults, 275,000 iterations), the seed's DAML, the MAML
paper's sine run under Adam and, in its setting, Meta-SGD, ANIL and MAML++'s per-layer-step
rates; then 300 iterations of each algorithm on the reference backend. Full length takes
about 3.5 minutes on one thread (969acf4, 2-core container); --quick caps every run at 5,000
iterations (the reference runs are 300 either way): about 40 s. --compare reruns the
experiments in FILE in FILE's mode (quick or full), prints "match" or "MISMATCH in <field>"
per experiment and exits 1 on any mismatch; final_loss and wall_time_s are informative only.
benchmarks/compat_969acf4_{full,quick}.json are commit 969acf4's. Mind which pymaml is
imported: `python -m ...` or `python -c` from a checkout put its tree first on sys.path.
"""

import argparse
import hashlib
import json
import sys
import time

import torch

import pymaml

QUICK_ITERATIONS = 5_000
# the MAML paper's sine run (README: Adam 1e-3, 70,000 iterations, init torch)
PAPER = dict(task="sine", sizes=[1, 40, 40, 1], loss="mse", inner_steps=1, inner_lr=0.01,
             shots=10, meta_batch_size=25, iterations=70_000, optimizer="adam", outer_lr=1e-3,
             init="torch")
# short runs on the reference backend (plain autograd), the seed's settings otherwise
REF = dict(backend="reference", iterations=300, meta_batch_size=2)

EXPERIMENTS = {
    "seed": dict(),                                   # pymaml.train() defaults: 275,000 iterations
    "daml": dict(algorithm="daml"),                   # the seed's DAML experiment
    "paper-adam": PAPER,
    "metasgd": dict(PAPER, algorithm="metasgd"),
    "anil": dict(PAPER, algorithm="anil"),
    "per-layer-step": dict(PAPER, learn_inner_lr="per-layer-step"),
    **{f"reference-{a}": dict(REF, algorithm=a)
       for a in ["maml", "fomaml", "reptile", "metasgd", "anil", "daml"]},
    "reference-per-layer-step": dict(REF, learn_inner_lr="per-layer-step"),
}


def tensor_hash(t) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype} {list(t.shape)}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def trained_tensors(model) -> dict:
    named = {"params": model.params, "learned_lr": getattr(model, "learned_lr", None),
             "loss_params": getattr(model, "loss_params", None)}
    return {k: tensor_hash(v) for k, v in named.items() if v is not None}


def run(name, quick) -> dict:
    kw = dict(EXPERIMENTS[name], progress=False, log_every=0)
    if quick:
        kw["iterations"] = min(kw.get("iterations", QUICK_ITERATIONS), QUICK_ITERATIONS)
    start = pymaml.train(**dict(kw, iterations=0))
    t = time.perf_counter()
    result = pymaml.train(**kw)
    wall = time.perf_counter() - t
    losses = torch.as_tensor(result.losses, dtype=torch.float64).contiguous()
    return dict(iterations=len(losses), before=trained_tensors(start.model),
                losses=hashlib.sha256(losses.numpy().tobytes()).hexdigest(),
                after=trained_tensors(result.model),
                final_loss=float(losses[-1]) if len(losses) else None, wall_time_s=round(wall, 2))


def run_all(quick, names) -> dict:
    out = dict(pymaml_version=pymaml.__version__, torch_version=torch.__version__,
               quick=quick, experiments={})
    for name in names:
        out["experiments"][name] = entry = run(name, quick)
        print(f"{name}: {entry['iterations']} iterations, {entry['wall_time_s']} s",
              file=sys.stderr, flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"at most {QUICK_ITERATIONS:,} iterations per run")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--compare", metavar="FILE", help="rerun FILE's experiments and compare")
    ap.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="these experiments")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.compare:
        with open(args.compare) as f:
            expected = json.load(f)
        names = args.only or list(expected["experiments"])
        if set(names) - set(expected["experiments"]):
            ap.error(f"{args.compare} holds no {sorted(set(names) - set(expected['experiments']))}")
        got = run_all(expected["quick"], names)
    else:
        got = run_all(args.quick, args.only or list(EXPERIMENTS))
    text = json.dumps(got, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if not args.compare:
        print(text)
        return 0
    bad = 0
    for name in names:
        e, g = expected["experiments"][name], got["experiments"][name]
        diff = [k for k in ("iterations", "losses") if e[k] != g[k]]
        diff += [f"{k}.{t}" for k in ("before", "after")
                 for t in sorted(set(e[k]) | set(g[k])) if e[k].get(t) != g[k].get(t)]
        bad += bool(diff)
        print(f"{name}: " + ("match" if not diff else "MISMATCH in " + ", ".join(diff)))
    print(f"{len(names) - bad} of {len(names)} experiments match")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
