"""Task families: each samples a whole meta-batch of regression tasks in one vectorised call.

A family's `sample(T, generator=..., dtype=..., device=...)` returns a TaskBatch of support
and query tensors x [T, K, n_in], y [T, K, n_out]. Randomness comes only from the
torch.Generator passed in (always a CPU generator, so that a run's sampler state is one
tensor a checkpoint can hold, and the same seed gives the same tasks on every device and
dtype: draws are made in float64 on the CPU, then cast and moved).

`sample_many(n, T, ...)` draws n meta-batches at once ([n, T, ...]), bitwise what n
consecutive `sample(T)` calls give, leaving the generator in the same state; the trainer
uses it to hand many iterations' tasks to one fused training call. FunctionTasks can promise
this because one `sample(T)` makes all its random draws in a single
`torch.rand(T, D + K + Q)` call (D uniforms for the task's identity, then the points'), and
torch's CPU generator fills a tensor element after element, so one call of n * T rows
draws exactly what n calls of T rows draw, in the same order.

- "seed-sine" (SeedSine): the seed's task, y = sin(x + b), b in {0, pi}, x ~ U(-2pi, 2pi), 4 + 4 points;
- "sine" (Sine): the MAML paper's, y = A sin(x - phi), A ~ U(0.1, 5), phi ~ U(0, pi), x ~ U(-5, 5);
- a user's: any TaskFamily subclass, or a callable `fn(T, generator) -> (xs, ys, xq, yq)`.

DAML (pymaml.daml) has a protocol of its own, unlabeled source inputs and labeled target
points: DAMLTaskFamily.sample_daml(T, *, steps, generator, ...) -> DAMLBatch(x_source,
x_query, y_query), or a callable `fn(T, steps, generator) -> (x_source, x_query, y_query)`;
"daml-sine" (DAMLSine) is the seed's DAML experiment. See the DAML section at the end.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from . import _checks

__all__ = ["TaskBatch", "TaskFamily", "FunctionTasks", "SeedSine", "Sine", "CallableTasks",
           "CheckedTasks", "FAMILIES", "get_family", "checked", "check_batch"]


class TaskBatch(NamedTuple):
    """A meta-batch: support x [T, K, n_in], y [T, K, n_out]; query x [T, Q, n_in], y [T, Q, n_out]."""
    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor


class TaskFamily:
    """A distribution over tasks. Subclasses implement `sample`; `n_in` / `n_out` are the
    feature counts of x and y (None when the family cannot say before sampling)."""

    name = "custom"
    n_in: Optional[int] = None
    n_out: Optional[int] = None

    def sample(self, T: int, *, generator: torch.Generator, dtype=torch.float32,
               device=None) -> TaskBatch:
        raise NotImplementedError

    def sample_many(self, n: int, T: int, *, generator: torch.Generator, dtype=torch.float32,
                    device=None) -> Optional[TaskBatch]:
        """n meta-batches of T tasks at once: x [n, T, K, n_in], y [n, T, K, n_out], bitwise
        what n consecutive `sample(T)` calls would give (stacked), leaving `generator` in the
        same state. None when the family cannot promise that (the default): callers then
        sample one meta-batch at a time."""
        return None


class FunctionTasks(TaskFamily):
    """Tasks y = f(x; task) on 1-D inputs drawn uniformly from [x_low, x_high], support and
    query points drawn independently. Subclasses give `x_low`, `x_high`, `task_uniforms`
    (D), `tasks_from_uniforms` and `target`; evaluation also uses `target` on a dense grid
    over the input range.

    All the randomness of a meta-batch of T tasks is one `torch.rand(T, D + K + Q)` call:
    each row holds a task's D identity uniforms, then its K + Q input uniforms. So drawing
    n * T tasks at once gives bitwise the tasks of n draws of T (see `sample_many`)."""

    n_in = 1
    n_out = 1
    x_low: float
    x_high: float
    task_uniforms: int  # D: uniforms per task turned into its identity by tasks_from_uniforms

    def __init__(self, shots: int, queries: Optional[int] = None):
        self.shots = _checks.check_int("shots", shots, 1)
        self.queries = self.shots if queries is None else _checks.check_int("queries", queries, 1)

    def tasks_from_uniforms(self, u: torch.Tensor) -> torch.Tensor:
        """[T, D'] float64: what identifies each task (amplitude, phase, ...), computed row by
        row from u [T, D] float64 uniforms in [0, 1) (D = task_uniforms)."""
        raise NotImplementedError

    def target(self, tasks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y [T, N, 1] of tasks [T, D'] at x [T, N, 1] (any float dtype)."""
        raise NotImplementedError

    def _scale(self, u: torch.Tensor) -> torch.Tensor:
        # uniforms in [0, 1) -> inputs in [x_low, x_high), elementwise
        return self.x_low + (self.x_high - self.x_low) * u

    def sample_tasks(self, T: int, generator: torch.Generator) -> torch.Tensor:
        """[T, D'] float64: T task identities on their own (e.g. for figures)."""
        u = torch.rand(T, self.task_uniforms, generator=generator, dtype=torch.float64)
        return self.tasks_from_uniforms(u)

    def inputs(self, T: int, N: int, generator: torch.Generator) -> torch.Tensor:
        """x [T, N, 1] float64, uniform over the input range."""
        return self._scale(torch.rand(T, N, 1, generator=generator, dtype=torch.float64))

    def grid(self, N: int) -> torch.Tensor:
        """[N, 1] float64: N evenly spaced inputs over the input range, both ends included."""
        return torch.linspace(self.x_low, self.x_high, N, dtype=torch.float64).unsqueeze(1)

    def draw(self, T: int, generator: torch.Generator):
        """(tasks [T, D'], x [T, K + Q, 1], y [T, K + Q, 1]), all float64 on the CPU: the draws
        behind `sample`, for callers that also need each task's identity. One torch.rand call
        (see the class docstring); every later step is elementwise or row by row, so row t
        depends only on row t of the draw."""
        T = _checks.check_int("T", T, 1)
        D = self.task_uniforms
        u = torch.rand(T, D + self.shots + self.queries, generator=generator, dtype=torch.float64)
        tasks = self.tasks_from_uniforms(u[:, :D])
        x = self._scale(u[:, D:]).unsqueeze(2)
        y = self.target(tasks, x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.is_complex():
            got = f"{y.dtype} {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"task family {self.name!r} ({type(self).__name__}).target must "
                             f"return real y shaped like x, {list(x.shape)}; got {got}")
        return tasks, x, y

    def split(self, x, y, *, dtype=torch.float32, device=None) -> TaskBatch:
        """The TaskBatch of draws x, y [..., K + Q, 1]: the first K points are the support set."""
        cast = lambda t: t.to(device=device, dtype=dtype)
        K = self.shots
        return TaskBatch(cast(x[..., :K, :]), cast(y[..., :K, :]), cast(x[..., K:, :]),
                         cast(y[..., K:, :]))

    def sample(self, T, *, generator, dtype=torch.float32, device=None) -> TaskBatch:
        _, x, y = self.draw(T, generator)
        return self.split(x, y, dtype=dtype, device=device)

    def sample_many(self, n, T, *, generator, dtype=torch.float32, device=None):
        # The promise holds only for the one-call draw above: a subclass that changes how a
        # meta-batch is drawn gets the per-batch path.
        cls = type(self)
        if cls.sample is not FunctionTasks.sample or cls.draw is not FunctionTasks.draw:
            return None
        n = _checks.check_int("n", n, 1)
        T = _checks.check_int("T", T, 1)
        _, x, y = self.draw(n * T, generator)
        rows = (n, T) + tuple(x.shape[1:])
        return self.split(x.reshape(rows), y.reshape(rows), dtype=dtype, device=device)

    def __repr__(self):
        return f"{type(self).__name__}(shots={self.shots}, queries={self.queries})"


class SeedSine(FunctionTasks):
    """The seed's task: y = sin(x + b), b = 0 or pi with equal probability, x ~ U(-2pi, 2pi)."""

    name = "seed-sine"
    x_low, x_high = -2 * math.pi, 2 * math.pi

    def __init__(self, shots: int = 4, queries: Optional[int] = None):
        super().__init__(shots, queries)

    task_uniforms = 1

    def tasks_from_uniforms(self, u):
        # b = pi with probability 1/2: u < 0.5 is exactly half of the generator's doubles
        return (u < 0.5).to(torch.float64) * math.pi

    def target(self, tasks, x):
        b = tasks[:, None, 0:1].to(x.dtype)
        return torch.sin(x + b)


class Sine(FunctionTasks):
    """The MAML paper's task: y = A sin(x - phi), A ~ U(0.1, 5), phi ~ U(0, pi), x ~ U(-5, 5)."""

    name = "sine"
    x_low, x_high = -5.0, 5.0

    def __init__(self, shots: int = 10, queries: Optional[int] = None):
        super().__init__(shots, queries)

    task_uniforms = 2

    def tasks_from_uniforms(self, u):
        amplitude = 0.1 + 4.9 * u[:, 0]
        phase = math.pi * u[:, 1]
        return torch.stack([amplitude, phase], dim=1)

    def target(self, tasks, x):
        amplitude = tasks[:, None, 0:1].to(x.dtype)
        phase = tasks[:, None, 1:2].to(x.dtype)
        return amplitude * torch.sin(x - phase)


def check_batch(where: str, out, lead, *, dtype, device) -> TaskBatch:
    """A sampler's output `out` as a TaskBatch of `dtype` on `device`, after checking that it
    is four real tensors [*lead, points, features] (lead: (T,), or (n, T) for sample_many)
    whose support (and query) x and y hold as many points. ValueError / TypeError naming
    `where` (the family) and the tensor otherwise: more tasks than asked, complex numbers
    (their imaginary part would be dropped), ... are refused, not trained on. (Called once
    per meta-iteration for users' samplers: the checks are cheap ones, messages built only
    on failure.)"""
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise ValueError(f"{where} must return (x_support, y_support, x_query, y_query), got "
                         f"{type(out).__name__}")
    n = len(lead)
    for field, t in zip(TaskBatch._fields, out):
        if not isinstance(t, torch.Tensor) or t.dim() != n + 2 or t.shape[:n] != lead:
            asked = ", ".join(f"{k}={v}" for k, v in zip("nT"[-n:], lead))
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where} must return {field} as a tensor [{asked}, points, "
                             f"features] (the tasks asked for), got {got}")
        if not t.is_floating_point() and (t.is_complex() or t.dtype == torch.bool):
            raise TypeError(f"{where} returned {field} of dtype {t.dtype}: pymaml trains on "
                            "real numbers (a complex tensor's imaginary part would be dropped)")
    xs, ys, xq, yq = out
    if xs.shape[n] != ys.shape[n] or xq.shape[n] != yq.shape[n]:
        x, y = ("x_support", "y_support") if xs.shape[n] != ys.shape[n] else ("x_query", "y_query")
        shapes = {f: list(t.shape) for f, t in zip(TaskBatch._fields, out)}
        raise ValueError(f"{where} returned {x} and {y} with different numbers of points: "
                         f"{shapes[x]} and {shapes[y]}")
    if not isinstance(device, torch.device):
        device = torch.device("cpu" if device is None else device)
    if all(t.dtype == dtype and t.device == device for t in out):
        return out if type(out) is TaskBatch else TaskBatch(*out)
    return TaskBatch(*(t.to(device=device, dtype=dtype) for t in out))


