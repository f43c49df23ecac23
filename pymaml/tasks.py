"""Task families: each samples a whole meta-batch of tasks in one vectorised call.

Two protocols, one per kind of batch, each served by pymaml's own families, a user's subclass
(wrapped by checked / checked_daml) or a user's callable (wrapped by get_family /
get_daml_family); what a user's code returns is checked at every draw, by code written once for
both protocols (_Kind):

- MAML's (MAML, FO-MAML, Reptile, Meta-SGD, ANIL): TaskFamily.sample(T, *, generator,
  dtype=torch.float32, device=None) -> TaskBatch of labeled support and query points,
  x [T, K, n_in], y [T, K, n_out]; or a callable `fn(T, generator) -> (xs, ys, xq, yq)`.
- DAML's (pymaml.daml): no labeled support set; the inner loop adapts from unlabeled SOURCE
  inputs alone (through the learned inner loss), the outer loss is the supervised loss on
  labeled TARGET points. DAMLTaskFamily.sample_daml(T, *, steps, generator, ...) -> DAMLBatch:
  x_source [T, steps, K_s, n_in] (step k reads x_source[:, k]; [T, K_s, n_in]: the same inputs
  at every step), x_query [T, Q, n_in], y_query [T, Q, n_out]; or a callable
  `fn(T, steps, generator) -> (x_source, x_query, y_query)`. A DAML family's `sample` raises
  (no support set for MAML's inner loop); its name is valid everywhere (FAMILIES holds it too).

Randomness comes only from the torch.Generator passed in (always a CPU generator, so that a
run's sampler state is one tensor a checkpoint can hold, and the same seed gives the same tasks
on every device and dtype: draws are made in float64 on the CPU, then cast and moved).

`sample_many(n, T, ...)` / `sample_daml_many(n, T, *, steps, ...)` draw n meta-batches at once
([n, T, ...] fields), bitwise what n consecutive single draws give, leaving the generator in the
same state, or return None (the default) when the family cannot promise that; the trainer uses
them to hand many iterations' tasks to one fused training call. pymaml's own families promise
it: a meta-batch of T tasks makes all its random draws in one `torch.rand(T, ...)` call, a row
per task, and torch's CPU generator fills a tensor element after element, so one call of n * T
rows draws exactly what n calls of T rows draw, in the same order.

- "seed-sine" (SeedSine): the seed's task, y = sin(x + b), b in {0, pi}, x ~ U(-2pi, 2pi), 4 + 4 points;
- "sine" (Sine): the MAML paper's, y = A sin(x - phi), A ~ U(0.1, 5), phi ~ U(0, pi), x ~ U(-5, 5);
- "daml-sine" (DAMLSine): the seed's DAML experiment: seed-sine's targets, a source input a step.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from . import _checks

__all__ = ["TaskBatch", "TaskFamily", "FunctionTasks", "SeedSine", "Sine", "CallableTasks",
           "CheckedTasks", "FAMILIES", "get_family", "checked", "check_batch",
           "DAMLBatch", "DAMLTaskFamily", "DAMLSine", "CallableDAMLTasks", "CheckedDAMLTasks",
           "DAML_FAMILIES", "get_daml_family", "checked_daml", "check_daml_batch"]


class TaskBatch(NamedTuple):
    """A meta-batch: support x [T, K, n_in], y [T, K, n_out]; query x [T, Q, n_in], y [T, Q, n_out]."""
    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor


class DAMLBatch(NamedTuple):
    """A DAML meta-batch: unlabeled source inputs x_source [T, steps, K_s, n_in] (or
    [T, K_s, n_in]: the same at every step); labeled target points x_query [T, Q, n_in],
    y_query [T, Q, n_out]."""
    x_source: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor


def _cast(batch: type, parts, dtype, device):
    # Tensor.to returns a tensor that needs no change as it is (device None: where it is)
    return batch(*(t.to(device=device, dtype=dtype) for t in parts))


class _Kind(NamedTuple):
    """What tells the two protocols apart, for the code written once for both (the checks of
    what a user's sampler returns, the wrappers, the lookup by name)."""
    batch: type          # TaskBatch or DAMLBatch
    family: str          # the class a user subclasses, for messages
    call: str            # a user's sampler function, for messages
    scope: str = ""      # where a task name is looked up, for messages
    stepped: str = ""    # the field that may hold a batch per inner step ([*lead, steps, ...])
    points: tuple = ()   # pairs of fields that must hold as many points
    widths: tuple = ()   # pairs of input fields that must have as many features

    def check(self, where: str, out, lead, *, steps: Optional[int] = None, dtype, device):
        """A sampler's output `out` as a batch of `dtype` on `device`, after checking that it
        holds the batch's fields, each a real tensor [*lead, points, features] (lead: (T,), or
        (n, T) for the many-batch samplers), `stepped` possibly [*lead, steps, points,
        features], with the `points` and `widths` of its partner. ValueError / TypeError naming
        `where` (the family) and the field otherwise: more tasks than asked, complex numbers
        (their imaginary part would be dropped), ... are refused, not trained on. (Called once
        per meta-iteration: cheap checks, messages built only on failure.)"""
        fields = self.batch._fields
        if not isinstance(out, (tuple, list)) or len(out) != len(fields):
            raise ValueError(f"{where} must return ({', '.join(fields)}), got "
                             f"{type(out).__name__}")
        n = len(lead)
        for field, t in zip(fields, out):
            ranks = (n + 2, n + 3) if field == self.stepped else (n + 2,)
            if not isinstance(t, torch.Tensor) or t.dim() not in ranks or t.shape[:n] != lead:
                a = ", ".join(f"{k}={v}" for k, v in zip("nT"[-n:], lead))
                shape = (f"[{a}, steps, K_s, n_in] or [{a}, K_s, n_in]" if field == self.stepped
                         else f"[{a}, points, features]")
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{where} must return {field} as a tensor {shape} (the tasks "
                                 f"asked for), got {got}")
            if not t.is_floating_point() and (t.is_complex() or t.dtype == torch.bool):
                raise TypeError(f"{where} returned {field} of dtype {t.dtype}: pymaml trains on "
                                "real numbers (a complex tensor's imaginary part would be dropped)")
        got = dict(zip(fields, out))
        t = got.get(self.stepped)
        if t is not None and t.dim() == n + 3 and t.shape[n] != steps:
            raise ValueError(f"{where} returned {self.stepped} with a batch for {t.shape[n]} "
                             f"inner steps, but steps = {steps}: shape {list(t.shape)}")
        for pairs, dim, what in ((self.points, n, "numbers of points"),
                                 (self.widths, -1, "input widths")):
            for a, b in pairs:
                if got[a].shape[dim] != got[b].shape[dim]:
                    raise ValueError(f"{where} returned {a} and {b} with different {what}: "
                                     f"{list(got[a].shape)} and {list(got[b].shape)}")
        return _cast(self.batch, out, dtype, device)


_MAML = _Kind(TaskBatch, "TaskFamily", "fn(T, generator)",
              points=(("x_support", "y_support"), ("x_query", "y_query")))
_DAML = _Kind(DAMLBatch, "DAMLTaskFamily", "fn(T, steps, generator)", " for DAML", "x_source",
              points=(("x_query", "y_query"),), widths=(("x_source", "x_query"),))
# check_batch(where, out, lead, *, dtype, device) -> TaskBatch: four real tensors, support (and
# query) x and y with as many points; check_daml_batch(where, out, lead, *, steps, dtype,
# device) -> DAMLBatch: x_source [*lead, steps, K_s, n_in] or [*lead, K_s, n_in], x_query
# [*lead, Q, n_in], y_query [*lead, Q, n_out], x_source and x_query equally wide.
check_batch, check_daml_batch = _MAML.check, _DAML.check


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


class DAMLTaskFamily(TaskFamily):
    """A distribution over DAML tasks (see the module docstring). Subclasses implement
    `sample_daml`; `sample_daml_many` is optional. (`sample_many` is TaskFamily's: None.)"""

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


# ---- pymaml's own families ----------------------------------------------------------------------

class _Uniform:
    """What the function families and daml-sine share: inputs uniform over [x_low, x_high),
    and task identities computed from `task_uniforms` uniforms per task."""

    x_low: float
    x_high: float
    task_uniforms: int  # D: uniforms per task turned into its identity by tasks_from_uniforms

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
        u = torch.rand(_checks.check_int("T", T, 1), self.task_uniforms, generator=generator,
                       dtype=torch.float64)
        return self.tasks_from_uniforms(u)

    def grid(self, N: int) -> torch.Tensor:
        """[N, 1] float64: N evenly spaced inputs over the input range, both ends included."""
        return torch.linspace(self.x_low, self.x_high, N, dtype=torch.float64).unsqueeze(1)

    def _many(self, n: int, T: int, draw: Callable, base: type, *methods: str):
        """n meta-batches of T tasks, draw(n * T)'s tensors [n * T, ...] as [n, T, ...]; None
        (nothing drawn) when the family's class changes one of `base`'s `methods`: the promise
        of the many-batch samplers holds only for the one-call draws written here."""
        if any(getattr(type(self), m) is not getattr(base, m) for m in methods):
            return None
        n, T = _checks.check_int("n", n, 1), _checks.check_int("T", T, 1)
        return [t.reshape((n, T) + tuple(t.shape[1:])) for t in draw(n * T)]

    def __repr__(self):
        return f"{type(self).__name__}(shots={self.shots}, queries={self.queries})"


class FunctionTasks(_Uniform, TaskFamily):
    """Tasks y = f(x; task) on 1-D inputs drawn uniformly from [x_low, x_high], support and
    query points drawn independently. Subclasses give `x_low`, `x_high`, `task_uniforms`
    (D), `tasks_from_uniforms` and `target`; evaluation also uses `target` on a dense grid
    over the input range.

    All the randomness of a meta-batch of T tasks is one `torch.rand(T, D + K + Q)` call:
    each row holds a task's D identity uniforms, then its K + Q input uniforms. So drawing
    n * T tasks at once gives bitwise the tasks of n draws of T (see `sample_many`)."""

    n_in = 1
    n_out = 1

    def __init__(self, shots: int, queries: Optional[int] = None):
        self.shots = _checks.check_int("shots", shots, 1)
        self.queries = self.shots if queries is None else _checks.check_int("queries", queries, 1)

    def inputs(self, T: int, N: int, generator: torch.Generator) -> torch.Tensor:
        """x [T, N, 1] float64, uniform over the input range."""
        return self._scale(torch.rand(T, N, 1, generator=generator, dtype=torch.float64))

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
        K = self.shots
        return _cast(TaskBatch, (x[..., :K, :], y[..., :K, :], x[..., K:, :], y[..., K:, :]),
                     dtype, device)

    def sample(self, T, *, generator, dtype=torch.float32, device=None) -> TaskBatch:
        _, x, y = self.draw(T, generator)
        return self.split(x, y, dtype=dtype, device=device)

    def sample_many(self, n, T, *, generator, dtype=torch.float32, device=None):
        xy = self._many(n, T, lambda N: self.draw(N, generator)[1:], FunctionTasks, "sample",
                        "draw")
        return None if xy is None else self.split(*xy, dtype=dtype, device=device)


class _PhaseSine(_Uniform):
    """The seed's targets, of seed-sine and daml-sine alike: y = sin(x + b), b = 0 or pi with
    equal probability, x ~ U(-2pi, 2pi). A task's identity is its phase b, [T, 1] float64."""

    x_low, x_high = -2 * math.pi, 2 * math.pi
    task_uniforms = 1

    def tasks_from_uniforms(self, u):
        # b = pi with probability 1/2: u < 0.5 is exactly half of the generator's doubles
        return (u < 0.5).to(torch.float64) * math.pi

    def target(self, tasks, x):
        return torch.sin(x + tasks[:, None, 0:1].to(x.dtype))


class SeedSine(_PhaseSine, FunctionTasks):
    """The seed's task: y = sin(x + b), b = 0 or pi with equal probability, x ~ U(-2pi, 2pi)."""

    name = "seed-sine"

    def __init__(self, shots: int = 4, queries: Optional[int] = None):
        super().__init__(shots, queries)


class Sine(FunctionTasks):
    """The MAML paper's task: y = A sin(x - phi), A ~ U(0.1, 5), phi ~ U(0, pi), x ~ U(-5, 5)."""

    name = "sine"
    x_low, x_high = -5.0, 5.0
    task_uniforms = 2

    def __init__(self, shots: int = 10, queries: Optional[int] = None):
        super().__init__(shots, queries)

    def tasks_from_uniforms(self, u):
        amplitude = 0.1 + 4.9 * u[:, 0]
        phase = math.pi * u[:, 1]
        return torch.stack([amplitude, phase], dim=1)

    def target(self, tasks, x):
        amplitude = tasks[:, None, 0:1].to(x.dtype)
        phase = tasks[:, None, 1:2].to(x.dtype)
        return amplitude * torch.sin(x - phase)


class DAMLSine(_PhaseSine, DAMLTaskFamily):
    """The seed's DAML experiment: seed-sine's targets, `queries` labeled target points (4);
    `shots` unlabeled source inputs per inner step (1), fresh at every step, x_s ~ U(pi/4, pi/2)
    when b = 0 and U(-pi/2, -pi/4) when b = pi (the sign of a source input tells the phase).
    A meta-batch's randomness is one `torch.rand(T, 1 + Q + steps * K_s)` call (a task's
    uniform, its Q target inputs', its source inputs')."""

    name = "daml-sine"
    n_in = 1
    n_out = 1
    phases = (0.0, math.pi)
    # the source range for b = 0; for b = pi it is mirrored: (-pi/2, -pi/4)
    source_low, source_high = math.pi / 4, math.pi / 2

    def __init__(self, shots: int = 1, queries: int = 4):
        self.shots = _checks.check_int("shots", shots, 1)  # K_s: source inputs per inner step
        self.queries = _checks.check_int("queries", queries, 1)  # Q: labeled target points

    def tasks_of_phase(self, phase: float, T: int = 1) -> torch.Tensor:
        """[T, 1] float64: T tasks of phase `phase` (0 or pi), e.g. for evaluation per phase."""
        if not any(abs(float(phase) - b) < 1e-12 for b in self.phases):
            raise ValueError(f"phase must be one of {self.phases} for {self.name!r}, got {phase!r}")
        return torch.full((_checks.check_int("T", T, 1), 1), float(phase), dtype=torch.float64)

    def source_from_uniforms(self, tasks: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Source inputs of tasks [T, 1] from uniforms u [T, ...] in [0, 1): in
        [pi/4, pi/2) for b = 0, in (-pi/2, -pi/4] for b = pi."""
        x = self.source_low + (self.source_high - self.source_low) * u
        sign = torch.where(tasks[:, 0] > math.pi / 2, -1.0, 1.0).to(u.dtype)
        return x * sign.reshape((-1,) + (1,) * (u.dim() - 1))

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
        x_query = self._scale(u[:, 1:1 + Q]).unsqueeze(2)
        y_query = self.target(tasks, x_query)
        x_source = self.source_from_uniforms(tasks, u[:, 1 + Q:].reshape(T, steps, K, 1))
        return tasks, x_source, x_query, y_query

    def sample_daml(self, T, *, steps, generator, dtype=torch.float32, device=None) -> DAMLBatch:
        return _cast(DAMLBatch, self.draw_daml(T, steps, generator)[1:], dtype, device)

    def sample_phase(self, phase: float, T: int = 1, *, steps: int, generator: torch.Generator,
                     dtype=torch.float32, device=None) -> DAMLBatch:
        """T tasks of phase `phase` (0 or pi): their source inputs and labeled target points."""
        tasks = self.tasks_of_phase(phase, T)
        return _cast(DAMLBatch, self.draw_daml(T, steps, generator, tasks)[1:], dtype, device)

    def sample_daml_many(self, n, T, *, steps, generator, dtype=torch.float32, device=None):
        parts = self._many(n, T, lambda N: self.draw_daml(N, steps, generator)[1:], DAMLSine,
                           "sample_daml", "draw_daml")
        return None if parts is None else _cast(DAMLBatch, parts, dtype, device)


# ---- a user's families: what they draw is checked, not trained on blindly -----------------------

class _Callable:
    """A user's sampler function as a family of `_kind`: what it returns is checked, cast and
    moved at every draw (any real dtype, any device)."""

    _kind: _Kind

    def __init__(self, fn: Callable, name: Optional[str] = None):
        if not callable(fn):
            raise TypeError(f"task must be a task name{self._kind.scope}, a {self._kind.family} "
                            f"or a callable {self._kind.call}, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def _draw(self, T, steps, generator, dtype, device):
        T = _checks.check_int("T", T, 1)
        out = self.fn(T, generator) if steps is None else self.fn(T, steps, generator)
        return self._kind.check(f"task {self.name!r} (a callable {self._kind.call})", out,
                                (T,), steps=steps, dtype=dtype, device=device)

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"


class CallableTasks(_Callable, TaskFamily):
    """Wraps a user's sampler `fn(T, generator) -> (xs, ys, xq, yq)`."""

    _kind = _MAML

    def sample(self, T, *, generator, dtype=torch.float32, device=None) -> TaskBatch:
        return self._draw(T, None, generator, dtype, device)


class CallableDAMLTasks(_Callable, DAMLTaskFamily):
    """Wraps a user's DAML sampler `fn(T, steps, generator) -> (x_source, x_query, y_query)`."""

    _kind = _DAML

    def sample_daml(self, T, *, steps, generator, dtype=torch.float32, device=None) -> DAMLBatch:
        return self._draw(T, steps, generator, dtype, device)


class _Checked:
    """A user's family of `_kind`, what its samplers return checked on every call; its other
    attributes are the family's own."""

    _kind: _Kind

    def __init__(self, family):
        self.family = family

    # The family classes' attributes would shadow the family's own: forwarded explicitly.
    name = property(lambda self: self.family.name)
    n_in = property(lambda self: self.family.n_in)
    n_out = property(lambda self: self.family.n_out)

    def __getattr__(self, name):
        # Reached only for what the wrapper lacks. A copy or an unpickled wrapper has no family
        # yet while copy / pickle look for their hooks: those are missing, not a KeyError.
        if "family" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["family"], name)

    def _sampled(self, method: str, lead: tuple, steps, generator, dtype, device):
        sizes = {} if steps is None else {"steps": steps}
        out = getattr(self.family, method)(*lead, **sizes, generator=generator, dtype=dtype,
                                           device=device)
        if out is None and len(lead) == 2:  # a many-batch sampler's "cannot": nothing drawn
            return None
        where = f"task family {self.family.name!r} ({type(self.family).__name__}).{method}"
        return self._kind.check(where, out, lead, steps=steps, dtype=dtype, device=device)

    def __repr__(self):
        return f"{type(self).__name__}({self.family!r})"


class CheckedTasks(_Checked, TaskFamily):
    """A user's TaskFamily, what its sample / sample_many return checked (check_batch)."""

    _kind = _MAML

    def sample(self, T, *, generator, dtype=torch.float32, device=None) -> TaskBatch:
        return self._sampled("sample", (T,), None, generator, dtype, device)

    def sample_many(self, n, T, *, generator, dtype=torch.float32, device=None):
        return self._sampled("sample_many", (n, T), None, generator, dtype, device)


class CheckedDAMLTasks(_Checked, DAMLTaskFamily):
    """A user's DAMLTaskFamily, what its sample_daml / sample_daml_many return checked
    (check_daml_batch)."""

    _kind = _DAML

    def sample_daml(self, T, *, steps, generator, dtype=torch.float32, device=None) -> DAMLBatch:
        return self._sampled("sample_daml", (T,), steps, generator, dtype, device)

    def sample_daml_many(self, n, T, *, steps, generator, dtype=torch.float32, device=None):
        return self._sampled("sample_daml_many", (n, T), steps, generator, dtype, device)


# pymaml's own classes, whose shapes and dtypes are right by construction or already checked.
# Exact types: a user's subclass of SeedSine, say, may change what it draws, so it is checked.
_TRUSTED = (SeedSine, Sine, CallableTasks, CheckedTasks)
_TRUSTED_DAML = (DAMLSine, CallableDAMLTasks, CheckedDAMLTasks)


def checked(family: TaskFamily) -> TaskFamily:
    """`family`, its outputs checked on every draw unless it is one of pymaml's own (whose
    shapes and dtypes are right by construction) or already checks them."""
    return family if type(family) in _TRUSTED else CheckedTasks(family)


def checked_daml(family: DAMLTaskFamily) -> DAMLTaskFamily:
    """`family`, its outputs checked on every draw unless it is one of pymaml's own."""
    return family if type(family) in _TRUSTED_DAML else CheckedDAMLTasks(family)


# ---- by name ------------------------------------------------------------------------------------

DAML_FAMILIES = {DAMLSine.name: DAMLSine}
FAMILIES = {SeedSine.name: SeedSine, Sine.name: Sine, **DAML_FAMILIES}


def _family(kind: _Kind, named: dict, base: type, wrap: type, task, shots, queries):
    """get_family and get_daml_family: a family of `base` from a name in `named`, a family
    (as is) or a callable (wrapped in `wrap`)."""
    if isinstance(task, str):
        if task not in named:
            raise ValueError(f"task must be one of {', '.join(map(repr, named))}{kind.scope}, a "
                             f"{kind.family} or a callable {kind.call}; got {task!r}")
        kwargs = {k: v for k, v in (("shots", shots), ("queries", queries)) if v is not None}
        return named[task](**kwargs)
    if shots is not None or queries is not None:
        raise ValueError("shots and queries apply to the named task families only; set them "
                         f"on your own {kind.family} or sampler")
    if isinstance(task, base):
        return task
    if isinstance(task, TaskFamily):  # a MAML family asked for DAML (a DAML one is a TaskFamily)
        raise TypeError(f"task {task!r} is a MAML task family (labeled support sets); DAML "
                        "needs a DAMLTaskFamily (unlabeled source inputs, labeled target points)")
    if isinstance(task, type) and issubclass(task, TaskFamily):
        raise TypeError(f"task must be a {kind.family} instance: pass {task.__name__}(), not "
                        "the class")
    return wrap(task)


def get_family(task, *, shots: Optional[int] = None, queries: Optional[int] = None) -> TaskFamily:
    """A TaskFamily from a name in FAMILIES (with optional shots / queries), a TaskFamily
    (returned as is), or a callable sampler fn(T, generator) -> (xs, ys, xq, yq)."""
    return _family(_MAML, FAMILIES, TaskFamily, CallableTasks, task, shots, queries)


def get_daml_family(task, *, shots: Optional[int] = None,
                    queries: Optional[int] = None) -> DAMLTaskFamily:
    """A DAMLTaskFamily from a name in DAML_FAMILIES (shots: source inputs per inner step,
    queries: labeled target points), a DAMLTaskFamily (returned as is) or a callable
    fn(T, steps, generator) -> (x_source, x_query, y_query)."""
    return _family(_DAML, DAML_FAMILIES, DAMLTaskFamily, CallableDAMLTasks, task, shots, queries)


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
