"""One process of a distributed run for tests/test_distributed.py, started by torchrun:

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py SPEC.json

SPEC holds {"out": dir, "runs": [{"name": ..., "train": {pymaml.train keywords}, "fail": ...}]};
each run's final weights and losses go to OUT/NAME-rank{R}.pt; a run with "catch": true that
raises saves the error's type and message there instead, and the next run goes on. "fail": {"rank": r, "at": k,
"how": "raise" | "hang" | "interrupt"} makes rank r's task sampler raise, hang, or get a
SIGINT (a Ctrl-C that reaches that process only), at its k-th draw.
"""

import json
import os
import signal
import sys
import time

import torch

import pymaml
from pymaml import tasks


def sampler(family, fail):
    rank = int(os.environ["RANK"])
    calls = []

    def draw(T, generator):
        calls.append(1)
        if fail and rank == fail["rank"] and len(calls) == fail["at"]:
            if fail["how"] == "raise":
                raise RuntimeError(f"planted failure in rank {rank}'s sampler")
            if fail["how"] == "interrupt":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                time.sleep(600)  # a rank that stops answering
        return tuple(family.sample(T, generator=generator, dtype=torch.float64))
    draw.__name__ = f"{family.name}-test"
    return draw


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    rank = int(os.environ["RANK"])
    for run in spec["runs"]:
        kw = dict(run["train"])
        kw["dtype"] = getattr(torch, kw.get("dtype", "float32"))
        family = tasks.get_family(kw.pop("task"))
        task = sampler(family, run.get("fail")) if run.get("fail") else family
        path = os.path.join(spec["out"], f"{run['name']}-rank{rank}.pt")
        try:
            result = pymaml.train(task, **kw)
        except Exception as exc:
            if not run.get("catch"):
                raise
            torch.save(dict(error=type(exc).__name__, message=str(exc)), path)
            continue
        torch.save(dict(params=result.model.params.detach(), losses=result.losses,
                        status=result.status, config=result.config, rank=result.rank), path)


if __name__ == "__main__":
    main(sys.argv[1])
