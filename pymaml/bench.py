"""The benchmark suite (issue 4): the fused op side by side with the autograd reference and
torch.func, in one run, on the same task data and the same starting weights.

    python -m pymaml bench [--quick] [--out PREFIX] [--only core,T,S,width,threads,memory,train,processes,cuda]

prints a table and writes PREFIX.json (every raw number, the machine) and PREFIX.png (the
fused op's speed-up over the other implementations against T and against S).

What is timed: one meta-iteration, the meta-gradient of a meta-batch plus the outer optimizer
step, as pymaml.train runs it. Implementations (`IMPLEMENTATIONS`):

- "fused": the raw op torch.ops.pymaml.maml_loss(..., need_grad=True) -> (loss, grad), then
  `params.grad = grad; opt.step()` (the trainer's fused path);
- "reference": pymaml.reference.maml_loss and torch.autograd.grad (the seed's Python loop over
  tasks and inner steps, create_graph=True);
- "torchfunc": torch.func: grad of the inner loss through an unrolled inner loop, vmap over
  the tasks, grad of the mean query loss (second order, or first order by detaching the inner
  gradients), on a functional MLP over the flat parameters.

Before timing a workload, every implementation's meta-gradient at the shared starting weights
is compared with the reference's (or torch.func's where the reference is skipped); one that
disagrees beyond float32 rounding is reported as a mismatch and not timed. Timing is on one
thread except the threads section: warm-up, then rounds of back-to-back calls timed with
time.perf_counter, the rounds of the implementations interleaved; the median over rounds of
the time per call is reported. A sweep point
whose time, extrapolated from the implementation's previous point by the flop count, exceeds
a cap is skipped and listed as skipped.

Peak memory is measured in a fresh process per (implementation, S): the peak resident set
during a few meta-iterations above the resident set after setup. The processes section
(pymaml/bench_processes.py) times pymaml.train over one and two torch.distributed processes.

The cuda section (only where torch.cuda.is_available()) times the meta-gradient alone, without
the optimizer step, on the GPU: W2 at T = 1 to 65536, the three implementations, with tasks/s
and TFLOP/s against the GPU's float32 matmul rate (TF32 off), and the issue's H100 targets.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch.nn import functional as torch_F

from . import _ops
from . import functional as F
from . import reference as _reference
from . import tasks as _tasks
from ._layout import unflatten
from ._version import __version__

__all__ = ["Workload", "W1", "W2", "IMPLEMENTATIONS", "SECTIONS", "meta_iteration_flops",
           "measure_matmul_gflops", "make_data", "make_implementation", "verify", "time_steps",
           "measure_workload", "measure_memory", "measure_train", "run", "format_table",
           "write_outputs", "plot"]

IMPLEMENTATIONS = ("fused", "reference", "torchfunc")
SECTIONS = ("core", "T", "S", "width", "threads", "memory", "train", "processes", "cuda")

# max |g - g_oracle| / max(1, max |g_oracle|): the float32 bound of the test suite's oracle tests.
VERIFY_TOLERANCE = 1e-4
_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


# ---- workloads ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark setting: an MLP (sizes, activation), its loss, K support and Q query points
    per task, S inner SGD steps at inner_lr, T tasks per meta-batch, the outer optimizer, and the
    order of the meta-gradient. `base` names the issue's workload it derives from ("W1", "W2");
    `task` and `init` say how the data and starting weights are drawn."""
    base: str
    sizes: tuple
    activation: str
    loss: str
    K: int
    Q: int
    S: int
    T: int
    inner_lr: float
    optimizer: str
    outer_lr: float
    task: str
    init: str
    first_order: bool = False
    dtype: str = "float32"

    def replace(self, **changes) -> "Workload":
        return dataclasses.replace(self, **changes)

    @property
    def order(self) -> str:
        return "1st" if self.first_order else "2nd"

    def label(self) -> str:
        """The base name and what differs from it, e.g. "W2 S=1", "W2 T=64", "W2 w=128"."""
        base = BASES[self.base]
        parts = [self.base]
        if self.sizes != base.sizes:
            hidden = set(self.sizes[1:-1])
            parts.append(f"w={hidden.pop()}" if len(hidden) == 1 else "-".join(map(str, self.sizes)))
        for field in ("K", "Q", "S", "T"):
            if getattr(self, field) != getattr(base, field):
                parts.append(f"{field}={getattr(self, field)}")
        return " ".join(parts)


# W1, the seed: 1-32-32-1 ReLU, L1, K=Q=4, S=5, T=1, SGD (the seed's rates).
W1 = Workload("W1", sizes=(1, 32, 32, 1), activation="relu", loss="l1", K=4, Q=4, S=5, T=1,
              inner_lr=3e-2, optimizer="sgd", outer_lr=1e-2, task="seed-sine", init="seed")
# W2, the MAML paper's sine regression: 1-40-40-1 ReLU, MSE, K=Q=10, S=5, T=25, Adam 1e-3.
W2 = Workload("W2", sizes=(1, 40, 40, 1), activation="relu", loss="mse", K=10, Q=10, S=5, T=25,
              inner_lr=1e-2, optimizer="adam", outer_lr=1e-3, task="sine", init="torch")
BASES = {"W1": W1, "W2": W2}


