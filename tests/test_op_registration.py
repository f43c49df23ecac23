"""The ops as torch sees them: gradcheck, opcheck, torch.compile, determinism across threads."""

import pytest
import torch

from pymaml import functional as F

from pymaml.testing import check_compile_matches_eager

from conftest import random_problem, requires_fused

pytestmark = requires_fused

ops = torch.ops.pymaml


def small_tanh(seed=0, steps=2):
    pb = random_problem(seed, torch.float64, max_depth=2, max_width=4, max_points=3, max_tasks=2)
    pb.activation, pb.loss, pb.steps, pb.first_order = "tanh", "mse", steps, False
    return pb


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_gradcheck_maml_loss(loss):
    # Second order only: FO-MAML's gradient is by definition not the loss's derivative.
    pb = small_tanh()
    pb.loss = loss
    f = lambda p: F.maml_loss(p, *pb.data, backend="fused", **pb.hyper)
    assert torch.autograd.gradcheck(f, (pb.params.clone().requires_grad_(),))


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_gradcheck_adapt(steps):
    pb = small_tanh(seed=1, steps=steps)
    f = lambda p: F.adapt(p, pb.xs, pb.ys, backend="fused", **pb.hyper)
    assert torch.autograd.gradcheck(f, (pb.params.clone().requires_grad_(),))


def optimizer_samples(P, dtype, g):
    """(optimizer_state, optimizer, optimizer_hyper) of each optimizer kind the training ops take."""
    rand = lambda: torch.rand(P, generator=g, dtype=torch.float64).to(dtype)
    return [
        ([], "sgd", [1e-2, 0.0, 0.0, 0.0, 0.0, 0.0]),
        ([rand()], "sgd", [1e-2, 0.9, 0.0, 1e-3, 1.0, 0.0]),
        ([torch.tensor(3.0), rand(), rand()], "adam", [1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 0.0]),
        ([torch.tensor(3.0), rand(), rand(), rand()], "adam",
         [1e-3, 0.5, 0.99, 1e-8, 1e-2, 1.0, 1.0, 1.0]),
    ]


def op_samples():
    """Argument tuples for each op, over dtypes, both orders and both losses."""
    samples = {"adapt": [], "adapt_backward": [], "maml_loss": [], "train_chunk": []}
    for seed, dtype in ((0, torch.float64), (1, torch.float32), (2, torch.float64)):
        pb = random_problem(seed, dtype, max_tasks=3)
        pb.steps = max(pb.steps, 1)
        hyper = (pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss)
        p = pb.params.clone().requires_grad_()
        samples["adapt"].append((p, pb.xs, pb.ys, *hyper, pb.first_order))
        cot = torch.randn(pb.xs.shape[0], p.numel(), dtype=dtype)
        samples["adapt_backward"].append((cot, pb.params, pb.xs, pb.ys, *hyper))
        samples["maml_loss"].append((p, *pb.data, *hyper, pb.first_order, True))
        samples["maml_loss"].append((pb.params, *pb.data, *hyper, pb.first_order, False))
        # the training ops update params and the optimizer state in place (declared mutable)
        g = torch.Generator().manual_seed(seed)
        chunk = [torch.stack([t, t.flip(0), 0.5 * t]) for t in pb.data]  # 3 meta-batches
        for state, name, opt_hyper in optimizer_samples(p.numel(), dtype, g):
            samples["train_chunk"].append((pb.params.clone(), state, *chunk, *hyper,
                                           pb.first_order, name, opt_hyper))
    return samples


@pytest.mark.parametrize("name", ["adapt", "adapt_backward", "maml_loss", "train_chunk"])
def test_opcheck(name):
    for args in op_samples()[name]:
        torch.library.opcheck(getattr(ops, name).default, args)


def test_compile_fullgraph_forward_and_backward():
    pb = random_problem(4, torch.float32)
    pb.steps = 3
    check_compile_matches_eager(pb, "aot_eager")


def test_compile_inductor():
    torch._dynamo.reset()
    pb = random_problem(6, torch.float64)

    @torch.compile(fullgraph=True)
    def loss_fn(p):
        return F.maml_loss(p, *pb.data, backend="fused", **pb.hyper)

    p = pb.params.clone().requires_grad_()
    loss_fn(p).backward()
    q = pb.params.clone().requires_grad_()
    F.maml_loss(q, *pb.data, backend="reference", **pb.hyper).backward()
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10)


def test_result_independent_of_thread_count():
    pb = random_problem(9, torch.float32, max_tasks=1, max_width=32)
    T = 300
    data = [t.repeat(T, 1, 1) + 0.01 * torch.randn(T, *t.shape[1:]) for t in pb.data]
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            p = pb.params.clone().requires_grad_()
            loss = F.maml_loss(p, *data, backend="fused", **pb.hyper)
            loss.backward()
            results.append((loss.detach(), p.grad))
    finally:
        torch.set_num_threads(before)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_no_grad_skips_meta_gradient():
    pb = random_problem(2, torch.float64)
    p = pb.params.clone().requires_grad_()
    with torch.no_grad():
        loss = F.maml_loss(p, *pb.data, backend="fused", **pb.hyper)
    assert not loss.requires_grad
    ref = F.maml_loss(pb.params, *pb.data, backend="reference", **pb.hyper)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


def test_backward_without_meta_gradient_is_an_error():
    pb = random_problem(2, torch.float64)
    p = pb.params.clone().requires_grad_()
    hyper = (pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss, pb.first_order)
    loss, _ = ops.maml_loss(p, *pb.data, *hyper, False)
    with pytest.raises(RuntimeError, match="need_grad"):
        loss.backward()
