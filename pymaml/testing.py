"""Random MAML problems for checking backends against each other (used by the test suite and
by benchmarks/parity.py)."""

import dataclasses
import random
from typing import Optional

import torch

from . import functional as F
from .func_oracles import (torch_func_daml, torch_func_learned_grads,  # noqa: F401
                           torch_func_learned_maml, torch_func_maml)


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
                   max_tasks=4, loss=None):
    """A seeded random configuration: architecture, hyper-parameters and task data. loss:
    None (MSE or L1 at random, regression targets), or "cross_entropy": the same draws with
    2 to 20 classes (sizes[-1]) and class labels (class_labels, by seed) as targets."""
    rng = random.Random(seed)
    depth = rng.randint(1, max_depth)
    sizes = [rng.randint(1, max_width) for _ in range(depth + 1)]
    sizes[0] = rng.randint(1, 4)
    if loss == "cross_entropy":  # from a generator of its own: the other draws stay as they are
        sizes[-1] = random.Random(f"classes-{seed}").randint(2, 20)
    g = torch.Generator().manual_seed(seed)
    T, K, Q = rng.randint(1, max_tasks), rng.randint(1, max_points), rng.randint(1, max_points)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    pb = Problem(
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
    if loss == "cross_entropy":
        pb.loss, pb.inner_lr = loss, 3 * pb.inner_lr  # its gradients are smaller than MSE's
        pb.ys, pb.yq = class_labels(pb.ys, seed), class_labels(pb.yq, seed)
    return pb


LABEL_KINDS = ("indices", "one-hot", "soft")


def class_labels(scores: torch.Tensor, seed: int) -> torch.Tensor:
    """Cross-entropy targets made from random scores [..., C], of kind LABEL_KINDS[seed % 3]:
    int64 class indices [...] (the argmax), one-hot probabilities, or soft probabilities (a
    softmax of the scores). (Weights that do not sum to 1 the public API refuses; the op's
    math takes them, w = sum y in design.md §2.6.)"""
    kind = LABEL_KINDS[seed % len(LABEL_KINDS)]
    indices = scores.argmax(-1)
    if kind == "indices":
        return indices
    if kind == "one-hot":
        return torch.nn.functional.one_hot(indices, scores.shape[-1]).to(scores.dtype)
    return torch.softmax(2 * scores, dim=-1)


def paper_problems(dtype):
    """The seed's workload (1-32-32-1 ReLU, L1, K=Q=4, S=5, T=1) and the MAML paper's
    (1-40-40-1 ReLU, MSE, K=Q=10, S=5, T=25) on sine data, each in second and first order."""
    g = torch.Generator().manual_seed(0)
    for sizes, loss, K, T in (([1, 32, 32, 1], "l1", 4, 1), ([1, 40, 40, 1], "mse", 10, 25)):
        x = (torch.rand(4, T, K, 1, generator=g, dtype=torch.float64) * 10 - 5).to(dtype)
        data = dict(xs=x[0], ys=torch.sin(x[0]), xq=x[1], yq=torch.sin(x[1]))
        for first_order in (False, True):
            yield Problem(sizes=sizes, activation="relu", loss=loss,
                          inner_lr=0.03 if loss == "l1" else 0.01, steps=5,
                          first_order=first_order,
                          params=F.init_params(sizes, generator=g, dtype=dtype), **data)


def compile_step(pb: Problem, backend: str):
    """The function the torch.compile test compiles: a training step's value through maml_loss
    and adapt of `backend` ("fused" or "reference"), as a function of (params, *pb.data)."""
    def step(p, xs, ys, xq, yq):
        loss = F.maml_loss(p, xs, ys, xq, yq, backend=backend, **pb.hyper)
        adapted = F.adapt(p, xs, ys, backend=backend, **pb.hyper)
        return loss + 0.5 * adapted.square().mean()

    return step


def check_compile_matches_eager(pb: Problem, backend: str):
    """torch.compile(fullgraph=True) of a step through the fused maml_loss and adapt gives
    eager's value and gradient (the ops' fake kernels and autograd under the compiler).
    Returns the compiled (value, gradient), for a comparison with the reference."""
    torch._dynamo.reset()
    step = compile_step(pb, "fused")
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    p1 = pb.params.clone().requires_grad_()
    p2 = pb.params.clone().requires_grad_()
    eager = step(p1, *pb.data)
    eager.backward()
    out = compiled(p2, *pb.data)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(p2.grad, p1.grad)
    return out.detach(), p2.grad


def _cotangent(pb: Problem) -> torch.Tensor:
    """adapt's seeded cotangent [T, P] for a vector-Jacobian product."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(pb.xs.shape[0], pb.params.numel(), generator=g,
                       dtype=torch.float64).to(pb.params.device, pb.params.dtype)


def backend_outputs(pb: Problem, backend: str) -> dict:
    """Everything the fused op produces, computed by one backend: the mean query loss, the
    meta-gradient, the adapted parameters and a vector-Jacobian product of adapt."""
    p = pb.params.clone().requires_grad_()
    loss = F.maml_loss(p, *pb.data, backend=backend, **pb.hyper)
    (meta_grad,) = torch.autograd.grad(loss, p)
    adapted = F.adapt(p, pb.xs, pb.ys, backend=backend, **pb.hyper)
    (vjp,) = torch.autograd.grad(adapted, p, _cotangent(pb))
    return dict(loss=loss.detach(), meta_grad=meta_grad, adapted=adapted.detach(), adapt_vjp=vjp)


# The shapes a tensor inner_lr comes in (design.md §8.1): "number" is a plain float, "per-layer"
# one rate per weight / bias tensor and step ([steps, 2L]) expanded by F.per_layer_rates.
RATE_SHAPES = ("number", "[]", "[P]", "[steps,1]", "[1,P]", "[steps,P]", "per-layer")


@dataclasses.dataclass
class LearnedProblem:
    """A random problem with learned rates and frozen layers: `rates` is the number or the
    tensor the outer optimizer would learn (shape `shape`, per-layer: [steps, 2L])."""
    pb: Problem
    rates: object
    shape: str
    adapt_layers: Optional[list]

    def inner_lr(self, rates, expand=None):
        """`rates` as inner_lr takes it: per-layer ones expanded by `expand` (default:
        pymaml.functional.per_layer_rates)."""
        if self.shape != "per-layer":
            return rates
        return (expand or F.per_layer_rates)(rates, self.pb.sizes)

    def hyper(self, **changes) -> dict:
        """maml_loss's keywords but inner_lr."""
        hyper = dict(self.pb.hyper, adapt_layers=self.adapt_layers)
        del hyper["inner_lr"]
        return dict(hyper, **changes)

    def describe(self) -> str:
        return (f"rates {self.shape}, adapt_layers {self.adapt_layers}, sizes {self.pb.sizes}, "
                f"steps {self.pb.steps}, {self.pb.activation}/{self.pb.loss}, "
                f"{'1st' if self.pb.first_order else '2nd'} order, support "
                f"{list(self.pb.xs.shape)}")


def layer_choices(depth: int) -> list:
    """adapt_layers worth testing on `depth` layers: all, the head (ANIL), the first, a
    non-contiguous pair, every layer listed by negative index."""
    choices = [None, [-1], [0], list(range(-depth, 0))]
    return choices + ([[0, 2]] if depth >= 3 else [])


def _random_rates(rng, g, shape, pb) -> object:
    # Around pb.inner_lr (0.5x to 1.5x), an entry negative one time in six (Meta-SGD learns
    # directions too).
    sign = lambda: -1.0 if rng.random() < 1 / 6 else 1.0
    if shape == "number":
        return sign() * pb.inner_lr
    S, P, L = pb.steps, pb.params.numel(), len(pb.sizes) - 1
    dims = {"[]": (), "[P]": (P,), "[steps,1]": (S, 1), "[1,P]": (1, P), "[steps,P]": (S, P),
            "per-layer": (S, 2 * L)}[shape]
    scale = torch.rand(dims, generator=g, dtype=torch.float64) + 0.5
    signs = torch.where(torch.rand(dims, generator=g, dtype=torch.float64) < 1 / 6, -1.0, 1.0)
    return (pb.inner_lr * scale * signs).to(pb.params.dtype).requires_grad_()


def random_learned_problem(seed, dtype, **bounds) -> LearnedProblem:
    """random_problem(seed) (with its bounds and loss) with rates of shape RATE_SHAPES[seed %
    7], a random choice of adapt_layers (layer_choices, or a random subset in random order,
    some indices negative) and, one time in four, a support batch per inner step."""
    pb = random_problem(seed, dtype, **bounds)
    rng, g = random.Random(f"learned-{seed}"), torch.Generator().manual_seed(seed + 1)
    depth = len(pb.sizes) - 1
    subset = rng.sample(range(depth), rng.randint(1, depth))
    subset = [l - depth if rng.random() < 0.5 else l for l in subset]
    layers = rng.choice(layer_choices(depth) + [subset])
    if rng.random() < 0.25:
        pb.steps = max(pb.steps, 1)
        T, K = pb.xs.shape[:2]
        rand = lambda n: torch.randn(T, pb.steps, K, n, generator=g, dtype=torch.float64)
        pb.xs, pb.ys = rand(pb.sizes[0]).to(dtype), rand(pb.sizes[-1]).to(dtype)
        if pb.loss == "cross_entropy":
            pb.ys = class_labels(pb.ys, seed)
    shape = RATE_SHAPES[seed % len(RATE_SHAPES)]
    return LearnedProblem(pb, _random_rates(rng, g, shape, pb), shape, layers)


def learned_outputs(lp: LearnedProblem, backend: str) -> dict:
    """Through the public API on `backend`: the meta-loss, its gradient in params and in the
    rates, the adapted parameters and adapt's vector-Jacobian product in params and rates
    (rate entries absent for a number rate)."""
    pb, tensor_rates = lp.pb, isinstance(lp.rates, torch.Tensor)
    p = pb.params.detach().clone().requires_grad_()
    r = lp.rates.detach().clone().requires_grad_() if tensor_rates else lp.rates
    leaves = [p, r] if tensor_rates else [p]
    hyper = lp.hyper(backend=backend)
    # materialize_grads: with steps = 0 the rates may not enter the graph at all (gradient 0)
    loss = F.maml_loss(p, *pb.data, inner_lr=lp.inner_lr(r), **hyper)
    grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
    adapted = F.adapt(p, pb.xs, pb.ys, inner_lr=lp.inner_lr(r), **hyper)
    vjps = torch.autograd.grad(adapted, leaves, _cotangent(lp.pb), materialize_grads=True)
    return _named(loss, grads, adapted, vjps)


def _named(loss, grads, adapted, vjps) -> dict:
    out = dict(loss=loss.detach(), grad_params=grads[0], adapted=adapted.detach(),
               vjp_params=vjps[0])
    if len(grads) > 1:
        out.update(grad_rates=grads[1], vjp_rates=vjps[1])
    return out


def per_tensor_expand(rates: torch.Tensor, sizes) -> torch.Tensor:
    """[..., 2L] -> [..., P], each weight / bias entry taking its tensor's rate: the oracle's
    own expansion (repeat_interleave), beside pymaml.functional.per_layer_rates."""
    counts = [n for i, o in zip(sizes[:-1], sizes[1:]) for n in (i * o, o)]
    return torch.repeat_interleave(rates, torch.tensor(counts), dim=-1)


def learned_oracle_outputs(lp: LearnedProblem) -> dict:
    """learned_outputs' quantities by torch_func_learned_maml (torch.func.grad and vjp)."""
    pb = lp.pb
    meta_loss, adapt = torch_func_learned_maml(inner_lr=lp.rates, **lp.hyper())
    expand = lambda r: lp.inner_lr(r, per_tensor_expand)
    if isinstance(lp.rates, torch.Tensor):
        args, argnums = (pb.params, lp.rates.detach()), (0, 1)
        loss_of = lambda p, r: meta_loss(p, *pb.data, expand(r))
        adapt_of = lambda p, r: adapt(p, pb.xs, pb.ys, expand(r))
    else:
        args, argnums = (pb.params,), (0,)
        loss_of = lambda p: meta_loss(p, *pb.data)
        adapt_of = lambda p: adapt(p, pb.xs, pb.ys)
    grads, loss = torch.func.grad_and_value(loss_of, argnums=argnums)(*args)
    adapted, vjp_fn = torch.func.vjp(adapt_of, *args)
    return _named(loss, grads, adapted, vjp_fn(_cotangent(lp.pb)))


def max_relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, tiny): relative to the quantity's own
    scale (zero exactly where expected is all zero), the learned-rate tests' measure."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0,
                torch.finfo(expected.dtype).tiny)
    return (actual - expected).abs().max().item() / scale if expected.numel() else 0.0


def to_device(pb: Problem, device) -> Problem:
    """The same problem with its tensors on `device`."""
    moved = {f: getattr(pb, f).to(device) for f in ("params", "xs", "ys", "xq", "yq")}
    return dataclasses.replace(pb, **moved)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|): the measure the oracle tests bound."""
    actual, expected = actual.cpu(), expected.cpu()
    scale = max(1.0, expected.abs().max().item())
    return (actual - expected).abs().max().item() / scale