def meta_iteration_flops(w: Workload) -> int:
    """The floating-point operations of one meta-iteration, counted in the weight matmuls only.

    P_w = sum over layers of n_in * n_out (weights only: biases, activations, losses and the
    optimizer step are ignored). Per task, a forward plus backward pass over N points costs
    ≈ 6·N·P_w (2·N·P_w forward, 4·N·P_w backward: the input gradient and the weight gradient).
    One meta-iteration does, per task:
      S inner steps on the K support points       S · 6·K·P_w
      the query pass (forward + backward)         6·Q·P_w
      S Hessian-vector products (second order),
        each ≈ 2 forward + backward on K points   S · 12·K·P_w
    so T · 6·P_w · (3·S·K + Q) for second order and T · 6·P_w · (S·K + Q) for first order
    (no Hessian-vector products)."""
    P_w = sum(n_in * n_out for n_in, n_out in zip(w.sizes[:-1], w.sizes[1:]))
    support_passes = w.S * (1 if w.first_order else 3)
    return w.T * 6 * P_w * (support_passes * w.K + w.Q)


def _plan(quick: bool) -> Dict[str, object]:
    """What each section measures. --quick keeps every section but with a couple of small
    points (second order only in the sweeps), so the whole run takes seconds."""
    orders = (False, True)
    if quick:
        return dict(
            core=[w.replace(first_order=fo) for w in (W1, W2) for fo in orders],
            T=[W2.replace(T=T) for T in (1, 4)],
            S=[W2.replace(S=S) for S in (1, 2)],
            width=[W2.replace(sizes=(1, n, n, 1), T=4) for n in (32, 64)],
            threads=[W2.replace(T=T) for T in (25,)],
            memory=dict(S=(5,), implementations=("fused", "reference"), iterations=1),
            train=dict(iterations=300, repeats=1, budget_s=0.3),
            timing=dict(rounds=3, round_s=0.005, cell_budget_s=0.1, max_iter_s=0.5),
            cuda=[W2.replace(T=T) for T in (1, 25)],
        )
    return dict(
        core=[w.replace(first_order=fo) for w in (W1, W2, W2.replace(S=1), W2.replace(S=50))
              for fo in orders],
        T=[W2.replace(T=T, first_order=fo) for fo in orders
           for T in (1, 4, 16, 25, 64, 256, 1024, 4096)],
        S=[W2.replace(S=S, first_order=fo) for fo in orders for S in (1, 2, 5, 10, 20, 50)],
        width=[W2.replace(sizes=(1, n, n, 1), first_order=fo) for fo in orders
               for n in (32, 64, 128, 256)],
        threads=[W2.replace(T=T) for T in (25, 64, 256)],
        memory=dict(S=(1, 5, 10, 20, 50), implementations=IMPLEMENTATIONS, iterations=3),
        train=dict(iterations=10_000, repeats=3, budget_s=3.0),
        timing=dict(rounds=11, round_s=0.1, cell_budget_s=2.0, max_iter_s=6.0),
        cuda=[W2.replace(T=T) for T in CUDA_T],
    )


# ---- targets (issue 4), on the CPU -----------------------------------------------------------------

TIME_TARGETS = {  # fused, second order, seconds per meta-iteration
    W2: 0.60e-3,
    W2.replace(S=1): 0.15e-3,
    W2.replace(S=50): 6e-3,
}
TRAIN_TARGET_S = 20e-6        # W1 end to end in pymaml.train, per iteration
THREADS_TARGET = 1.7          # two threads vs one, fused, T >= 25
THREADS_TARGET_MIN_T = 25
MEMORY_TARGET_MB = 10.0       # fused peak at S=50 within this of S=5 on W2


