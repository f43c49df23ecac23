"""What the benchmarks share: the registry of implementations timed side by side
(IMPLEMENTATIONS: add a row there, every section gets it), the task data, the check against
the oracle, the matmul yardstick and one pytest-benchmark row (the workloads, their flop count
and the targets are in workloads.py, which the report reads without torch).

An implementation runs one meta-iteration of a workload the way a user's training loop would:
the meta-gradient of the meta-batch, then the outer optimizer's step (torch.optim, the
trainer's SGD or Adam). Only pymaml's public API is used: pymaml.functional, pymaml.reference,
torch.ops.pymaml.*, pymaml.testing.torch_func_maml (torch_func_learned_maml for learned rates
and frozen layers; torch_func_daml for DAML), pymaml.daml_model.init_weights, and for the DAML
train_chunk row pymaml.outer_optim (the trainer's optimizer arguments for the op).

Learned inner rates (a workload's `rates`: Meta-SGD and the like) are a second tensor beside the
weights: it starts at inner_lr, gets its gradient from the same backward and is stepped by the
same optimizer; a meta-gradient is then the two gradients concatenated, [params, rates].

DAML (issue 15; a workloads.DAMLWorkload) has a registry of its own, DAML_IMPLEMENTATIONS,
served by the same functions (skip_reason, make_data, make_runner, oracle, verify,
time_implementation pick the registry by the workload's type): its second tensor is the loss
network's weights, loss_params, and its meta-gradient [params, loss_params].
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import pytest
import torch

import pymaml
from pymaml import functional as F
from pymaml import daml as _daml
from pymaml import outer_optim, reference, tasks
from pymaml.daml_model import init_weights
from pymaml.testing import (relative_error, torch_func_daml, torch_func_learned_maml,
                            torch_func_maml)
from workloads import (GRID, DAMLWorkload, Workload, daml_meta_iteration_flops,
                       meta_iteration_flops)

# max |g - g_oracle| / max(1, max |g_oracle|): the float32 bound of the test suite's oracle tests.
VERIFY_TOLERANCE = 1e-4
# The cap of every row on the grid's workloads (issue 26), GFLOP per meta-iteration.
GRID_MAX_GFLOP = 15.0
# torch's fastest CPU steps (fused=True), as pymaml.train builds them.
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


# ---- data and implementations ----

def make_data(w: Workload, device="cpu", seed: int = 0):
    """(batch (xs, ys, xq, yq), params [P]) for workload w, drawn from one seeded generator, so
    that every implementation starts from the same weights on the same tasks (a DAMLWorkload:
    make_daml_data's)."""
    if isinstance(w, DAMLWorkload):
        return make_daml_data(w, device, seed)
    g = torch.Generator().manual_seed(seed)
    params = F.init_params(list(w.sizes), generator=g, dtype=torch.float64,
                           zero_bias=w.init == "seed").to(device=device, dtype=torch.float32)
    if w.task in ("gauss", "gauss-classes"):
        return gauss_batch(w, g, device), params
    family = tasks.get_family(w.task, shots=w.K, queries=w.Q)
    batch = family.sample(w.T, generator=g, device=device)
    return tuple(batch), params


def gauss_batch(w: Workload, g: torch.Generator, device) -> tuple:
    """The grid's synthetic tasks (issue 26): inputs N(0, 1) [T, K, n_in]; targets N(0, 1)
    [T, K, n_out] ("gauss") or uniform int64 class labels [T, K] ("gauss-classes",
    cross-entropy, as pymaml.functional takes them)."""
    out = []
    for n in (w.K, w.Q):
        x = torch.randn(w.T, n, w.sizes[0], generator=g, dtype=torch.float64)
        if w.task == "gauss-classes":
            y = torch.randint(0, w.sizes[-1], (w.T, n), generator=g)
        else:
            y = torch.randn(w.T, n, w.sizes[-1], generator=g, dtype=torch.float64).float()
        out += [x.float().to(device), y.to(device)]
    return tuple(out)


def one_hot_targets(w: Workload, batch) -> tuple:
    """batch with int64 class labels as one-hot float rows (what the raw op takes)."""
    return tuple(torch.nn.functional.one_hot(t, w.sizes[-1]).float()
                 if not t.is_floating_point() else t for t in batch)


def train_kwargs(w: Workload) -> dict:
    """pymaml.train's keywords for workload w (meta_batch_size = T), quiet."""
    return dict(task=w.task, algorithm="fomaml" if w.first_order else "maml", sizes=w.sizes,
                activation=w.activation, loss=w.loss, inner_steps=w.S, inner_lr=w.inner_lr,
                meta_batch_size=w.T, optimizer=w.optimizer, outer_lr=w.outer_lr, shots=w.K,
                queries=w.Q, init=w.init, progress=False, log_every=0)


def learned_rates(w: Workload, params: torch.Tensor) -> Optional[torch.Tensor]:
    """The learned inner rates of w at the start, every one inner_lr (None: a plain number)."""
    if w.rates == "scalar":
        return None
    P = params.shape[-1]
    shape = {"per-parameter": (P,), "per-step": (w.S, 1), "per-parameter-step": (w.S, P)}[w.rates]
    return torch.full(shape, w.inner_lr, dtype=params.dtype, device=params.device)


def _hyper(w: Workload, *rates) -> dict:
    # maml_loss's keywords, the learned rates (if any) for inner_lr.
    return dict(w.hyper, inner_lr=rates[0]) if rates and rates[0] is not None else w.hyper


def _leaves(params, rates) -> list:
    # What a meta-iteration differentiates and steps: the weights, and the rates if learned.
    return [params] if rates is None else [params, rates]


def _flat(grads) -> torch.Tensor:
    return grads[0] if len(grads) == 1 else torch.cat([g.reshape(-1) for g in grads])


def _fused(w, batch, params, rates=None):
    """The public API, as a user's loop calls it: pymaml.functional.maml_loss (argument checks,
    the op, its autograd node), loss.backward()."""
    def meta_grad():
        leaves = [t.detach().requires_grad_() for t in _leaves(params, rates)]
        loss = F.maml_loss(leaves[0], *batch, backend="fused", **_hyper(w, *leaves[1:]))
        return loss.detach(), _flat(torch.autograd.grad(loss, leaves))

    def backward():
        F.maml_loss(params, *batch, backend="fused", **_hyper(w, rates)).backward()
    return meta_grad, backward


def _fused_op(w, batch, params, rates=None):
    """The raw op: no argument checks, no autograd; the meta-gradient comes back with the loss."""
    args = (list(w.sizes), w.inner_lr, w.S, w.activation, w.loss, w.first_order, True)
    batch = one_hot_targets(w, batch)  # once, outside the timing

    def meta_grad():
        return torch.ops.pymaml.maml_loss(params.detach(), *batch, *args)
    return meta_grad, None


def _reference(w, batch, params, rates=None):
    """The seed's Python loop over tasks and inner steps, autograd with create_graph=True
    (learned rates, frozen layers: through pymaml.functional's checks, backend="reference")."""
    loss_fn = reference.maml_loss
    if not w.plain:
        loss_fn = functools.partial(F.maml_loss, backend="reference")

    def meta_grad():
        leaves = [t.detach().requires_grad_() for t in _leaves(params, rates)]
        loss = loss_fn(leaves[0], *batch, **_hyper(w, *leaves[1:]))
        return loss.detach(), _flat(torch.autograd.grad(loss, leaves))

    def backward():
        loss_fn(params, *batch, **_hyper(w, rates)).backward()
    return meta_grad, backward


def _torchfunc(w, batch, params, rates=None):
    """torch.func: grad through the unrolled inner loop, vmap over the tasks (learned rates,
    frozen layers: torch_func_learned_maml, its gradient in the rates too)."""
    if w.plain:
        grad_and_value = torch.func.grad_and_value(torch_func_maml(**w.hyper)[0])
    else:
        meta_loss = torch_func_learned_maml(**w.hyper)[0]
        argnums = (0,) if rates is None else (0, 5)
        grad_and_value = torch.func.grad_and_value(meta_loss, argnums=argnums)

    def meta_grad():
        args = [t.detach() for t in _leaves(params, rates)]
        grad, loss = grad_and_value(args[0], *batch, *args[1:])
        return loss, grad if w.plain else _flat(grad)
    return meta_grad, None


def _torchfunc_list(w, batch, params, rates=None):
    """torch.func as its users write it (issue 26): the weights as a list of tensors [W0, b0,
    W1, b1, ...], torch.func.grad of the mean over tasks of a vmapped per-task loss whose inner
    loop steps the list with torch.func.grad; the gradients flattened back for the step."""
    sizes = list(w.sizes)
    act = {"relu": torch.relu, "tanh": torch.tanh}[w.activation]
    loss_fn = reference.LOSSES[w.loss]

    def net(ws, x):
        for l in range(0, len(ws), 2):
            x = torch.nn.functional.linear(x, ws[l], ws[l + 1])
            x = act(x) if l + 2 < len(ws) else x
        return x

    def inner_loss(ws, x, y):
        return loss_fn(net(ws, x), y)

    def task_loss(ws, xs, ys, xq, yq):
        for _ in range(w.S):
            grads = torch.func.grad(inner_loss)(ws, xs, ys)
            ws = [p - w.inner_lr * (g.detach() if w.first_order else g) for p, g in zip(ws, grads)]
        return inner_loss(ws, xq, yq)

    def meta_loss(ws, xs, ys, xq, yq):
        return torch.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(ws, xs, ys, xq, yq).mean()

    grad_and_value = torch.func.grad_and_value(meta_loss)

    def meta_grad():
        ws = _split(params.detach(), sizes)
        grads, loss = grad_and_value(ws, *batch)
        return loss, torch.cat([g.reshape(-1) for g in grads])
    return meta_grad, None


def _split(flat, sizes) -> list:
    # [W0, b0, W1, b1, ...] views of the flat vector (nn.Linear's layouts).
    out, off = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        out.append(flat[off:off + n_in * n_out].view(n_out, n_in))
        off += n_in * n_out
        out.append(flat[off:off + n_out])
        off += n_out
    return out


def _jax_runner(w, batch, params0) -> "Runner":
    """JAX (benchmarks/jax_maml.py): jit of the whole step, meta-gradient and optax update, vmap
    over the tasks; the data and weights moved to JAX once, outside the timing."""
    import jax_maml
    jax, jnp, _ = jax_maml.import_jax()
    hyper = dict(activation=w.activation, loss=w.loss, inner_lr=w.inner_lr, steps=w.S,
                 first_order=w.first_order)
    step_fn, init = jax_maml.make_step(list(w.sizes), optimizer=w.optimizer,
                                       outer_lr=w.outer_lr, **hyper)
    data = [t.numpy() for t in batch]
    flat = jnp.asarray(params0.detach().numpy())
    state = [flat, init(flat)]

    def meta_grad():
        value, grad = jax_maml.meta_gradient(list(w.sizes), state[0], data, **hyper)
        return torch.tensor(value), torch.from_numpy(grad.copy())

    jax_data = [jnp.asarray(t) for t in data]

    def step():
        params, opt_state, value = step_fn(*state, *jax_data)
        value.block_until_ready()  # JAX dispatches asynchronously: a step ends when it is done
        state[:] = params, opt_state
    return Runner(meta_grad, step, lambda: torch.from_numpy(jax.device_get(state[0]).copy()))


def _jax_unavailable(device: torch.device) -> Optional[str]:
    import jax_maml
    if device.type != "cpu":
        return "the JAX row runs on the CPU only"
    return None if jax_maml.available() else "jax, jaxlib and optax are not installed"


def _fused_unavailable(device: torch.device) -> Optional[str]:
    if not pymaml.fused_available():
        return "pymaml._C is not built"
    if device.type == "cuda" and not pymaml.cuda_compiled():
        return "pymaml._C was built without its CUDA kernels"
    return None


@functools.lru_cache(maxsize=None)
def _fused_refuses(w: Workload, device: torch.device) -> Optional[str]:
    """Why backend="fused" refuses w's learned rates / frozen layers (a tiny call with them
    tried once), or None."""
    tiny = w.replace(sizes=(1, 2, 1), S=1)
    batch = [torch.ones(2, 1, 1, device=device) for _ in range(4)]
    params = torch.ones(F.num_params(tiny.sizes), device=device, requires_grad=True)
    rates = learned_rates(tiny, params.detach())
    try:
        F.maml_loss(params, *batch, backend="fused", **_hyper(tiny, rates)).backward()
    except Exception as exc:  # any refusal: the row is skipped with it
        return f"backend='fused' does not serve {w.label()} here: {str(exc).splitlines()[0]}"
    return None


class Implementation(NamedTuple):
    """make(w, batch, params, rates) -> (meta_grad, backward): meta_grad() -> (loss, gradient)
    at the current weights (and rates: None unless w learns them; the gradient then holds
    both, concatenated); backward() leaves the gradient in params.grad (and rates.grad), or
    None to set it from meta_grad(); stepped by torch.optim. Or runner(w, batch, params0) ->
    Runner, for an implementation that steps its own optimizer. max_gflop: per device type, the
    largest meta-iteration (GFLOP) it is timed on (beyond it one call takes seconds, or a
    compile minutes); unavailable(device): why it cannot run, or None; learned: whether it
    serves learned rates and frozen layers (workloads that are not w.plain); grid_only: a row
    of the grid section alone (test_bench_grid.py)."""
    make: Optional[Callable] = None
    max_gflop: Dict[str, float] = {}
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    runner: Optional[Callable] = None
    learned: bool = False
    grid_only: bool = False


# The rows of every table, in this order. "fused" is what ratios are read against.
IMPLEMENTATIONS: Dict[str, Implementation] = {
    "fused": Implementation(_fused, unavailable=_fused_unavailable, learned=True),
    "fused_op": Implementation(_fused_op, unavailable=_fused_unavailable),
    "reference": Implementation(_reference, max_gflop={"cpu": 1.0, "cuda": 1.0}, learned=True),
    "torchfunc": Implementation(_torchfunc, max_gflop={"cpu": 10.0}, learned=True),
    # issue 26: the grid section's torch.func row (a list of weight tensors); grid only
    "torchfunc_list": Implementation(_torchfunc_list, max_gflop={"cpu": 10.0}, grid_only=True),
    "jax": Implementation(runner=_jax_runner, max_gflop={"cpu": 10.0},
                          unavailable=_jax_unavailable),
}


def implementations(w) -> Dict[str, Implementation]:
    """The registry that serves workload w: DAML_IMPLEMENTATIONS for a DAMLWorkload."""
    return DAML_IMPLEMENTATIONS if isinstance(w, DAMLWorkload) else IMPLEMENTATIONS


def flops_of(w) -> int:
    """One meta-iteration's flop count (workloads.py): MAML's or DAML's."""
    return daml_meta_iteration_flops(w) if isinstance(w, DAMLWorkload) else meta_iteration_flops(w)


def skip_reason(name: str, w: Workload, device="cpu") -> Optional[str]:
    """Why implementation `name` is not timed on w here, or None."""
    impl, device = implementations(w)[name], torch.device(device)
    cap = impl.max_gflop.get(device.type, math.inf)
    if w in GRID:  # issue 26's grid times every row, up to inr1024's 11 GFLOP
        cap = max(cap, GRID_MAX_GFLOP)
    if flops_of(w) > cap * 1e9:
        return (f"{flops_of(w) / 1e9:.2g} GFLOP per meta-iteration is over {name}'s "
                f"{cap:g} GFLOP cap")
    if isinstance(w, DAMLWorkload):
        return impl.unavailable(device)
    if not w.plain and not impl.learned:
        return f"the {name} row times plain MAML only (one rate, every layer adapting)"
    reason = impl.unavailable(device)
    if reason is None and not w.plain and name == "fused":
        reason = _fused_refuses(w, device)
    return reason


class Runner(NamedTuple):
    """meta_grad() -> (loss, gradient), without stepping; step() one meta-iteration (or
    `iterations` of them: a training chunk): the meta-gradient then the optimizer's step;
    weights() this runner's current weights [P] (DAML: [P + P_psi], both networks)."""
    meta_grad: Callable[[], Tuple[torch.Tensor, torch.Tensor]]
    step: Callable[[], None]
    weights: Callable[[], torch.Tensor]
    iterations: int = 1


def verified_runner(name: str, w: Workload) -> Runner:
    """`name` on w's data (make_runner), its gradient checked against the reference before
    anything is timed; SystemExit saying why when it cannot run w."""
    reason = skip_reason(name, w)
    if reason:
        raise SystemExit(f"{name} on {w.label()}: {reason}")
    batch, params = make_data(w)
    runner = make_runner(name, w, batch, params)
    verify(name, w, runner.meta_grad()[1])
    return runner


def time_in_turns(runners: Dict[str, Runner], rounds: int, clock, block: int,
                  each: bool = False) -> Dict[str, list]:
    """{label: [seconds per meta-iteration, per timing]}: per round, each runner in turn runs
    `block` timed calls in a row, after an untimed one when block > 1 or `each` (a training
    loop calls one variant back to back; a single call right after another variant's starts
    with that one's caches); one timing per block, or per call with `each`."""
    times = {label: [] for label in runners}
    for _ in range(rounds):
        for label, runner in runners.items():
            if block > 1 or each:
                runner.step()
            calls = [1] * block if each else [block]
            for n in calls:
                t0 = clock()
                for _ in range(n):
                    runner.step()
                times[label].append((clock() - t0) / (n * runner.iterations))
    return times


def make_runner(name: str, w: Workload, batch, params0: torch.Tensor) -> Runner:
    """Implementation `name` on its own copy of the starting weights, with its own optimizer
    (pymaml.train's: SGD or Adam with lr=outer_lr; DAML: over both networks' tensors)."""
    impl = implementations(w)[name]
    if impl.runner is not None:
        return impl.runner(w, batch, params0)
    if isinstance(w, DAMLWorkload):
        return _make_daml_runner(impl, w, batch, params0)
    params = params0.detach().clone().requires_grad_()
    rates = learned_rates(w, params0)
    rates = rates if rates is None else rates.requires_grad_()
    opt = OPTIMIZERS[w.optimizer](_leaves(params, rates), lr=w.outer_lr, fused=True)
    meta_grad, backward = impl.make(w, batch, params, rates)

    def step():
        opt.zero_grad()
        if backward is None:
            grad = meta_grad()[1]
            params.grad = grad[:params.numel()]
            if rates is not None:
                rates.grad = grad[params.numel():].view_as(rates)
        else:
            backward()
        opt.step()
    return Runner(meta_grad, step, params.detach)


@functools.lru_cache(maxsize=None)
def oracle(w: Workload, device="cpu") -> Tuple[str, torch.Tensor]:
    """(name, meta-gradient at the starting weights) of the oracle for w: the reference, or
    torch.func where the reference is over its cap."""
    name = next(n for n in ("reference", "torchfunc") if skip_reason(n, w, device) is None)
    batch, params = make_data(w, device)
    return name, make_runner(name, w, batch, params).meta_grad()[1]


def verify(name: str, w: Workload, grad: torch.Tensor, device="cpu") -> dict:
    """Checks a meta-gradient at the starting weights against the oracle's."""
    oracle_name, expected = oracle(w, device)
    if oracle_name == name:
        return dict(verified_against=None, verify_error=0.0)
    err = relative_error(grad, expected)
    if not err <= VERIFY_TOLERANCE:  # NaN fails too
        raise AssertionError(f"{name}'s meta-gradient on {w.label()} ({w.order} order) differs from "
                             f"{oracle_name}'s by {err:.3g} (tolerance {VERIFY_TOLERANCE:g}): not timed")
    return dict(verified_against=oracle_name, verify_error=err)


# ---- DAML (issue 15): its own rows, served by the functions above ----

# meta-iterations per timed call of the train_chunk row (~3 ms a call at D1)
DAML_CHUNK = 100


def make_daml_data(w: DAMLWorkload, device="cpu", seed: int = 0, n: Optional[int] = None):
    """(batch (x_source [T, S, K, n_in], x_query, y_query), weights [P + P_psi]: the base
    network's then the loss network's, as pymaml.daml_model.init_weights draws them) for
    DAML workload w, from one seeded generator; n: n meta-batches at once ([n, T, ...],
    what daml_train_chunk reads)."""
    g = torch.Generator().manual_seed(seed)
    weights = init_weights(list(w.sizes), list(w.loss_sizes), init=w.init, generator=g,
                           dtype=torch.float64).to(device=device, dtype=torch.float32)
    family = tasks.get_family(w.task, shots=w.K, queries=w.Q)
    if n is None:
        batch = family.sample_daml(w.T, steps=w.S, generator=g, device=device)
    else:
        batch = family.sample_daml_many(n, w.T, steps=w.S, generator=g, device=device)
    return tuple(batch), weights


def _daml_api(backend):
    """The public API, as a user's loop calls it: pymaml.functional.daml_loss(params,
    loss_params, ..., backend=backend), loss.backward() into both tensors."""
    def make(w, batch, params, loss_params):
        def meta_grad():
            leaves = [params.detach().requires_grad_(), loss_params.detach().requires_grad_()]
            loss = F.daml_loss(*leaves, *batch, backend=backend, **w.hyper)
            return loss.detach(), _flat(torch.autograd.grad(loss, leaves))

        def backward():
            F.daml_loss(params, loss_params, *batch, backend=backend, **w.hyper).backward()
        return meta_grad, backward
    return make


def _daml_op(w, batch, params, loss_params):
    """The raw op torch.ops.pymaml.daml_loss: no argument checks, no autograd; both gradients
    come back with the loss."""
    args = (list(w.sizes), list(w.loss_sizes), w.inner_lr, w.S, w.activation, w.loss,
            w.adapt_loss, True)

    def meta_grad():
        loss, g_params, g_loss_params = torch.ops.pymaml.daml_loss(
            params.detach(), loss_params.detach(), *batch, *args)
        return loss, torch.cat([g_params, g_loss_params])
    return meta_grad, None


def _daml_torchfunc(w, batch, params, loss_params):
    """torch.func: pymaml.testing.torch_func_daml (functional_call on nn.Sequential, grad
    through the unrolled inner loop, second order, vmap over the tasks), written apart from
    pymaml.daml; grad in both networks' weights."""
    grad_and_value = torch.func.grad_and_value(torch_func_daml(**w.hyper)[0], argnums=(0, 1))

    def meta_grad():
        grads, loss = grad_and_value(params.detach(), loss_params.detach(), *batch)
        return loss, _flat(grads)
    return meta_grad, None


def _daml_train_chunk_runner(w, batch, weights0) -> Runner:
    """torch.ops.pymaml.daml_train_chunk, as pymaml.train runs DAML: DAML_CHUNK meta-iterations
    per call (the meta-gradient and the optimizer's fused step in C++, both networks in one
    flat tensor updated in place), over DAML_CHUNK meta-batches drawn once, outside the timing.
    Its meta-gradient for the check: one iteration on `batch` with SGD at rate 1, on a copy
    (the step is then minus the gradient)."""
    chunk, _ = make_daml_data(w, weights0.device, n=DAML_CHUNK)
    weights = weights0.detach().clone()
    opt = OPTIMIZERS[w.optimizer]([weights], lr=w.outer_lr, fused=True)
    spec = outer_optim.chunk_spec(opt)
    state = outer_optim.chunk_state(opt, weights, spec)
    if state is None:
        raise RuntimeError(f"daml_train_chunk cannot take {w.optimizer}'s state before its first "
                           "step; the train_chunk row times SGD without momentum")
    args = (list(w.sizes), list(w.loss_sizes), w.inner_lr, w.S, w.activation, w.loss,
            w.adapt_loss)
    probe_spec = outer_optim.chunk_spec(torch.optim.SGD([weights.clone()], lr=1.0, fused=True))

    def meta_grad():
        probe = weights.clone()
        values, _ = torch.ops.pymaml.daml_train_chunk(probe, [], *(t[None] for t in batch),
                                                      *args, *probe_spec)
        return values[0], weights - probe

    def step():
        torch.ops.pymaml.daml_train_chunk(weights, state, *chunk, *args, *spec)
    return Runner(meta_grad, step, weights.detach, iterations=DAML_CHUNK)


def _daml_fused_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return "the DAML rows run on the CPU"
    return None if _daml.fused_available() else "pymaml._C has no DAML ops"


def _daml_cpu_only(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else "the DAML rows run on the CPU"


# DAML's rows, in this order ("fused" is what ratios are read against; DAML_SPEEDUP_TARGET
# reads "reference" against it).
DAML_IMPLEMENTATIONS: Dict[str, Implementation] = {
    "fused": Implementation(_daml_api("fused"), unavailable=_daml_fused_unavailable),
    "fused_op": Implementation(_daml_op, unavailable=_daml_fused_unavailable),
    "train_chunk": Implementation(runner=_daml_train_chunk_runner,
                                  unavailable=_daml_fused_unavailable),
    "reference": Implementation(_daml_api("reference"), max_gflop={"cpu": 1.0},
                                unavailable=_daml_cpu_only),
    "torchfunc": Implementation(_daml_torchfunc, max_gflop={"cpu": 10.0},
                                unavailable=_daml_cpu_only),
}


def _make_daml_runner(impl: Implementation, w: DAMLWorkload, batch, weights0) -> Runner:
    # Both networks as two leaves, one optimizer over both (as a DAML user's loop steps them).
    P = F.num_params(list(w.sizes))
    params = weights0[:P].detach().clone().requires_grad_()
    loss_params = weights0[P:].detach().clone().requires_grad_()
    opt = OPTIMIZERS[w.optimizer]([params, loss_params], lr=w.outer_lr, fused=True)
    meta_grad, backward = impl.make(w, batch, params, loss_params)

    def step():
        opt.zero_grad()
        if backward is None:
            grad = meta_grad()[1]
            params.grad, loss_params.grad = grad[:P], grad[P:]
        else:
            backward()
        opt.step()
    return Runner(meta_grad, step, lambda: torch.cat([params.detach(), loss_params.detach()]))


# ---- the yardstick ----

def matmul_gflops(device="cpu", repeats: int = 11, threads: int = 1) -> float:
    """The float32 matmul rate the machine reaches: torch.mm of n x n matrices (2·n³ flops; n =
    512 on the CPU, 4096 on a GPU), the fastest of `repeats` calls (load from other processes
    only slows a call down), one thread on the CPU, TF32 off on a GPU (the fused kernels use
    plain FMAs). The rate the workloads' GFLOP/s are read against."""
    device = torch.device(device)
    n = 4096 if device.type == "cuda" else 512
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    before = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("highest")
    try:
        a, b = torch.rand(2, n, n, generator=torch.Generator().manual_seed(n)).to(device)
        out = torch.mm(a, b)  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before[0])
        torch.set_float32_matmul_precision(before[1])
    return 2 * n ** 3 / min(times) / 1e9


# ---- one pytest-benchmark row ----

def time_implementation(benchmark, section: str, w: Workload, name: str, *, device="cpu",
                        grad_only: bool = False) -> Runner:
    """Verifies implementation `name` on w against the oracle, then times one meta-iteration
    (or, grad_only, the meta-gradient alone) with pytest-benchmark, in the group of w, with
    what the report needs in extra_info. Skips (pytest.skip) what cannot or should not run."""
    reason = skip_reason(name, w, device)
    if reason:
        pytest.skip(reason)
    batch, params = make_data(w, device)
    runner = make_runner(name, w, batch, params)
    check = verify(name, w, runner.meta_grad()[1], device)
    flops = flops_of(w)
    benchmark.group = f"{section}: {w.label()} {w.order} order"
    benchmark.extra_info.update(
        section=section, workload=w.label(), order=w.order, impl=name, device=str(device),
        threads=torch.get_num_threads(), timed="meta-gradient" if grad_only else "meta-iteration",
        flops=flops, config=dataclasses.asdict(w), **check)
    if runner.iterations != 1:  # the report divides the time by them
        benchmark.extra_info["iterations"] = runner.iterations
    fn = runner.meta_grad if grad_only else runner.step
    if torch.device(device).type == "cuda":  # kernels run asynchronously: a call ends when they do
        timed = fn

        def fn():
            timed()
            torch.cuda.synchronize()
    benchmark(fn)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["gflops"] = flops * runner.iterations / benchmark.stats.stats.median / 1e9
    assert torch.isfinite(runner.weights()).all()
    return runner
