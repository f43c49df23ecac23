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
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from .functional import _check_int

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
        self.shots = _check_int("shots", shots, 1)
        self.queries = self.shots if queries is None else _check_int("queries", queries, 1)

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
        T = _check_int("T", T, 1)
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
        n = _check_int("n", n, 1)
        T = _check_int("T", T, 1)
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
        T = _check_int("T", T, 1)
        return check_batch(f"task {self.name!r} (a callable fn(T, generator))",
                           self.fn(T, generator), (T,), dtype=dtype, device=device)

    def __repr__(self):
        return f"CallableTasks({self.name})"


class CheckedTasks(TaskFamily):
    """A user's TaskFamily, with what its sample / sample_many return checked (check_batch)
    on every call; its other attributes are the family's own."""

    def __init__(self, family: TaskFamily):
        self.family = family

    # TaskFamily's class attributes would shadow the family's own: forwarded explicitly.
    name = property(lambda self: self.family.name)
    n_in = property(lambda self: self.family.n_in)
    n_out = property(lambda self: self.family.n_out)

    def __getattr__(self, name):
        return getattr(self.__dict__["family"], name)

    @property
    def _where(self) -> str:
        return f"task family {self.family.name!r} ({type(self.family).__name__})"

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