# ---- the machine ---------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, object]:
    info = dict(cpu_model=_cpu_model(), cpu_count=os.cpu_count(), torch_version=torch.__version__,
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                default_threads=torch.get_num_threads(), pymaml_version=__version__,
                fused_available=_ops.available(), fused_cuda=_ops.cuda_compiled(),
                python=platform.python_version(), platform=platform.platform(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    if not _ops.available():
        info["fused_unavailable"] = _ops.unavailable_reason(torch.device("cpu"), torch.float32)
    return info


def _sync_fn(device: torch.device) -> Callable[[], None]:
    # Kernels on a GPU run asynchronously: a timed round ends when the device is done.
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def measure_matmul_gflops(sizes: Sequence[int] = (512, 1024), repeats: int = 11,
                          device="cpu") -> Dict[str, object]:
    """The float32 matmul rate the machine reaches (torch.mm of n x n matrices, 2·n³ flops),
    on one thread for the CPU, with TF32 off on a GPU: the median over `repeats` calls per size;
    "gflops" is the best size's. The yardstick the workloads' GFLOP/s are read against."""
    device = torch.device(device)
    sync = _sync_fn(device)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    restore_precision = _full_float32_matmul(device)
    try:
        by_size = {}
        for n in sizes:
            g = torch.Generator().manual_seed(n)
            a = torch.rand(n, n, generator=g).to(device)
            b = torch.rand(n, n, generator=g).to(device)
            out = torch.empty(n, n, device=device)
            torch.mm(a, b, out=out)  # warm-up
            sync()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.mm(a, b, out=out)
                sync()
                times.append(time.perf_counter() - t0)
            by_size[n] = 2 * n ** 3 / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(before)
        restore_precision()
    return dict(gflops=max(by_size.values()), by_size=by_size, device=str(device),
                threads=1 if device.type == "cpu" else None,
                tf32=False if device.type == "cuda" else None)


def _full_float32_matmul(device: torch.device) -> Callable[[], None]:
    """On a GPU, turns TF32 off for float32 matmuls (the rate the fused op's plain FMAs are read
    against); returns the function that puts the previous settings back."""
    if device.type != "cuda":
        return lambda: None
    before = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False

    def restore():
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]
    return restore


# ---- implementations --------------------------------------------------------------------------------

def make_data(w: Workload, device="cpu", seed: int = 0):
    """(TaskBatch, params [P]) for workload w: the meta-batch drawn from its task family and
    the starting weights, both from one seeded generator, so every implementation gets the same."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, w.dtype)
    params = F.init_params(list(w.sizes), generator=g, dtype=torch.float64,
                           zero_bias=w.init == "seed").to(device=device, dtype=dtype)
    family = _tasks.get_family(w.task, shots=w.K, queries=w.Q)
    batch = family.sample(w.T, generator=g, dtype=dtype, device=device)
    return batch, params


class Implementation(NamedTuple):
    """meta_grad() -> (loss, gradient) at the current weights, without stepping;
    step() runs one meta-iteration (meta-gradient, then the outer optimizer step);
    params: the implementation's own copy of the weights, which step() updates."""
    name: str
    meta_grad: Callable[[], tuple]
    step: Callable[[], None]
    params: torch.Tensor


def _unavailable(name: str, w: Workload, params: torch.Tensor) -> Optional[str]:
    """Why implementation `name` cannot run workload w here, or None."""
    if name == "fused":
        return F._fused_unsupported(params, list(w.sizes), w.S)
    return None


def make_implementation(name: str, w: Workload, batch, params0: torch.Tensor) -> Implementation:
    """Implementation `name` on its own copy of the starting weights, with its own optimizer
    (the trainer's: SGD or Adam with lr=outer_lr)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    sizes = list(w.sizes)
    params = params0.detach().clone().requires_grad_()
    opt = _OPTIMIZERS[w.optimizer]([params], lr=w.outer_lr)
    hyper = dict(sizes=sizes, inner_lr=w.inner_lr, steps=w.S, activation=w.activation,
                 loss=w.loss, first_order=w.first_order)

    if name == "fused":
        ops = _ops.ops

        def meta_grad():
            return ops.maml_loss(params.detach(), *batch, sizes, w.inner_lr, w.S, w.activation,
                                 w.loss, w.first_order, True)
    elif name == "reference":
        def meta_grad():
            p = params.detach().requires_grad_()
            value = _reference.maml_loss(p, *batch, **hyper)
            (grad,) = torch.autograd.grad(value, p)
            return value.detach(), grad
    else:
        grad_and_value = _torchfunc_meta_grad(w)

        def meta_grad():
            grad, value = grad_and_value(params.detach(), *batch)
            return value, grad

    def step():
        _, grad = meta_grad()
        params.grad = grad
        opt.step()

    return Implementation(name, meta_grad, step, params)


def _torchfunc_meta_grad(w: Workload):
    """torch.func's MAML: fn(params [P], xs, ys, xq, yq) -> (meta-gradient [P], meta-loss)."""
    sizes = list(w.sizes)
    act = _reference.ACTIVATIONS[w.activation]
    loss_fn = _reference.LOSSES[w.loss]

    def net(flat, x):  # the MLP on one task's flat parameters (vmap hides the task dimension)
        layers = unflatten(flat, sizes)
        for l, (W, b) in enumerate(layers):
            x = torch_F.linear(x, W, b)
            if l + 1 < len(layers):
                x = act(x)
        return x

    def task_loss(flat, x, y):
        return loss_fn(net(flat, x), y)

    inner_grad = torch.func.grad(task_loss)

    def adapted_query_loss(flat, xs, ys, xq, yq):
        for _ in range(w.S):
            g = inner_grad(flat, xs, ys)
            # first order: the inner gradients are constants to the meta-gradient
            flat = flat - w.inner_lr * (g.detach() if w.first_order else g)
        return task_loss(flat, xq, yq)

    def meta_loss(params, xs, ys, xq, yq):
        per_task = torch.vmap(adapted_query_loss, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq)
        return per_task.mean()

    return torch.func.grad_and_value(meta_loss)


# ---- verification and timing ------------------------------------------------------------------

def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|), in float64 on the CPU."""
    expected = expected.double().cpu()
    scale = max(1.0, expected.abs().max().item())
    return (actual.double().cpu() - expected).abs().max().item() / scale


def verify(grads: Dict[str, torch.Tensor], tolerance: float = VERIFY_TOLERANCE) -> Dict[str, dict]:
    """Checks the meta-gradients of the implementations that ran against an oracle: the
    reference if it ran, else torch.func. Returns, per implementation, dict(oracle, error, ok);
    error is max |g - g_oracle| / max(1, max |g_oracle|) (None for the oracle itself, and for
    everything when nothing else ran to compare with)."""
    oracle = next((n for n in ("reference", "torchfunc") if n in grads), None)
    out = {}
    for name, g in grads.items():
        if oracle is None or name == oracle:
            others = oracle is not None and len(grads) > 1
            out[name] = dict(oracle=None, error=None, ok=True, role="oracle" if others else "unchecked")
            continue
        err = _relative_error(g, grads[oracle])
        ok = math.isfinite(err) and err <= tolerance
        out[name] = dict(oracle=oracle, error=err, ok=ok, role="checked")
    return out


class Timed(NamedTuple):
    """One thing to time: step() is a meta-iteration, first_call_s the time of a first call
    (the estimate the calls per round are planned from), before() runs before each round (the
    thread count, say)."""
    step: Callable[[], None]
    first_call_s: float
    before: Callable[[], None] = lambda: None


def time_steps(entries: Dict[object, Timed], *, rounds: int, round_s: float, cell_budget_s: float,
               sync: Callable[[], None] = lambda: None) -> Dict[object, dict]:
    """Times several steps side by side. Each gets calls per round so that a round lasts about
    round_s, a warm-up round, then up to `rounds` rounds (fewer, at least 3, where they would
    exceed cell_budget_s). The rounds of the entries are interleaved (a round of each in turn),
    so that load from other processes on a shared machine falls on all of them alike and the
    ratios stay fair. Returns per entry the median time per call and every round's."""
    plans = {}
    for key, e in entries.items():
        est = max(e.first_call_s, 1e-7)
        calls = max(1, round(round_s / est))
        n_rounds = rounds
        if n_rounds * calls * est > cell_budget_s:
            n_rounds = max(3, min(rounds, int(cell_budget_s / (calls * est))))
        plans[key] = (calls, n_rounds)
    for key, e in entries.items():  # warm-up: caches, the allocator, the optimizer's state
        e.before()
        for _ in range(plans[key][0]):
            e.step()
        sync()
    per_call = {key: [] for key in entries}
    for r in range(max((n for _, n in plans.values()), default=0)):
        for key, e in entries.items():
            calls, n_rounds = plans[key]
            if r >= n_rounds:
                continue
            e.before()
            t0 = time.perf_counter()
            for _ in range(calls):
                e.step()
            sync()
            per_call[key].append((time.perf_counter() - t0) / calls)
    return {key: dict(median_s=statistics.median(per_call[key]), rounds_s=per_call[key],
                      calls_per_round=plans[key][0]) for key in entries}


