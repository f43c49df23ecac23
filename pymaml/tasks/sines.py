"""pymaml's own task families: FunctionTasks (SeedSine, Sine) for MAML, DAMLSine for DAML.

Each draws a meta-batch of T tasks with one torch.rand(T, ...) call in float64 on the CPU, a row
per task, every later step elementwise or row by row. torch's CPU generator fills a tensor
element after element, so one call of n * T rows draws exactly what n calls of T rows draw, in
the same order: that is how their many-batch samplers promise n meta-batches in one call,
bitwise n single draws, leaving the generator in the same state."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .. import _checks
from .base import DAMLBatch, DAMLTaskFamily, TaskBatch, TaskFamily, _cast


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
    over the input range. A meta-batch's randomness is one `torch.rand(T, D + K + Q)` call: a
    row holds a task's D identity uniforms, then its K + Q input uniforms."""

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
        behind `sample`, for callers that also need each task's identity."""
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
