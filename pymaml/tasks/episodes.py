"""N-way K-shot classification episodes drawn from a labelled data set (x [N, ...], labels [N]);
docs/training.md ("Few-shot classification") describes them for users.

Points are ordered class by class (label 0's, then label 1's, ...): the class-to-label map is
already random, and a full-batch inner loop does not see the order, so no shuffle (and no
draw) is spent on it. Rotations are made inside a family, after split_classes, so a class and
its rotations are always on the same side. Randomness, as for pymaml's other families: one
torch.rand(T, C + ways * M) call in float64 on the CPU generator (C: the family's classes,
rotations included; M: the most examples a class has), a row per task, its class uniforms
then its example uniforms; so sample_many(n, T) is bitwise n calls of sample(T).
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import _checks
from .base import TaskBatch, TaskFamily

__all__ = ["Episodes", "split_classes"]


def _check_labels(labels) -> torch.Tensor:
    """labels as a CPU int64 tensor [N]; TypeError / ValueError naming `labels` otherwise."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class ids [N], got "
                        f"{type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer class ids (torch.int64), got {labels.dtype}")
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor [N], got shape "
                         f"{list(labels.shape)}")
    return labels.to(device="cpu", dtype=torch.int64)


def split_classes(labels: torch.Tensor, train: Union[int, float], *,
                  seed: int = 0) -> Tuple[List[int], List[int]]:
    """(train_ids, test_ids): the class ids found in `labels` [N] split at random into two
    disjoint sorted lists, `train` of them (an int) or that fraction of them, rounded (a float
    in (0, 1)) for meta-training, the rest for meta-testing. Both sides are non-empty. The same
    labels and seed give the same split on every machine (a torch.randperm of its own
    generator: it leaves the global and the sampling generators alone)."""
    classes = torch.unique(_check_labels(labels))  # sorted
    C = classes.numel()
    if isinstance(train, numbers.Integral) and not isinstance(train, bool):
        n = int(train)
    elif isinstance(train, numbers.Real) and not isinstance(train, bool) and 0 < train < 1:
        n = int(round(float(train) * C))
    else:
        raise ValueError(f"train must be a number of classes (an int) or a fraction of them (a "
                         f"float in (0, 1)), got {train!r}")
    if not 1 <= n <= C - 1:
        raise ValueError(f"train={train!r} gives {n} of the {C} classes to meta-training: each "
                         f"side needs at least one (1 <= train classes <= {C - 1})")
    generator = torch.Generator().manual_seed(_checks.check_seed(seed))
    order = torch.randperm(C, generator=generator)
    return (sorted(classes[order[:n]].tolist()), sorted(classes[order[n:]].tolist()))


def _check_classes(classes, present: torch.Tensor) -> torch.Tensor:
    """`classes` (None: every id in `present`, sorted) as a sorted int64 tensor of distinct ids
    that all occur in the labels."""
    if classes is None:
        return present
    if isinstance(classes, torch.Tensor):
        classes = classes.tolist() if classes.dim() == 1 else [classes]
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes \
            or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) for c in classes):
        raise ValueError(f"classes must be None or a non-empty list of class ids (ints), got "
                         f"{classes!r}")
    ids = torch.tensor(sorted(int(c) for c in classes), dtype=torch.int64)
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"classes must not repeat a class id, got {sorted(classes)}")
    missing = ids[~torch.isin(ids, present)].tolist()
    if missing:
        raise ValueError(f"classes holds ids that no label has: {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}")
    return ids


