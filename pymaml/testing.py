"""Random MAML problems for checking backends against each other (used by the test suite and
by benchmarks/parity.py)."""

import dataclasses
import random

import torch

from . import functional as F


@dataclasses.dataclass
class Problem:
    sizes: list
    activation: str
    loss: str
    inner_lr: float
    steps: int
    first_order: bool
    params: torch.Tensor
    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor

    @property
    def hyper(self):
        return dict(sizes=self.sizes, inner_lr=self.inner_lr, steps=self.steps,
                    activation=self.activation, loss=self.loss, first_order=self.first_order)

    @property
    def data(self):
        return self.xs, self.ys, self.xq, self.yq


# random_problem's bounds for deeper, wider networks and longer inner loops.
LARGE = dict(max_depth=8, max_width=48, max_steps=12, max_points=10, max_tasks=3)


def random_problem(seed, dtype, *, max_depth=4, max_width=12, max_steps=5, max_points=6,
                   max_tasks=4):
    """A seeded random configuration: architecture, hyper-parameters and task data."""
    rng = random.Random(seed)
    depth = rng.randint(1, max_depth)
    sizes = [rng.randint(1, max_width) for _ in range(depth + 1)]
    sizes[0] = rng.randint(1, 4)
    g = torch.Generator().manual_seed(seed)
    T, K, Q = rng.randint(1, max_tasks), rng.randint(1, max_points), rng.randint(1, max_points)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return Problem(
        sizes=sizes,
        activation=rng.choice(["relu", "tanh"]),
        loss=rng.choice(["mse", "l1"]),
        inner_lr=10 ** rng.uniform(-2.5, -0.7),
        steps=rng.randint(0, max_steps),
        first_order=rng.random() < 0.3,
        params=F.init_params(sizes, generator=g, dtype=torch.float64).to(dtype),
        xs=rand(T, K, sizes[0]), ys=rand(T, K, sizes[-1]),
        xq=rand(T, Q, sizes[0]), yq=rand(T, Q, sizes[-1]),
    )


def backend_outputs(pb: Problem, backend: str) -> dict:
    """Everything the fused op produces, computed by one backend: the mean query loss, the
    meta-gradient, the adapted parameters and a vector-Jacobian product of adapt."""
    cot = torch.randn(pb.xs.shape[0], pb.params.numel(), generator=torch.Generator().manual_seed(7),
                      dtype=torch.float64).to(pb.params.device, pb.params.dtype)
    p = pb.params.clone().requires_grad_()
    loss = F.maml_loss(p, *pb.data, backend=backend, **pb.hyper)
    (meta_grad,) = torch.autograd.grad(loss, p)
    adapted = F.adapt(p, pb.xs, pb.ys, backend=backend, **pb.hyper)
    (vjp,) = torch.autograd.grad(adapted, p, cot)
    return dict(loss=loss.detach(), meta_grad=meta_grad, adapted=adapted.detach(), adapt_vjp=vjp)


def to_device(pb: Problem, device) -> Problem:
    """The same problem with its tensors on `device`."""
    moved = {f: getattr(pb, f).to(device) for f in ("params", "xs", "ys", "xq", "yq")}
    return dataclasses.replace(pb, **moved)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|): the measure the oracle tests bound."""
    actual, expected = actual.cpu(), expected.cpu()
    scale = max(1.0, expected.abs().max().item())
    return (actual - expected).abs().max().item() / scale
