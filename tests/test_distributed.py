"""Data-parallel training over processes (pymaml.distributed): two gloo processes started by
torchrun on this machine against one process fed the same tasks, resuming, failing ranks,
and the command line. Each torchrun launch takes a few seconds, so the launches are shared."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import pymaml
from pymaml import distributed as D
from pymaml import tasks

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch has no torch.distributed with gloo")

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
SEED = 3
# SGD with momentum: Adam would turn rounding noise in a near-zero meta-gradient entry into a
# full step (m / sqrt(v) ~ +-1), which Reptile's direction (params - mean adapted, a
# difference of nearly equal numbers) shows after a few iterations in float32.
COMMON = dict(task="sine", sizes=[1, 24, 24, 1], loss="mse", meta_batch_size=8, iterations=25,
              optimizer="sgd", outer_lr=0.02, optimizer_kwargs=dict(momentum=0.9),
              inner_lr=0.02, inner_steps=3, backend="fused", seed=SEED, progress=False,
              log_every=0)
ALGORITHMS = ("maml", "fomaml", "reptile")
DTYPES = ("float64", "float32")
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}  # relative to the largest weight (seen: 4e-16, 2e-7)


def torchrun(args, nproc=2, timeout=180):
    """Runs `torchrun --standalone --nproc_per_node=nproc ARGS`; returns (code, output, seconds)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}"] + list(args),
                       capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


def launch(tmp_path, runs, **kw):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(dict(out=str(tmp_path), runs=runs)))
    return torchrun([WORKER, str(spec)], **kw)


def rank_result(tmp_path, name, rank):
    return torch.load(tmp_path / f"{name}-rank{rank}.pt", weights_only=False)


def relative_difference(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1)).item()