class CallableTasks(TaskFamily):
    """Wraps a user's sampler `fn(T, generator) -> (xs, ys, xq, yq)` (any real dtype, any
    device: the result is cast and moved), checking what it returns."""

    def __init__(self, fn: Callable, name: Optional[str] = None):
        if not callable(fn):
            raise TypeError(f"task must be a task name, a TaskFamily or a callable, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def sample(self, T, *, generator, dtype=torch.float32, device=None) -> TaskBatch:
        T = _checks.check_int("T", T, 1)
        return check_batch(f"task {self.name!r} (a callable fn(T, generator))",
                           self.fn(T, generator), (T,), dtype=dtype, device=device)

    def __repr__(self):
        return f"CallableTasks({self.name})"


class _Wrapping:
    """A wrapper around a user's task family whose attributes are the family's own (what
    CheckedTasks and CheckedDAMLTasks check is theirs)."""

    def __init__(self, family):
        self.family = family

    # The family classes' attributes would shadow the family's own: forwarded explicitly.
    name = property(lambda self: self.family.name)
    n_in = property(lambda self: self.family.n_in)
    n_out = property(lambda self: self.family.n_out)

    def __getattr__(self, name):
        return getattr(self.__dict__["family"], name)

    @property
    def _where(self) -> str:
        return f"task family {self.family.name!r} ({type(self.family).__name__})"


class CheckedTasks(_Wrapping, TaskFamily):
    """A user's TaskFamily, with what its sample / sample_many return checked (check_batch)
    on every call; its other attributes are the family's own."""

    def sample(self, T, *, generator, dtype=torch.float32, device=None) -> TaskBatch:
        out = self.family.sample(T, generator=generator, dtype=dtype, device=device)
        return check_batch(f"{self._where}.sample", out, (T,), dtype=dtype, device=device)

    def sample_many(self, n, T, *, generator, dtype=torch.float32, device=None):
        out = self.family.sample_many(n, T, generator=generator, dtype=dtype, device=device)
        if out is None:
            return None
        return check_batch(f"{self._where}.sample_many", out, (n, T), dtype=dtype, device=device)

    def __repr__(self):
        return f"CheckedTasks({self.family!r})"


def checked(family: TaskFamily) -> TaskFamily:
    """`family`, its outputs checked on every draw unless it is one of pymaml's own (whose
    shapes and dtypes are right by construction) or already checks them."""
    if type(family) in (SeedSine, Sine, CallableTasks, CheckedTasks):
        return family
    return CheckedTasks(family)


FAMILIES = {SeedSine.name: SeedSine, Sine.name: Sine}


def get_family(task, *, shots: Optional[int] = None, queries: Optional[int] = None) -> TaskFamily:
    """A TaskFamily from a name in FAMILIES (with optional shots / queries), a TaskFamily
    (returned as is), or a callable sampler."""
    if isinstance(task, str):
        if task not in FAMILIES:
            raise ValueError(f"task must be one of {', '.join(map(repr, FAMILIES))}, a "
                             f"TaskFamily or a callable; got {task!r}")
        kwargs = {k: v for k, v in (("shots", shots), ("queries", queries)) if v is not None}
        return FAMILIES[task](**kwargs)
    if shots is not None or queries is not None:
        raise ValueError("shots and queries apply to the named task families only; set them "
                         "on your own TaskFamily or sampler")
    if isinstance(task, TaskFamily):
        return task
    if isinstance(task, type) and issubclass(task, TaskFamily):
        raise TypeError(f"task must be a TaskFamily instance: pass {task.__name__}(), not the class")
    return CallableTasks(task)


def per_step_batches(x: torch.Tensor, steps: int, size: int, name: str = "inner_batch"):
    """x [..., N, features] cut into `steps` batches of `size` points, [..., steps, size,
    features]: step k takes points k * size, k * size + 1, ... (mod N), cycling through the N
    points as epochs over a task's data do. The points of a task are drawn independently, so
    consecutive slices are random minibatches, with no draw of their own (which keeps a
    chunk of iterations bitwise the iterations one by one)."""
    n = x.shape[-2]
    if size > n:
        raise ValueError(f"{name}={size} is more than the {n} points a task's inner loop has")
    index = (torch.arange(steps)[:, None] * size + torch.arange(size)) % n
    return x[..., index.to(x.device), :]


# ---- DAML task families: unlabeled source inputs, labeled target points ------------------------
"""DAML families (pymaml.daml, algorithm "daml"). A DAML task has no labeled support set: the
inner loop adapts from unlabeled SOURCE-domain inputs alone (through the learned inner loss),
and the outer loss is the supervised loss on labeled TARGET-domain points. The protocol, which
the trainer and the evaluation consume, and which a user implements to bring their own
source / target data:

- a DAMLTaskFamily subclass with `n_in`, `n_out` and
  `sample_daml(T, *, steps, generator, dtype=torch.float32, device=None) -> DAMLBatch`, a
  meta-batch of T tasks: x_source [T, steps, K_s, n_in] (a batch of unlabeled source inputs
  per inner step: step k reads x_source[:, k]; [T, K_s, n_in] is accepted too, the same
  inputs at every step), x_query [T, Q, n_in], y_query [T, Q, n_out] (the labeled target
  points). Randomness only from `generator` (a CPU torch.Generator), as for TaskFamily;
- optionally `sample_daml_many(n, T, *, steps, generator, ...)`: n meta-batches at once
  ([n, T, ...] fields), bitwise what n consecutive sample_daml calls give, or None (the
  default) when the family cannot promise that;
- or a callable `fn(T, steps, generator) -> (x_source, x_query, y_query)`, wrapped by
  `get_daml_family` in CallableDAMLTasks, which checks and casts what it returns.
  `checked_daml(family)` checks a user's subclass the same way (check_daml_batch).

A DAML family's `sample` (the MAML protocol) raises a ValueError saying so: there is no
labeled support set to run MAML's inner loop on. DAML families are listed in FAMILIES too
(their names are valid task names everywhere) and in DAML_FAMILIES.

- "daml-sine" (DAMLSine): the published continuation of the seed: target y = sin(x + b),
  b in {0, pi} equally likely, x ~ U(-2pi, 2pi), 4 labeled target points; ONE unlabeled
  source input per inner step, a fresh one at each step, x_s ~ U(pi/4, pi/2) when b = 0 and
  U(-pi/2, -pi/4) when b = pi (the sign of the source input tells the phase).
"""


class DAMLBatch(NamedTuple):
    """A DAML meta-batch: unlabeled source inputs x_source [T, steps, K_s, n_in] (or
    [T, K_s, n_in]: the same at every step); labeled target points x_query [T, Q, n_in],
    y_query [T, Q, n_out]."""
    x_source: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor


class DAMLTaskFamily(TaskFamily):
    """A distribution over DAML tasks (see the protocol above). Subclasses implement
    `sample_daml`; `sample_daml_many` is optional."""

    algorithm = "daml"

    def sample_daml(self, T: int, *, steps: int, generator: torch.Generator,
                    dtype=torch.float32, device=None) -> DAMLBatch:
        raise NotImplementedError

    def sample_daml_many(self, n: int, T: int, *, steps: int, generator: torch.Generator,
                         dtype=torch.float32, device=None) -> Optional[DAMLBatch]:
        """n meta-batches at once ([n, T, ...]), bitwise n consecutive sample_daml calls; None
        (the default) when the family cannot promise that."""
        return None

    def sample(self, T, *, generator, dtype=torch.float32, device=None):
        raise ValueError(f"task family {self.name!r} is a DAML family (unlabeled source inputs, "
                         "labeled target points): it has no labeled support set for MAML, "
                         "FO-MAML or Reptile; train it with algorithm='daml' (sample_daml)")

    def sample_many(self, n, T, *, generator, dtype=torch.float32, device=None):
        return None


class DAMLSine(DAMLTaskFamily):
    """The seed's DAML experiment: target y = sin(x + b), b in {0, pi} with equal probability,
    x ~ U(-2pi, 2pi); `queries` labeled target points (4); `shots` unlabeled source inputs per
    inner step (1), fresh at every step, x_s ~ U(pi/4, pi/2) when b = 0 and U(-pi/2, -pi/4)
    when b = pi.

    A task's identity is its phase b, [T, 1] float64 (as SeedSine's). All the randomness of a
    meta-batch of T tasks is one `torch.rand(T, 1 + Q + steps * K_s)` call (the task's
    uniform, its Q target inputs', its source inputs'), so sample_daml_many(n, T) is bitwise
    n calls of sample_daml(T)."""

    name = "daml-sine"
    n_in = 1
    n_out = 1
    x_low, x_high = -2 * math.pi, 2 * math.pi
    phases = (0.0, math.pi)
    # the source range for b = 0; for b = pi it is mirrored: (-pi/2, -pi/4)
    source_low, source_high = math.pi / 4, math.pi / 2
    task_uniforms = 1

    def __init__(self, shots: int = 1, queries: int = 4):
        self.shots = _checks.check_int("shots", shots, 1)  # K_s: source inputs per inner step
        self.queries = _checks.check_int("queries", queries, 1)  # Q: labeled target points

    def tasks_from_uniforms(self, u: torch.Tensor) -> torch.Tensor:
        # b = pi with probability 1/2 (as SeedSine)
        return (u < 0.5).to(torch.float64) * math.pi

    def tasks_of_phase(self, phase: float, T: int = 1) -> torch.Tensor:
        """[T, 1] float64: T tasks of phase `phase` (0 or pi), e.g. for evaluation per phase."""
        if not any(abs(float(phase) - b) < 1e-12 for b in self.phases):
            raise ValueError(f"phase must be one of {self.phases} for {self.name!r}, got {phase!r}")
        return torch.full((_checks.check_int("T", T, 1), 1), float(phase), dtype=torch.float64)

    def sample_tasks(self, T: int, generator: torch.Generator) -> torch.Tensor:
        """[T, 1] float64: T task phases on their own."""
        u = torch.rand(_checks.check_int("T", T, 1), 1, generator=generator, dtype=torch.float64)
        return self.tasks_from_uniforms(u)

    def target(self, tasks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y [T, N, 1] of tasks [T, 1] at x [T, N, 1]."""
        return torch.sin(x + tasks[:, None, 0:1].to(x.dtype))

    def source_from_uniforms(self, tasks: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Source inputs of tasks [T, 1] from uniforms u [T, ...] in [0, 1): in
        [pi/4, pi/2) for b = 0, in (-pi/2, -pi/4] for b = pi."""
        x = self.source_low + (self.source_high - self.source_low) * u
        sign = torch.where(tasks[:, 0] > math.pi / 2, -1.0, 1.0).to(u.dtype)
        return x * sign.reshape((-1,) + (1,) * (u.dim() - 1))

    def grid(self, N: int) -> torch.Tensor:
        """[N, 1] float64: N evenly spaced target inputs over [-2pi, 2pi], both ends included."""
        return torch.linspace(self.x_low, self.x_high, N, dtype=torch.float64).unsqueeze(1)

    def draw_daml(self, T: int, steps: int, generator: torch.Generator,
                  tasks: Optional[torch.Tensor] = None):
        """(tasks [T, 1], x_source [T, steps, K_s, 1], x_query [T, Q, 1], y_query [T, Q, 1]),
        float64 on the CPU, from one torch.rand(T, 1 + Q + steps * K_s) call. `tasks` [T, 1]
        (e.g. tasks_of_phase) fixes the phases instead of drawing them (the draw is the same
        size, its task uniforms unused)."""
        T = _checks.check_int("T", T, 1)
        steps = _checks.check_int("steps", steps, 1)
        Q, K = self.queries, self.shots
        u = torch.rand(T, 1 + Q + steps * K, generator=generator, dtype=torch.float64)
        if tasks is None:
            tasks = self.tasks_from_uniforms(u[:, :1])
        else:
            tasks = torch.as_tensor(tasks, dtype=torch.float64).reshape(-1, 1)
            if tasks.shape[0] != T:
                raise ValueError(f"tasks must hold T = {T} phases, got shape {list(tasks.shape)}")
        x_query = (self.x_low + (self.x_high - self.x_low) * u[:, 1:1 + Q]).unsqueeze(2)
        y_query = self.target(tasks, x_query)
        x_source = self.source_from_uniforms(tasks, u[:, 1 + Q:].reshape(T, steps, K, 1))
        return tasks, x_source, x_query, y_query

    @staticmethod
    def _cast(parts, dtype, device) -> DAMLBatch:
        return DAMLBatch(*(t.to(device=device, dtype=dtype) for t in parts))

    def sample_daml(self, T, *, steps, generator, dtype=torch.float32, device=None) -> DAMLBatch:
        return self._cast(self.draw_daml(T, steps, generator)[1:], dtype, device)

    def sample_phase(self, phase: float, T: int = 1, *, steps: int, generator: torch.Generator,
                     dtype=torch.float32, device=None) -> DAMLBatch:
        """T tasks of phase `phase` (0 or pi): their source inputs and labeled target points."""
        tasks = self.tasks_of_phase(phase, T)
        return self._cast(self.draw_daml(T, steps, generator, tasks)[1:], dtype, device)

    def sample_daml_many(self, n, T, *, steps, generator, dtype=torch.float32, device=None):
        cls = type(self)
        if cls.sample_daml is not DAMLSine.sample_daml or cls.draw_daml is not DAMLSine.draw_daml:
            return None
        n, T = _checks.check_int("n", n, 1), _checks.check_int("T", T, 1)
        _, xs, xq, yq = self.draw_daml(n * T, steps, generator)
        return self._cast([t.reshape((n, T) + tuple(t.shape[1:])) for t in (xs, xq, yq)],
                          dtype, device)

    def __repr__(self):
        return f"DAMLSine(shots={self.shots}, queries={self.queries})"


def check_daml_batch(where: str, out, lead, *, steps: int, dtype, device) -> DAMLBatch:
    """A DAML sampler's output as a DAMLBatch of `dtype` on `device`, after checking it is
    three real tensors: x_source [*lead, steps, K_s, n_in] or [*lead, K_s, n_in], x_query
    [*lead, Q, n_in], y_query [*lead, Q, n_out] (lead: (T,), or (n, T) for sample_daml_many).
    ValueError / TypeError naming `where` and the tensor otherwise."""
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise ValueError(f"{where} must return (x_source, x_query, y_query), got "
                         f"{type(out).__name__}")
    n = len(lead)
    asked = ", ".join(f"{k}={v}" for k, v in zip("nT"[-n:], lead))
    for field, t in zip(DAMLBatch._fields, out):
        ranks = (n + 2, n + 3) if field == "x_source" else (n + 2,)
        if not isinstance(t, torch.Tensor) or t.dim() not in ranks or t.shape[:n] != lead:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            shape = ("[{a}, steps, K_s, n_in] or [{a}, K_s, n_in]" if field == "x_source"
                     else "[{a}, points, features]").format(a=asked)
            raise ValueError(f"{where} must return {field} as a tensor {shape} (the tasks "
                             f"asked for), got {got}")
        if not t.is_floating_point() and (t.is_complex() or t.dtype == torch.bool):
            raise TypeError(f"{where} returned {field} of dtype {t.dtype}: pymaml trains on "
                            "real numbers (a complex tensor's imaginary part would be dropped)")
    xs, xq, yq = out
    if xs.dim() == n + 3 and xs.shape[n] != steps:
        raise ValueError(f"{where} returned x_source with a batch for {xs.shape[n]} inner steps, "
                         f"but steps = {steps}: shape {list(xs.shape)}")
    if xq.shape[n] != yq.shape[n]:
        raise ValueError(f"{where} returned x_query and y_query with different numbers of "
                         f"points: {list(xq.shape)} and {list(yq.shape)}")
    if xs.shape[-1] != xq.shape[-1]:
        raise ValueError(f"{where} returned x_source and x_query with different input widths: "
                         f"{list(xs.shape)} and {list(xq.shape)}")
    if not isinstance(device, torch.device):
        device = torch.device("cpu" if device is None else device)
    if all(t.dtype == dtype and t.device == device for t in out):
        return out if type(out) is DAMLBatch else DAMLBatch(*out)
    return DAMLBatch(*(t.to(device=device, dtype=dtype) for t in out))


class CallableDAMLTasks(DAMLTaskFamily):
    """Wraps a user's DAML sampler `fn(T, steps, generator) -> (x_source, x_query, y_query)`
    (any real dtype, any device: the result is checked, cast and moved)."""

    def __init__(self, fn: Callable, name: Optional[str] = None):
        if not callable(fn):
            raise TypeError(f"task must be a DAML task name, a DAMLTaskFamily or a callable "
                            f"fn(T, steps, generator), got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def sample_daml(self, T, *, steps, generator, dtype=torch.float32, device=None) -> DAMLBatch:
        T = _checks.check_int("T", T, 1)
        return check_daml_batch(f"task {self.name!r} (a callable fn(T, steps, generator))",
                                self.fn(T, steps, generator), (T,), steps=steps, dtype=dtype,
                                device=device)

    def __repr__(self):
        return f"CallableDAMLTasks({self.name})"


class CheckedDAMLTasks(_Wrapping, DAMLTaskFamily):
    """A user's DAMLTaskFamily, what its sample_daml / sample_daml_many return checked on every
    call (check_daml_batch); its other attributes are the family's own."""

    def sample_daml(self, T, *, steps, generator, dtype=torch.float32, device=None) -> DAMLBatch:
        out = self.family.sample_daml(T, steps=steps, generator=generator, dtype=dtype,
                                      device=device)
        return check_daml_batch(f"{self._where}.sample_daml", out, (T,), steps=steps,
                                dtype=dtype, device=device)

    def sample_daml_many(self, n, T, *, steps, generator, dtype=torch.float32, device=None):
        out = self.family.sample_daml_many(n, T, steps=steps, generator=generator, dtype=dtype,
                                           device=device)
        if out is None:
            return None
        return check_daml_batch(f"{self._where}.sample_daml_many", out, (n, T), steps=steps,
                                dtype=dtype, device=device)

    def __repr__(self):
        return f"CheckedDAMLTasks({self.family!r})"


def checked_daml(family: DAMLTaskFamily) -> DAMLTaskFamily:
    """`family`, its outputs checked on every draw unless it is one of pymaml's own."""
    if type(family) in (DAMLSine, CallableDAMLTasks, CheckedDAMLTasks):
        return family
    return CheckedDAMLTasks(family)


DAML_FAMILIES = {DAMLSine.name: DAMLSine}
FAMILIES.update(DAML_FAMILIES)


def get_daml_family(task, *, shots: Optional[int] = None,
                    queries: Optional[int] = None) -> DAMLTaskFamily:
    """A DAMLTaskFamily from a name in DAML_FAMILIES (shots: source inputs per inner step,
    queries: labeled target points), a DAMLTaskFamily (returned as is) or a callable
    fn(T, steps, generator) -> (x_source, x_query, y_query)."""
    if isinstance(task, str):
        if task not in DAML_FAMILIES:
            raise ValueError(f"task must be one of {', '.join(map(repr, DAML_FAMILIES))} for "
                             f"DAML, a DAMLTaskFamily or a callable fn(T, steps, generator); "
                             f"got {task!r}")
        kwargs = {k: v for k, v in (("shots", shots), ("queries", queries)) if v is not None}
        return DAML_FAMILIES[task](**kwargs)
    if shots is not None or queries is not None:
        raise ValueError("shots and queries apply to the named task families only; set them "
                         "on your own DAMLTaskFamily or sampler")
    if isinstance(task, DAMLTaskFamily):
        return task
    if isinstance(task, TaskFamily):
        raise TypeError(f"task {task!r} is a MAML task family (labeled support sets); DAML "
                        "needs a DAMLTaskFamily (unlabeled source inputs, labeled target points)")
    if isinstance(task, type) and issubclass(task, TaskFamily):
        raise TypeError(f"task must be a DAMLTaskFamily instance: pass {task.__name__}(), not the class")
    return CallableDAMLTasks(task)


__all__ += ["DAMLBatch", "DAMLTaskFamily", "DAMLSine", "CallableDAMLTasks", "CheckedDAMLTasks",
            "DAML_FAMILIES", "get_daml_family", "checked_daml", "check_daml_batch"]
