"""Writes the fixtures of tests/test_files_969acf4.py into tests/data/v969acf4/.

Made once with the build of commit 969acf4 (version string 0.1.0; the tree before the package
refactor), one thread:  cd <969acf4 tree, built> && PYTHONPATH=. python <this file> <output dir>.
Tiny networks (1-8-8-1; DAML's loss network 17-8-1), so each file is a few KB. For each run
NAME it writes
  NAME.ckpt      the checkpoint of the run stopped at iteration 20 (train(iterations=20, ...)),
  NAME.pt        the model of the uninterrupted 40-iteration run (result.model.save),
  NAME.expected  torch.save'd dict: settings (train()'s arguments but iterations), the trained
                 tensors at 20 (mid) and 40 (final: params, learned_lr, loss_params where the
                 run has them), the 40 losses, fast_iterations, and the evaluation numbers of
                 the saved model (EVAL below),
which a resume of NAME.ckpt to 40 iterations, and pymaml.load(NAME.pt), must reproduce.
The runs cover every algorithm, the chunked fast paths (train_chunk, train_chunk_rates,
daml_train_chunk) and the per-iteration path (optimizer_kwargs fused=False: torch.optim's own
step; per-layer-step rates always go that way).
"""

import os
import sys

import torch

import pymaml

TINY = dict(sizes=[1, 8, 8, 1])
ADAM = dict(optimizer="adam", outer_lr=1e-3)
DAML = dict(algorithm="daml", loss_sizes=[17, 8, 1])
# name: (train() settings, whether the run takes a chunked fast path)
RUNS = {
    "maml": (dict(TINY), True),
    "maml_per_iteration": (dict(TINY, **ADAM, optimizer_kwargs=dict(fused=False)), False),
    "fomaml": (dict(TINY, algorithm="fomaml", meta_batch_size=2, **ADAM), True),
    "reptile": (dict(TINY, algorithm="reptile", meta_batch_size=2), True),
    "metasgd": (dict(TINY, algorithm="metasgd", task="sine", loss="mse", inner_steps=1,
                     inner_lr=0.01, shots=5, meta_batch_size=3, **ADAM), True),
    "anil": (dict(TINY, algorithm="anil", meta_batch_size=2), True),
    "per_layer_step": (dict(TINY, learn_inner_lr="per-layer-step", inner_steps=2, **ADAM), False),
    "daml": (dict(TINY, **DAML), True),
    "daml_per_iteration": (dict(TINY, **DAML, **ADAM, optimizer_kwargs=dict(fused=False)), False),
}
MID, FINAL = 20, 40
QUIET = dict(progress=False, log_every=0)


def trained(model) -> dict:
    """The model's trained tensors (public names), copied."""
    named = dict(params=model.params, learned_lr=getattr(model, "learned_lr", None),
                 loss_params=getattr(model, "loss_params", None))
    return {k: v.detach().clone() for k, v in named.items() if v is not None}


def evaluation(model, settings) -> list:
    """A short evaluation of the model (20 held-out tasks): MetaMLP, the held-out MSE after 1
    and 2 steps; DAMLModel, each phase's grid MAE after its inner steps."""
    if settings.get("algorithm") == "daml":
        return [r["mae"] for r in pymaml.evaluate(model, num_tasks=20).rows]
    task = settings.get("task", "seed-sine")
    return list(pymaml.evaluate(model, task, shots=4, steps=[1, 2], num_tasks=20).mse)


def main(out):
    torch.set_num_threads(1)
    os.makedirs(out, exist_ok=True)
    for name, (settings, fast) in RUNS.items():
        mid = pymaml.train(iterations=MID, checkpoint=os.path.join(out, name + ".ckpt"),
                           **settings, **QUIET)
        whole = pymaml.train(iterations=FINAL, **settings, **QUIET)
        assert (whole.fast_iterations > 0) == fast, (name, whole.fast_iterations)
        whole.model.save(os.path.join(out, name + ".pt"))
        torch.save(dict(commit="969acf4", pymaml_version=pymaml.__version__, settings=settings,
                        mid=trained(mid.model), final=trained(whole.model),
                        losses=whole.losses.clone(), fast_iterations=whole.fast_iterations,
                        eval=evaluation(whole.model, settings)),
                   os.path.join(out, name + ".expected"))
        print(name, whole.fast_iterations, "fast iterations")


if __name__ == "__main__":
    main(sys.argv[1])
