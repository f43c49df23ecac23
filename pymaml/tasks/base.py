"""The two task protocols' types (TaskBatch, DAMLBatch, TaskFamily, DAMLTaskFamily) and the
code around a user's sampler, written once for both protocols: _Kind says what tells them apart
(the batch's fields and what to check of them), _Kind.check checks what a user's code returns,
_Callable wraps a user's function and _Checked a user's family, each with a thin public class
per protocol whose methods keep the protocol's own signatures."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .. import _checks


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


def _cast(batch: type, parts, dtype, device, labels=()):
    """parts as a `batch` of `dtype` on `device` (None: where they are); the fields named in
    `labels` (integer class indices, cross-entropy's labels) as int64 instead. Parts already
    so are kept without calling Tensor.to (which would return them as they are, for ~1.5 us
    each, four per meta-iteration)."""
    if device is not None and not isinstance(device, torch.device):
        device = torch.device(device)
    if labels:
        dtypes = [torch.int64 if f in labels else dtype for f in batch._fields]
        return batch(*(t.to(device=device, dtype=d) for t, d in zip(parts, dtypes)))
    if all(t.dtype == dtype and (device is None or t.device == device) for t in parts):
        return parts if type(parts) is batch else batch(*parts)
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
        features], with the `points` and `widths` of its partner; a y field may instead hold
        integer class indices [*lead, points] (cross-entropy's labels, kept as int64, not cast
        to `dtype`). ValueError / TypeError naming `where` (the family) and the field
        otherwise: more tasks than asked, complex numbers (their imaginary part would be
        dropped), ... are refused, not trained on. (Called once per meta-iteration: cheap
        checks, messages built only on failure.)"""
        fields = self.batch._fields
        if not isinstance(out, (tuple, list)) or len(out) != len(fields):
            raise ValueError(f"{where} must return ({', '.join(fields)}), got "
                             f"{type(out).__name__}")
        n = len(lead)
        labels = ()  # the y fields holding class indices [*lead, points]
        for field, t in zip(fields, out):
            ranks = (n + 2, n + 3) if field == self.stepped else (n + 2,)
            if not isinstance(t, torch.Tensor) or t.dim() not in ranks or t.shape[:n] != lead:
                if (field[0] == "y" and isinstance(t, torch.Tensor) and t.dim() == n + 1
                        and t.shape[:n] == lead and _checks.is_integer(t)):
                    labels += (field,)
                    continue
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
        return _cast(self.batch, out, dtype, torch.device("cpu") if device is None else device,
                     labels)


_MAML = _Kind(TaskBatch, "TaskFamily", "fn(T, generator)",
              points=(("x_support", "y_support"), ("x_query", "y_query")))
_DAML = _Kind(DAMLBatch, "DAMLTaskFamily", "fn(T, steps, generator)", " for DAML", "x_source",
              points=(("x_query", "y_query"),), widths=(("x_source", "x_query"),))
# check_batch(where, out, lead, *, dtype, device) -> TaskBatch: four real tensors, support (and
# query) x and y with as many points; check_daml_batch(where, out, lead, *, steps, dtype,
# device) -> DAMLBatch: x_source [*lead, steps, K_s, n_in] or [*lead, K_s, n_in], x_query
# [*lead, Q, n_in], y_query [*lead, Q, n_out], x_source and x_query equally wide.
check_batch, check_daml_batch = _MAML.check, _DAML.check


# pymaml.train's defaults for the arguments it leaves None: the seed's experiment. A family
# may have its own (run_defaults; Omniglot's are the MAML paper's).
SEED_DEFAULTS = dict(sizes=(1, 32, 32, 1), loss="l1", inner_steps=5, inner_lr=3e-2,
                     meta_batch_size=1, optimizer="sgd", outer_lr=1e-2, iterations=275_000)


class TaskFamily:
    """A distribution over tasks. Subclasses implement `sample`; `n_in` / `n_out` are the
    feature counts of x and y (None when the family cannot say before sampling)."""

    name = "custom"
    n_in: Optional[int] = None
    n_out: Optional[int] = None

    def run_defaults(self) -> dict:
        """pymaml.train's defaults on this family (SEED_DEFAULTS unless a family says)."""
        return dict(SEED_DEFAULTS)

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
    """A distribution over DAML tasks (the protocol: pymaml.tasks). Subclasses implement
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

    def run_defaults(self) -> dict:
        own = getattr(self.family, "run_defaults", None)
        return own() if callable(own) else dict(SEED_DEFAULTS)

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