class Episodes(TaskFamily):
    """N-way K-shot episodes (the module's docstring says how they are drawn).

    x [N, ...]: the examples (any real dtype, cast at sampling); labels [N]: their integer
    class ids. classes: the ids this family draws from (None: all of them; e.g. one side of
    split_classes). ways: classes per episode; shots: support examples per class; queries:
    query examples per class (None: as many as shots, as in the MAML paper's Omniglot runs).
    rotations: each class also as its 90, 180 and 270 degree turns (x must be [N, ..., H, H]).
    flatten: each example as a vector [D] (for an MLP), else its own shape.

    sample(T) -> TaskBatch: x_support [T, ways * shots, D], y_support [T, ways * shots] int64
    in 0 .. ways-1, x_query [T, ways * queries, D], y_query [T, ways * queries] int64.
    (y holds class indices, not [.., n_out] targets: a classification loss reads them.)
    """

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, *, ways: int = 5, shots: int = 1,
                 queries: Optional[int] = None, classes: Optional[Sequence[int]] = None,
                 rotations: bool = False, flatten: bool = True, name: str = "episodes"):
        labels = _check_labels(labels)
        self._x = self._check_x(x, labels.numel(), rotations)
        if not isinstance(flatten, bool):
            raise TypeError(f"flatten must be True or False, got {flatten!r}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        self.name, self.rotations, self.flatten = name, rotations, flatten
        self.ways = _checks.check_int("ways", ways, 2)
        self.shots = _checks.check_int("shots", shots, 1)
        self.queries = self.shots if queries is None else _checks.check_int("queries", queries, 1)
        self.classes = _check_classes(classes, torch.unique(labels))
        self._members, self._counts = self._group(labels)
        if self.ways > self.n_classes:
            raise ValueError(f"ways={self.ways} is more than the {self.n_classes} classes this "
                             f"family draws from ({self.classes.numel()} ids in classes"
                             f"{', times 4 rotations' if rotations else ''})")
        self.example_shape = tuple(self._x.shape[1:])
        self.n_in = math.prod(self.example_shape) if flatten else None
        self.n_out = self.ways  # one logit per episode label

    @staticmethod
    def _check_x(x, n: int, rotations) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [N, ...] of examples, got "
                            f"{type(x).__name__}")
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"x must hold real numbers, got {x.dtype}")
        if x.dim() < 2 or x.shape[0] != n:
            raise ValueError(f"x must be [N, ...] with N = {n} examples, one per label (labels "
                             f"has {n}), got shape {list(x.shape)}")
        if not isinstance(rotations, bool):
            raise TypeError(f"rotations must be True or False, got {rotations!r}")
        if rotations and (x.dim() < 3 or x.shape[-1] != x.shape[-2]):
            raise ValueError(f"rotations=True turns square images: x must be [N, ..., H, H], "
                             f"got shape {list(x.shape)}")
        return x

    def _group(self, labels: torch.Tensor):
        """(members [C, M], counts [C]): the rows of x of each class of self.classes, in order,
        padded with 0 to the largest class's M; checks every class has shots + queries rows."""
        order = torch.argsort(labels, stable=True)  # rows grouped by id, each group in order
        ids, counts = torch.unique_consecutive(labels[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        at = torch.searchsorted(ids, self.classes)
        counts, starts = counts[at], starts[at]
        need = self.shots + self.queries
        short = counts < need
        if short.any():
            c, n = self.classes[short][0].item(), counts[short][0].item()
            raise ValueError(f"class {c} has {n} examples, fewer than shots + queries = {need} "
                             f"(shots={self.shots}, queries={self.queries}; "
                             f"{int(short.sum())} such classes): lower shots or queries, or "
                             "leave those classes out (classes=)")
        M = int(counts.max())
        slot = torch.arange(M)
        rows = (starts[:, None] + slot).clamp(max=labels.numel() - 1)
        members = torch.where(slot < counts[:, None], order[rows], 0)
        return members, counts

    @property
    def n_classes(self) -> int:
        """The classes an episode's are drawn from, rotated copies included."""
        return self.classes.numel() * (4 if self.rotations else 1)

    def draw(self, T: int, generator: torch.Generator):
        """(classes [T, ways], turns [T, ways], rows [T, ways, shots + queries]), int64 on the
        CPU: episode label j of task t is class classes[t, j] (an id of labels) turned by
        turns[t, j] quarter-turns (0 without rotations), and its examples are x[rows[t, j]],
        the first `shots` its support points. From one torch.rand(T, C + ways * M) call."""
        T = _checks.check_int("T", T, 1)
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"generator must be a CPU torch.Generator, got {generator!r}")
        C, W, M = self.n_classes, self.ways, self._members.shape[1]
        u = torch.rand(T, C + W * M, generator=generator, dtype=torch.float64)
        # the ways smallest of C uniforms: ways distinct classes, in a uniformly random order
        picked = torch.sort(u[:, :C], dim=1, stable=True).indices[:, :W]
        base, turns = picked % self.classes.numel(), picked // self.classes.numel()
        # a class's first shots + queries of M uniforms, its padding slots pushed last (2 > 1):
        # shots + queries of its examples without replacement
        v = u[:, C:].reshape(T, W, M)
        v = torch.where(torch.arange(M) < self._counts[base][..., None], v, 2.0)
        slots = torch.sort(v, dim=2, stable=True).indices[..., :self.shots + self.queries]
        rows = torch.gather(self._members[base], 2, slots)
        return self.classes[base], turns, rows

    @staticmethod
    def _check_out(dtype, device) -> torch.device:
        # checked before anything is drawn, so that a refused call leaves the generator as it was
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        return torch.device("cpu") if device is None else _checks.check_device("device", device)

    def batch(self, turns: torch.Tensor, rows: torch.Tensor, *, dtype=torch.float32,
              device=None) -> TaskBatch:
        """The TaskBatch of draw's turns [..., ways] and rows [..., ways, shots + queries]."""
        device = self._check_out(dtype, device)
        x = self._x[rows.to(self._x.device)]  # [..., ways, S, *example_shape]
        for k in range(1, 4) if self.rotations else ():
            turned = (turns == k).to(x.device)
            if turned.any():
                x[turned] = torch.rot90(x[turned], k, dims=(-2, -1))
        lead, at = tuple(rows.shape[:-2]), rows.dim() - 1  # at: the S dim of x
        shape = (self.n_in,) if self.flatten else self.example_shape
        labels = torch.arange(self.ways, device=device)

        def part(start: int, per_class: int):
            xs = x.narrow(at, start, per_class).reshape(lead + (self.ways * per_class,) + shape)
            y = labels.repeat_interleave(per_class).expand(lead + (-1,)).contiguous()
            return xs.to(device=device, dtype=dtype), y

        return TaskBatch(*part(0, self.shots), *part(self.shots, self.queries))

    def sample(self, T, *, generator, dtype=torch.float32, device=None) -> TaskBatch:
        self._check_out(dtype, device)
        _, turns, rows = self.draw(T, generator)
        return self.batch(turns, rows, dtype=dtype, device=device)

    def sample_many(self, n, T, *, generator, dtype=torch.float32,
                    device=None) -> Optional[TaskBatch]:
        """n meta-batches at once, [n, T, ...]: bitwise n calls of sample(T), the generator left
        in the same state. None (nothing drawn) when a subclass changes sample or draw, whose
        one-call draw this promise is about."""
        if any(getattr(type(self), m) is not getattr(Episodes, m) for m in ("sample", "draw")):
            return None
        n, T = _checks.check_int("n", n, 1), _checks.check_int("T", T, 1)
        self._check_out(dtype, device)
        _, turns, rows = self.draw(n * T, generator)
        return self.batch(turns.reshape(n, T, -1), rows.reshape((n, T) + rows.shape[1:]),
                          dtype=dtype, device=device)

    def __repr__(self):
        return (f"Episodes(name={self.name!r}, ways={self.ways}, shots={self.shots}, "
                f"queries={self.queries}, classes={self.n_classes}, rotations={self.rotations})")