def one_process_same_tasks(dtype, algorithm, **kw):
    """One process trained on the tasks that two processes draw: at each iteration, rank 0's
    share from the run's generator, then rank 1's from its own stream."""
    family = tasks.get_family(COMMON["task"])
    rank1 = torch.Generator().manual_seed(D.task_seed(SEED, 1))

    def both_shares(T, generator):
        mine = family.sample(T // 2, generator=generator, dtype=torch.float64)
        theirs = family.sample(T // 2, generator=rank1, dtype=torch.float64)
        return tuple(torch.cat([a, b]) for a, b in zip(mine, theirs))
    settings = dict(COMMON, algorithm=algorithm, dtype=getattr(torch, dtype), **kw)
    del settings["task"]
    return pymaml.train(both_shares, **settings)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    runs = [dict(name=f"{a}-{d}", train=dict(COMMON, algorithm=a, dtype=d))
            for a in ALGORITHMS for d in DTYPES]
    code, output, _ = launch(out, runs)
    assert code == 0, output
    return out, output


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_processes_match_one_process_on_the_same_tasks(two_process_runs, algorithm, dtype):
    out, _ = two_process_runs
    r0, r1 = (rank_result(out, f"{algorithm}-{dtype}", r) for r in (0, 1))
    # every process holds identical weights and the same (global) loss history
    assert torch.equal(r0["params"], r1["params"]) and torch.equal(r0["losses"], r1["losses"])
    assert r0["config"]["processes"] == 2 and (r0["rank"], r1["rank"]) == (0, 1)
    one = one_process_same_tasks(dtype, algorithm)
    weights = relative_difference(r0["params"], one.model.params.detach())
    losses = relative_difference(r0["losses"], one.losses)
    # shown with pytest -s: the figures of the note
    print(f"\n{algorithm} {dtype}: two processes vs one, worst relative difference: weights "
          f"{weights:.1e}, meta-losses {losses:.1e}")
    assert weights < TOLERANCE[dtype] and losses < TOLERANCE[dtype]
    # and the weights did move: the comparison is not of two untrained starts
    start = one_process_same_tasks(dtype, algorithm, iterations=0).model.params.detach()
    assert relative_difference(r0["params"], start) > 100 * TOLERANCE[dtype]


def test_the_ranks_draw_different_tasks(two_process_runs):
    # rank 1's stream is not rank 0's: training on two copies of rank 0's share would differ
    out, _ = two_process_runs
    family = tasks.get_family(COMMON["task"])
    doubled = pymaml.train(
        lambda T, g: tuple(torch.cat([t, t]) for t in family.sample(T // 2, generator=g, dtype=torch.float64)),
        **dict({k: v for k, v in COMMON.items() if k != "task"}, algorithm="maml", dtype=torch.float64))
    assert relative_difference(rank_result(out, "maml-float64", 0)["params"],
                               doubled.model.params.detach()) > 1e-6


def test_checkpoint_written_under_two_processes_resumes_under_two(tmp_path):
    ckpt = str(tmp_path / "run.ckpt")
    base = dict(COMMON, algorithm="maml", dtype="float32", checkpoint_every=7, log_every=5)
    runs = [dict(name="whole", train=dict(base, iterations=20)),
            dict(name="part", train=dict(base, iterations=12, checkpoint=ckpt)),
            dict(name="resumed", train=dict(base, iterations=20, checkpoint=ckpt, resume=True)),
            # a new run over the saved one is refused on every process, the file kept
            dict(name="refused", train=dict(base, checkpoint=ckpt), catch=True)]
    code, output, _ = launch(tmp_path, runs)
    assert code == 0, output
    for rank in (0, 1):
        whole, resumed = rank_result(tmp_path, "whole", rank), rank_result(tmp_path, "resumed", rank)
        assert torch.equal(resumed["params"], whole["params"])
        assert torch.equal(resumed["losses"], whole["losses"])
    for rank in (0, 1):
        refused = rank_result(tmp_path, "refused", rank)
        assert refused["error"] == "FileExistsError" and "already exists" in refused["message"]
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iteration"] == 20 and saved["config"]["processes"] == 2
    assert len(saved["task_generators"]) == 2
    # only rank 0 logs: one line per 5 iterations of the three runs (4 + 3 + 2 lines)
    assert output.count("meta-loss") == 9, output
    # a one-process run cannot continue the two streams
    with pytest.raises(ValueError, match="written by a run of 2 process.*resume it with 2"):
        pymaml.train(**dict({k: v for k, v in base.items() if k != "dtype"}, iterations=30,
                            checkpoint=ckpt, resume=True))


@pytest.mark.parametrize("how", ["raise", "hang"])
def test_a_failing_rank_stops_the_whole_run(tmp_path, how):
    # rank 1 raises (or stops answering) at its 4th draw; rank 0 waits at the all-reduce of
    # iteration 4 and must stop with a clear error, not hang: the timeout is 4 s
    run = dict(name="failing", train=dict(COMMON, algorithm="maml", distributed_timeout=4.0),
               fail=dict(rank=1, at=4, how=how))
    code, output, seconds = launch(tmp_path, [run], timeout=120)
    assert code != 0
    assert "DistributedError: rank 0 of 2: the all-reduce of iteration 4 failed" in output, output
    if how == "raise":
        assert "planted failure in rank 1's sampler" in output
    else:
        assert "did not answer within the 4 s timeout" in output
    assert seconds < 60, output
    assert not (tmp_path / "failing-rank0.pt").exists()


def test_ctrl_c_in_one_process_stops_every_process_after_the_same_iteration(tmp_path):
    ckpt = str(tmp_path / "run.ckpt")
    run = dict(name="stopped", train=dict(COMMON, algorithm="maml", checkpoint=ckpt),
               fail=dict(rank=1, at=6, how="interrupt"))
    code, output, _ = launch(tmp_path, [run])
    assert code == 0, output
    for rank in (0, 1):
        result = rank_result(tmp_path, "stopped", rank)
        assert result["status"] == "interrupted" and len(result["losses"]) == 6
    assert torch.load(ckpt, weights_only=True)["iteration"] == 6
    assert output.count("interrupted at iteration 6/25") == 1, output


def test_the_command_line_under_torchrun(tmp_path):
    prefix = str(tmp_path / "cli")
    args = ["-m", "pymaml", "train", "--task", "sine", "--sizes", "1,16,16,1", "--loss", "mse",
            "--meta-batch-size", "4", "--iterations", "30", "--optimizer", "adam",
            "--log-every", "10", "--out", prefix]
    code, output, _ = torchrun(args)
    assert code == 0, output
    assert output.count("30 meta-iterations done (maml, fused backend, 2 processes") == 1, output
    assert output.count("iteration 30/30") == 1, output
    for suffix in (".pt", ".ckpt", ".png", "-loss.png"):
        assert os.path.exists(prefix + suffix), suffix
    assert pymaml.load(prefix + ".pt").info["iterations"] == 30
    # the global meta-batch must split evenly: every process says so and the run stops
    code, output, _ = torchrun(args[:7] + ["--meta-batch-size", "3", "--iterations", "5",
                                           "--out", str(tmp_path / "odd")])
    assert code != 0
    assert "meta_batch_size 3 does not divide across 2 processes" in output, output


# ---- in one process -------------------------------------------------------------------------------

def test_distributed_true_needs_a_launch(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="distributed=True needs a process group: launch with torchrun"):
        pymaml.train(iterations=1, distributed=True, progress=False)
    with pytest.raises(TypeError, match="distributed must be None"):
        pymaml.train(iterations=1, distributed="yes", progress=False)
    with pytest.raises(ValueError, match="distributed_timeout must be a positive"):
        pymaml.train(iterations=1, distributed_timeout=0, progress=False)


def test_a_one_process_group_trains_bitwise_as_no_group(monkeypatch):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kw = dict(COMMON, algorithm="maml", iterations=15)
    plain = pymaml.train(**kw)
    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    assert pymaml.train(**kw).config["processes"] == 1  # auto: one process needs no group
    grouped = pymaml.train(distributed=True, **kw)
    assert not dist.is_initialized()  # train() made the group, and closed it
    assert grouped.config["processes"] == 1
    assert torch.equal(grouped.model.params, plain.model.params)
    assert torch.equal(grouped.losses, plain.losses)


def test_task_seeds_are_distinct_and_reproducible():
    seeds = {D.task_seed(s, r) for s in range(20) for r in range(1, 20)}
    assert len(seeds) == 19 * 20 and all(0 <= s < 2**64 for s in seeds)
    assert D.task_seed(5, 3) == D.task_seed(5, 3)
    with pytest.raises(ValueError, match="rank >= 1"):
        D.task_seed(0, 0)


# ---- DAML as MAML: the same decision, data-parallel under torchrun --------------------------------

def test_daml_under_torchrun_trains_data_parallel_as_maml_does(tmp_path):
    prefix = str(tmp_path / "daml")
    args = ["-m", "pymaml", "train", "--algorithm", "daml", "--meta-batch-size", "2",
            "--iterations", "20", "--no-plots", "--log-every", "10", "--out", prefix]
    code, output, _ = torchrun(args)  # no --distributed: on, as for MAML
    assert code == 0, output
    assert output.count("20 meta-iterations done (daml, fused backend, 2 processes") == 1, output
    assert output.count("iteration 20/20") == 1, output  # rank 0 alone speaks
    saved = torch.load(prefix + ".ckpt", weights_only=True)
    assert saved["config"]["processes"] == 2 and len(saved["task_generators"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["daml.ckpt", "daml.pt"]
    # --no-distributed would have each process train the whole run and write the same files
    code, output, _ = torchrun(args[:-1] + [str(tmp_path / "copies"), "--no-distributed"])
    assert code != 0
    assert output.count("--no-distributed under a torchrun launch of 2 processes: each would "
                        "train the whole run and write the same files") == 2, output
    assert not any(n.startswith("copies") for n in os.listdir(tmp_path))


def test_the_decision_to_spread_is_the_same_for_every_algorithm(monkeypatch):
    """Group.join decides from the launch alone: no algorithm enters it (so DAML spreads where
    MAML does); check_not_copies refuses --no-distributed in a launch of several."""
    import inspect
    assert list(inspect.signature(D.Group.join).parameters) == ["distributed", "device",
                                                                "timeout_s"]
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert D.launch_size() == 1
    for choice in (None, False):
        assert D.Group.join(choice, torch.device("cpu"), 5.0) is None
        D.check_not_copies(choice)  # one process: nothing to refuse
    launch = dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    for key, value in launch.items():
        monkeypatch.setenv(key, value)
    assert D.launch_size() == 2
    assert D.Group.join(False, torch.device("cpu"), 5.0) is None
    D.check_not_copies(None)
    D.check_not_copies(True)
    with pytest.raises(ValueError, match="--no-distributed under a torchrun launch of 2 "):
        D.check_not_copies(False, "--no-distributed")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.Group.join(None, torch.device("cpu"), 5.0) is None  # one process: no group
    D.check_not_copies(False)