def measure_workload(w: Workload, implementations: Sequence[str], *, section: str, timing: dict,
                     device="cpu", threads: Sequence[int] = (1,), estimates: Optional[dict] = None,
                     matmul_gflops: Optional[float] = None, meta_grad_only: bool = False,
                     log: Callable[[str], None] = lambda s: None) -> List[dict]:
    """Verifies, then times side by side, each implementation on workload w with each thread
    count: one row per (implementation, threads), status "ok", "skipped" or "mismatch".
    `estimates` maps (implementation, device, order, section) to (flops, seconds) of the
    implementation's previous sweep point; a point whose time extrapolated by the flop count
    exceeds timing["max_iter_s"] is skipped. Updated in place. meta_grad_only times the
    meta-gradient without the optimizer step."""
    device = torch.device(device)
    sync = _sync_fn(device)
    estimates = {} if estimates is None else estimates
    flops = meta_iteration_flops(w)
    batch, params0 = make_data(w, device)
    variants = [(name, n) for n in threads for name in implementations]
    rows = {v: dict(section=section, workload=w.label(), base=w.base, order=w.order, impl=v[0],
                    device=str(device), threads=v[1], config=dataclasses.asdict(w), flops=flops,
                    status="ok", note="", median_s=None)
            for v in variants}

    before = torch.get_num_threads()
    try:
        entries, grads = {}, {}
        for name, n in variants:
            reason = _unavailable(name, w, params0)
            key = (name, str(device), w.order, section)
            if reason is None and key in estimates:
                prev_flops, prev_s = estimates[key]
                est = prev_s * flops / prev_flops
                if est > timing["max_iter_s"]:
                    reason = (f"estimated {est:.2g} s/iteration (from the previous point) is over "
                              f"the {timing['max_iter_s']:g} s cap")
            if reason is not None:
                rows[(name, n)].update(status="skipped", note=reason)
                continue
            impl = make_implementation(name, w, batch, params0)
            set_threads = lambda n=n: torch.set_num_threads(n)
            set_threads()
            # The first call gives the meta-gradient to verify and a first time estimate.
            t0 = time.perf_counter()
            _, grads[(name, n)] = impl.meta_grad()
            sync()
            entries[(name, n)] = Timed(impl.meta_grad if meta_grad_only else impl.step,
                                       time.perf_counter() - t0, set_threads)

        # At the first thread count, every implementation against the oracle (the reference,
        # else torch.func); at the others, against itself at the first count.
        first = {name: g for (name, n), g in grads.items() if n == threads[0]}
        first_checks = verify(first)
        for v, g in grads.items():
            if v[1] == threads[0]:
                check = first_checks[v[0]]
            elif v[0] in first:
                err = _relative_error(g, first[v[0]])
                check = dict(oracle=f"{v[0]} on {threads[0]} thread(s)", error=err,
                             ok=err <= VERIFY_TOLERANCE, role="checked")
            else:
                check = dict(oracle=None, error=None, ok=True, role="unchecked")
            rows[v].update(check=check["role"], verify_error=check["error"],
                           verified_against=check["oracle"])
            if not check["ok"]:
                rows[v].update(status="mismatch",
                               note=f"meta-gradient differs from {check['oracle']}'s by "
                                    f"{check['error']:.3g} (relative; tolerance {VERIFY_TOLERANCE:g}): not timed")
                del entries[v]

        if entries:
            log(f"  {section}: {w.label()} ({w.order} order) on {device}: "
                + ", ".join(f"{name}" + (f" ({n} threads)" if len(threads) > 1 else "")
                            for name, n in entries))
        timed = time_steps(entries, sync=sync,
                           **{k: timing[k] for k in ("rounds", "round_s", "cell_budget_s")})
        for v, t in timed.items():
            rows[v].update(t)
            rows[v]["gflops"] = flops / t["median_s"] / 1e9
            if matmul_gflops:
                rows[v]["pct_matmul"] = 100 * rows[v]["gflops"] / matmul_gflops
            if v[1] == threads[0]:
                estimates[(v[0], str(device), w.order, section)] = (flops, t["median_s"])
    finally:
        torch.set_num_threads(before)

    for (name, n), row in rows.items():
        fused = rows.get(("fused", n), {}).get("median_s")
        if fused and row["median_s"]:
            row["ratio_to_fused"] = row["median_s"] / fused
        if (name == "fused" and n == 1 and device.type == "cpu" and section != "threads"
                and w in TIME_TARGETS):
            _attach_target(row, f"fused {w.label()} {w.order} order <= {TIME_TARGETS[w] * 1e3:g} ms",
                           row["median_s"], TIME_TARGETS[w], "max", unit="s")
    return list(rows.values())


def _attach_target(row: dict, what: str, value, limit, kind: str, unit: str) -> None:
    passed = None if value is None else (value <= limit if kind == "max" else value >= limit)
    row["target"] = dict(what=what, value=value, limit=limit, kind=kind, unit=unit, passed=passed)


# ---- memory -------------------------------------------------------------------------------------

def _rss_bytes():
    """(current, peak) resident set of this process in bytes. Linux: VmRSS / VmHWM of
    /proc/self/status, which belong to this process alone: ru_maxrss is kept across exec, so in
    a fresh subprocess it would report the parent's peak. Elsewhere: ru_maxrss for both."""
    try:
        with open("/proc/self/status") as f:
            status = f.read()
        current = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
        return current, peak
    except (OSError, AttributeError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return peak, peak


def _reset_peak_rss() -> bool:
    # Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current resident set, so the
    # peak read later is the peak of what follows alone.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_child(name: str, S: int, iterations: int) -> Dict[str, object]:
    """In a fresh process: the peak resident memory of `iterations` meta-iterations of W2 with
    S inner steps above the resident memory after setup (data, weights, optimizer)."""
    torch.set_num_threads(1)
    w = W2.replace(S=S)
    # Run the implementation once on a one-task, one-step problem first, so that one-time
    # costs (lazy imports, torch.func's machinery, thread pools) are not counted as the
    # workload's memory.
    tiny = w.replace(T=1, S=1)
    make_implementation(name, tiny, *make_data(tiny)).step()
    impl = make_implementation(name, w, *make_data(w))
    gc.collect()
    current, peak_before = _rss_bytes()
    baseline = current if _reset_peak_rss() else peak_before
    for _ in range(iterations):
        impl.step()
    _, peak = _rss_bytes()
    return dict(baseline_mb=baseline / 2**20, peak_mb=peak / 2**20,
                increase_mb=max(0, peak - baseline) / 2**20)


def measure_memory(name: str, S: int, iterations: int = 3, timeout_s: float = 300) -> Dict[str, object]:
    """Runs _memory_child in a fresh Python process (so nothing this process allocated before
    counts) and returns its numbers."""
    code = ("import json, sys; from pymaml.bench import _memory_child; "
            "print(json.dumps(_memory_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this pymaml, not another
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", code, name, str(S), str(iterations)],
                          capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the memory measurement of {name} at S={S} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_rows(plan: dict, log) -> List[dict]:
    rows = []
    for name in plan["implementations"]:
        for S in plan["S"]:
            w = W2.replace(S=S)
            row = dict(section="memory", workload=w.label(), base="W2", order=w.order, impl=name,
                       device="cpu", threads=1, config=dataclasses.asdict(w), status="ok", note="")
            reason = _unavailable(name, w, make_data(w.replace(T=1))[1])
            if reason:
                row.update(status="skipped", note=reason)
            else:
                log(f"  memory: {w.label()} {name} (fresh process)")
                row.update(measure_memory(name, S, plan["iterations"]))
                row["iterations"] = plan["iterations"]
            rows.append(row)
    by_S = {r["config"]["S"]: r for r in rows if r["impl"] == "fused" and r["status"] == "ok"}
    if 5 in by_S and 50 in by_S:
        growth = by_S[50]["increase_mb"] - by_S[5]["increase_mb"]
        _attach_target(by_S[50], f"fused W2 peak memory at S=50 within {MEMORY_TARGET_MB:g} MB of S=5",
                       growth, MEMORY_TARGET_MB, "max", unit="MB")
    return rows


# ---- threads and end-to-end training --------------------------------------------------------------

def _threads_rows(workloads, thread_counts, timing, matmul_gflops, log) -> List[dict]:
    """The fused op with each thread count (the first is 1), side by side (interleaved rounds)
    per workload, with the speed-up over one thread."""
    rows = []
    for w in workloads:
        measured = measure_workload(w, ["fused"], section="threads", timing=timing,
                                    threads=thread_counts, matmul_gflops=matmul_gflops, log=log)
        base = measured[0]
        for row in measured:
            row.pop("ratio_to_fused", None)
            if row is not base and base["median_s"] and row["median_s"]:
                row["speedup_vs_1_thread"] = base["median_s"] / row["median_s"]
                if base["threads"] == 1 and row["threads"] == 2 and w.T >= THREADS_TARGET_MIN_T:
                    _attach_target(row, f"fused {w.label()}: 2 threads >= {THREADS_TARGET:g}x one thread",
                                   row["speedup_vs_1_thread"], THREADS_TARGET, "min", unit="x")
        rows += measured
    return rows


def measure_train(iterations: int, repeats: int = 3, budget_s: float = 3.0) -> Dict[str, object]:
    """W1 end to end: pymaml.train with the seed's defaults (whatever backend "auto" picks),
    progress off; seconds per iteration from the trainer's own wall time, median of repeats
    after a short warm-up run. A repeat runs `iterations`, or fewer if they would take more
    than budget_s (the reference backend, when the fused op is not built, is 10x slower)."""
    from .trainer import train
    quiet = dict(progress=False, log_every=0)
    warm = train(iterations=min(200, iterations), **quiet)
    per_it = warm.wall_time / warm.iterations
    iterations = max(1, min(iterations, int(budget_s / per_it)))
    runs = [train(iterations=iterations, **quiet) for _ in range(repeats)]
    per_it = [r.wall_time / iterations for r in runs]
    return dict(median_s=statistics.median(per_it), runs_s=per_it, iterations=iterations,
                backend=runs[0].config["backend"])


# ---- CUDA (issue 5) ------------------------------------------------------------------------------

CUDA_T = (1, 25, 256, 4096, 65536)   # W2's meta-batch sizes in the cuda section
CUDA_REFERENCE_MAX_T = 256           # the reference's Python loop over tasks is not run above
CUDA_SPEEDUP_TARGET = (4096, 20.0)   # H100: W2 at T=4096 >= 20x faster than torch.func
CUDA_PCT_TARGET = (4096, 25.0)       # ... and >= 25 % of the float32 matmul rate (TF32 off)
CUDA_TIME_TARGET = (25, 50e-6)       # ... W2 at T=25 <= 50 us per meta-step


def _cuda_rows(workloads, timing, matmul_gflops, log, device="cuda") -> List[dict]:
    """The cuda section: each workload on the GPU, the meta-gradient alone (the op's launches,
    no optimizer step), fused vs torch.func vs the reference (up to CUDA_REFERENCE_MAX_T), with
    tasks/s and TFLOP/s. (`device` is for the tests of this function on a machine without one.)"""
    rows, estimates = [], {}
    for w in workloads:
        implementations = [n for n in IMPLEMENTATIONS
                           if n != "reference" or w.T <= CUDA_REFERENCE_MAX_T]
        measured = measure_workload(w, implementations, section="cuda", timing=timing,
                                    device=device, estimates=estimates,
                                    matmul_gflops=matmul_gflops, meta_grad_only=True, log=log)
        if "reference" not in implementations:
            skipped = dict(measured[0], impl="reference", status="skipped", median_s=None,
                           note=f"the reference loops over the tasks in Python: not run above "
                                f"T={CUDA_REFERENCE_MAX_T}")
            for key in ("rounds_s", "calls_per_round", "gflops", "pct_matmul", "ratio_to_fused",
                        "check", "verify_error", "verified_against", "target"):
                skipped.pop(key, None)
            measured.append(skipped)
        for r in measured:
            if r["median_s"]:
                r["tasks_per_s"] = w.T / r["median_s"]
                r["tflops"] = r["flops"] / r["median_s"] / 1e12
        rows += measured
    return rows


def _cuda_targets(rows: List[dict]) -> List[dict]:
    """The issue's H100 targets, read from the cuda section's rows (W2, second order)."""
    def is_w2(r):
        return (r["section"] == "cuda" and r["status"] == "ok" and
                Workload(**dict(r["config"], sizes=tuple(r["config"]["sizes"])))
                == W2.replace(T=r["config"]["T"]))

    by_key = {(r["config"]["T"], r["impl"]): r for r in rows if is_w2(r)}
    targets = []

    def target(what, value, limit, kind, unit):
        holder = {}
        _attach_target(holder, what, value, limit, kind, unit)
        targets.append(holder["target"])

    T, limit = CUDA_SPEEDUP_TARGET
    fused, tf = by_key.get((T, "fused")), by_key.get((T, "torchfunc"))
    if fused:
        target(f"fused W2 T={T} on CUDA >= {limit:g}x faster than torch.func",
               tf["median_s"] / fused["median_s"] if tf else None, limit, "min", "x")
    T, limit = CUDA_PCT_TARGET
    fused = by_key.get((T, "fused"))
    if fused:
        target(f"fused W2 T={T} on CUDA >= {limit:g} % of the float32 matmul rate",
               fused.get("pct_matmul"), limit, "min", "%")
    T, limit = CUDA_TIME_TARGET
    fused = by_key.get((T, "fused"))
    if fused:
        target(f"fused W2 T={T} on CUDA <= {limit * 1e6:g} us per meta-step",
               fused["median_s"], limit, "max", "s")
    return targets


def _format_cuda(report: dict) -> List[str]:
    """The cuda section's own table: time per meta-step, tasks/s and TFLOP/s."""
    rows = [r for r in report["results"] if r["section"] == "cuda"]
    if not rows:
        return []
    rate = report["matmul"].get("cuda", {}).get("gflops")
    lines = ["", "== CUDA, " + (report["machine"].get("cuda_device") or "GPU") + ": the meta-"
             "gradient alone (no optimizer step); float32 matmul rate (TF32 off) "
             + (f"{rate / 1e3:.1f} TFLOP/s" if rate else "not measured"),
             f"{'workload':12s} {'impl':10s} {'median':>10s} {'tasks/s':>12s} {'TFLOP/s':>8s} "
             f"{'%mm':>6s} {'vs fused':>9s}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['workload']:12s} {r['impl']:10s} {r['status']:>10s}  {r['note']}")
            continue
        ratio = r.get("ratio_to_fused")
        lines.append(f"{r['workload']:12s} {r['impl']:10s} {_fmt_time(r['median_s']):>10s} "
                     f"{r['tasks_per_s']:12.4g} {r['tflops']:8.3f} "
                     f"{r.get('pct_matmul') or 0:6.1f} {'' if ratio is None else f'{ratio:.1f}x':>9s}")
    return lines


# ---- the whole run --------------------------------------------------------------------------------

def run(*, quick: bool = False, sections: Sequence[str] = SECTIONS,
        thread_counts: Sequence[int] = (1, 2), log: Callable[[str], None] = lambda s: None) -> dict:
    """Runs the chosen sections and returns the report (what the JSON file holds)."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    # One thread always runs in the threads section, first: the baseline of the speed-ups.
    thread_counts = sorted(set(thread_counts) | {1})
    plan = _plan(quick)
    timing = plan["timing"]
    started = time.perf_counter()
    report = dict(format="pymaml-bench", format_version=1, machine=machine_info(),
                  settings=dict(quick=quick, sections=list(sections),
                                thread_counts=list(thread_counts), timing=timing,
                                verify_tolerance=VERIFY_TOLERANCE, threads_for_timings=1),
                  flop_formula=meta_iteration_flops.__doc__, matmul={}, results=[], train=None,
                  processes=[])
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():  # on a GPU machine the timed workloads run there too
        devices.append(torch.device("cuda"))

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def matmul_rates():
            for device in devices:
                if device.type == "cpu":
                    sizes = (512,) if quick else (512, 1024)
                else:
                    sizes = (2048,) if quick else (4096,)
                yield device.type, measure_matmul_gflops(sizes, device=device)

        log("measuring the float32 matmul rate")
        report["matmul"] = dict(matmul_rates())
        estimates, measured = {}, {}
        for section in ("core", "T", "S", "width"):
            if section not in sections:
                continue
            log(f"section {section}")
            for device in devices:
                rate = report["matmul"][device.type]["gflops"]
                for w in plan[section]:
                    if (w, device.type) in measured:
                        # A workload in several sections (W2 S=1 in core and in the S sweep) is
                        # timed once; its target is listed once, where it was measured.
                        rows = [dict({k: v for k, v in r.items() if k != "target"},
                                     section=section, same_as=r["section"])
                                for r in measured[(w, device.type)]]
                        for r in rows:
                            if r["status"] == "ok":
                                estimates[(r["impl"], r["device"], r["order"], section)] = \
                                    (r["flops"], r["median_s"])
                    else:
                        # Skipping by extrapolation applies to the sweeps, which grow point by point.
                        rows = measure_workload(
                            w, IMPLEMENTATIONS, section=section, timing=timing, device=device,
                            estimates=None if section == "core" else estimates,
                            matmul_gflops=rate, log=log)
                        measured[(w, device.type)] = rows
                    report["results"] += rows
        if "threads" in sections:
            log("section threads")
            report["results"] += _threads_rows(plan["threads"], thread_counts, timing,
                                               report["matmul"]["cpu"]["gflops"], log)
        if "memory" in sections:
            log("section memory")
            report["results"] += _memory_rows(plan["memory"], log)
        if "train" in sections:
            log("section train: pymaml.train on W1")
            tr = measure_train(**plan["train"])
            _attach_target(tr, f"W1 in pymaml.train <= {TRAIN_TARGET_S * 1e6:g} us/iteration",
                           tr["median_s"], TRAIN_TARGET_S, "max", unit="s")
            report["train"] = tr
        if "processes" in sections:
            from . import bench_processes
            log("section processes: pymaml.train on one and two processes")
            report["processes"] = bench_processes.rows(quick, log)
        if "cuda" in sections:
            if devices[-1].type == "cuda":
                log("section cuda")
                report["results"] += _cuda_rows(plan["cuda"], timing,
                                                report["matmul"]["cuda"]["gflops"], log)
            else:
                log("section cuda: skipped (no CUDA device)")
        # The yardstick again at the end: the higher of the two medians, since load from other
        # processes on a shared machine can only make a measurement slower.
        for device_type, again in matmul_rates():
            first = report["matmul"][device_type]
            report["matmul"][device_type] = max(first, again, key=lambda m: m["gflops"])
            report["matmul"][device_type]["start_and_end_gflops"] = [first["gflops"], again["gflops"]]
        for row in report["results"]:
            if row.get("gflops"):
                row["pct_matmul"] = 100 * row["gflops"] / report["matmul"][row["device"].split(":")[0]]["gflops"]
    finally:
        torch.set_num_threads(before)
    report["targets"] = [r["target"] for r in report["results"] + [report["train"] or {}] if "target" in r]
    report["targets"] += _cuda_targets(report["results"])
    report["elapsed_s"] = time.perf_counter() - started
    return report


# ---- output -------------------------------------------------------------------------------------

def _fmt_time(s) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def _fmt_target(t) -> tuple:
    if not t:
        return "", ""
    if t["unit"] == "s":
        limit, value = _fmt_time(t["limit"]), _fmt_time(t["value"])
    elif t["unit"] == "MB":
        limit, value = f"{t['limit']:g} MB", ("-" if t["value"] is None else f"{t['value']:+.2f} MB")
    elif t["unit"] == "%":
        limit, value = f"{t['limit']:g} %", ("-" if t["value"] is None else f"{t['value']:.1f} %")
    else:
        limit, value = f"{t['limit']:g}x", ("-" if t["value"] is None else f"{t['value']:.2f}x")
    sign = "<=" if t["kind"] == "max" else ">="
    verdict = "n/a" if t["passed"] is None else ("pass" if t["passed"] else "MISS")
    return f"{sign} {limit}", f"{verdict} ({value})"


def format_table(report: dict) -> str:
    """The report as a text table: one row per (workload, implementation), by section."""
    m = report["machine"]
    rates = ", ".join(f"{d} {v['gflops']:.1f} GFLOP/s" for d, v in report["matmul"].items())
    lines = [f"pymaml {m['pymaml_version']} bench on {m['cpu_model']} ({m['cpu_count']} cores), "
             f"torch {m['torch_version']} ({m['torch_cpu_capability']}), {m['date']}",
             f"float32 matmul rate (one thread, the higher of the run's start and end): "
             f"{rates or 'not measured'}",
             "timings on one thread unless the thr column says otherwise; ratio = time / fused "
             "time; %mm = GFLOP/s / matmul rate"]
    header = ("workload", "order", "impl", "dev", "thr", "median", "ratio", "GFLOP/s", "%mm",
              "check", "target", "result")
    table = []
    for r in report["results"]:
        if r["section"] == "memory":
            value = "-" if r["status"] != "ok" else f"+{r['increase_mb']:.2f} MB"
            ratio = gflops = pct = check = ""
        else:
            value = _fmt_time(r["median_s"])
            ratio = "" if r.get("ratio_to_fused") is None else f"{r['ratio_to_fused']:.2f}x"
            if r["section"] == "threads" and r.get("speedup_vs_1_thread"):
                ratio = f"{r['speedup_vs_1_thread']:.2f}x/1thr"
            gflops = "" if r.get("gflops") is None else f"{r['gflops']:.2f}"
            pct = "" if r.get("pct_matmul") is None else f"{r['pct_matmul']:.1f}"
            check = {"oracle": "oracle", "unchecked": "unchecked", None: ""}.get(r.get("check"))
            if check is None:
                check = f"{'ok' if r['status'] != 'mismatch' else 'MISMATCH'} {r['verify_error']:.0e}"
        if r["status"] == "skipped":
            value = "skipped"
        elif r["status"] == "mismatch":
            value = "mismatch"
        target, result = _fmt_target(r.get("target"))
        table.append((r["section"], (r["workload"], r["order"], r["impl"], r["device"],
                                     str(r["threads"]), value, ratio, gflops, pct, check, target,
                                     result), r["note"]))
    widths = [max([len(h)] + [len(row[i]) for _, row, _ in table]) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(wd) for c, wd in zip(cells, widths)).rstrip()
    titles = dict(core="workloads W1 and W2", T="scaling in T (tasks per meta-batch), W2",
                  S="scaling in S (inner steps), W2", width="scaling in width, W2",
                  threads="threads: the fused op on several threads, rounds interleaved (ratio: "
                          "speed-up over one thread; check: the meta-gradient against one thread's)",
                  memory="peak memory above setup, fresh process per row, W2 (median column: MB)",
                  cuda="cuda: W2 on the GPU, the meta-gradient alone (no optimizer step)")
    section = None
    for name, row, note in table:
        if name != section:
            section = name
            lines += ["", f"== {titles.get(name, name)}", line(header)]
        lines.append(line(row))
        if note:
            lines.append("      " + note)
    tr = report.get("train")
    if tr:
        target, result = _fmt_target(tr.get("target"))
        lines += ["", "== W1 end to end in pymaml.train (progress off, "
                  f"{tr['iterations']} iterations, backend {tr['backend']}): "
                  f"{_fmt_time(tr['median_s'])}/iteration; target {target}: {result}"]
    from .bench_processes import format_rows
    lines += format_rows(report.get("processes") or [], _fmt_time)
    lines += _format_cuda(report)
    if report.get("targets"):
        lines += ["", "== targets"]
        for t in report["targets"]:
            target, result = _fmt_target(t)
            lines.append(f"  {t['what']}: {result}")
    lines.append(f"\n(run took {report['elapsed_s']:.0f} s)")
    return "\n".join(lines)


def _figure(**kwargs):
    from .plots import _figure as figure  # a bare Figure: never pyplot
    return figure(**kwargs)


def plot(report: dict, path) -> None:
    """PREFIX.png: the fused op's speed-up over each other implementation (time / fused time)
    against T and against S on W2, second order solid, first order dashed."""
    fig = _figure(figsize=(11, 4.5), constrained_layout=True)
    axes = fig.subplots(1, 2)
    for ax, section, field, xlabel in ((axes[0], "T", "T", "tasks per meta-batch T (S=5)"),
                                       (axes[1], "S", "S", "inner steps S (T=25)")):
        rows = [r for r in report["results"] if r["section"] == section and r.get("ratio_to_fused")
                and r["impl"] != "fused"]
        lines = {}
        for r in rows:
            key = (r["impl"], r["order"], r["device"])
            lines.setdefault(key, []).append((r["config"][field], r["ratio_to_fused"]))
        colors = {"reference": "tab:blue", "torchfunc": "tab:orange"}
        for (impl, order, device), points in sorted(lines.items()):
            xs, ys = zip(*sorted(points))
            label = f"{impl} / fused, {order} order" + ("" if device == "cpu" else f", {device}")
            ax.plot(xs, ys, marker="o" if device == "cpu" else "s", color=colors.get(impl),
                    linestyle="-" if order == "2nd" else "--", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speed-up of fused (time / fused time)")
        ax.set_title(f"W2, scaling in {field}")
        if lines:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center",
                    transform=ax.transAxes)
    m = report["machine"]
    fig.suptitle(f"pymaml {m['pymaml_version']}, {m['cpu_model']}, torch {m['torch_version']}, one thread",
                 fontsize=9)
    fig.savefig(path, dpi=110)


def write_outputs(report: dict, prefix) -> tuple:
    """Writes PREFIX.json and PREFIX.png; returns their paths."""
    json_path, png_path = f"{prefix}.json", f"{prefix}.png"
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    plot(report, png_path)
    return json_path, png_path
