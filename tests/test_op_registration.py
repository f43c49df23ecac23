"""The ops as torch sees them, on every device (the CPU, and CUDA where there is a GPU):
gradcheck, opcheck, torch.compile, no_grad, the backward's error; then determinism across CPU
threads."""

import pytest
import torch

from pymaml import functional as F
from pymaml.testing import check_compile_matches_eager, compile_step, to_device

from conftest import assert_matches, random_problem, requires_fused

ops = torch.ops.pymaml

# The training loop's ops run on the CPU only (no CUDA kernel; the trainer steps on the GPU
# through maml_loss and torch.optim).
CPU_ONLY_OPS = ("train_chunk",)


def small_tanh(device, seed=0, steps=2):
    pb = random_problem(seed, torch.float64, max_depth=2, max_width=4, max_points=3, max_tasks=2)
    pb.activation, pb.loss, pb.steps, pb.first_order = "tanh", "mse", steps, False
    return to_device(pb, device)


@pytest.mark.parametrize("loss", ["mse", "l1", "cross_entropy"])
def test_gradcheck_maml_loss(device, loss):
    # Second order only: FO-MAML's gradient is by definition not the loss's derivative.
    pb = small_tanh(device)
    pb.loss = loss
    if loss == "cross_entropy":  # class probabilities for targets
        pb.ys, pb.yq = pb.ys.softmax(-1), pb.yq.softmax(-1)
    f = lambda p: F.maml_loss(p, *pb.data, backend="fused", **pb.hyper)
    assert torch.autograd.gradcheck(f, (pb.params.clone().requires_grad_(),))


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_gradcheck_adapt(device, steps):
    pb = small_tanh(device, seed=1, steps=steps)
    f = lambda p: F.adapt(p, pb.xs, pb.ys, backend="fused", **pb.hyper)
    assert torch.autograd.gradcheck(f, (pb.params.clone().requires_grad_(),))


def optimizer_samples(P, dtype, g, device):
    """(optimizer_state, optimizer, optimizer_hyper) of each optimizer kind the training ops
    take, on `device`."""
    rand = lambda: torch.rand(P, generator=g, dtype=torch.float64).to(dtype).to(device)
    step = lambda: torch.tensor(3.0, device=device)  # Adam(fused=True) counts in float32
    return [
        ([], "sgd", [1e-2, 0.0, 0.0, 0.0, 0.0, 0.0]),
        ([rand()], "sgd", [1e-2, 0.9, 0.0, 1e-3, 1.0, 0.0]),
        ([step(), rand(), rand()], "adam",
         [1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 0.0]),
        ([step(), rand(), rand(), rand()], "adam",
         [1e-3, 0.5, 0.99, 1e-8, 1e-2, 1.0, 1.0, 1.0]),
    ]


def _rule(pb, seed, dtype, device):
    """The inner rule's trailing arguments for a sample (ops.cpp): (rates, adapt_layers), each
    given or None by turns: learned rates [steps, P] or [1, P], frozen layers (the head, or
    the last two), both, or neither."""
    P, depth = pb.params.numel(), len(pb.sizes) - 1
    g = torch.Generator().manual_seed(100 + seed)
    rows = pb.steps if seed % 2 else 1
    rates = (pb.inner_lr * (0.5 + torch.rand(rows, P, generator=g, dtype=torch.float64)))
    rates = rates.to(dtype).to(device).requires_grad_()
    layers = [-1] if seed % 2 else list(range(max(0, depth - 2), depth))
    return [(None, None), (rates, None), (None, layers), (rates, layers)]


def sample_inputs(name, device):
    """Argument tuples for op `name` on `device`, over dtypes, both orders and both losses;
    on the CPU also with the inner rule's optional arguments (rates, adapt_layers: the CUDA
    kernels take neither) given and None, and each loss op's value form (keep_grad)."""
    samples = []
    for seed, dtype in ((0, torch.float64), (1, torch.float32), (2, torch.float64)):
        pb = to_device(random_problem(seed, dtype, max_tasks=3), device)
        pb.steps = max(pb.steps, 1)
        hyper = (pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss)
        p = pb.params.clone().requires_grad_()
        g = torch.Generator().manual_seed(seed)
        rules = _rule(pb, seed, dtype, device) if device == "cpu" else [(None, None)]
        if name == "adapt":
            samples.append((p, pb.xs, pb.ys, *hyper, pb.first_order))
            for rates, layers in rules[1:]:
                samples.append((p, pb.xs, pb.ys, *hyper, pb.first_order, rates, layers))
        elif name == "adapt_backward":
            cot = torch.randn(pb.xs.shape[0], p.numel(), generator=g, dtype=torch.float64)
            cot = cot.to(dtype).to(device)
            samples.append((cot, pb.params, pb.xs, pb.ys, *hyper))
            for rates, layers in rules[1:]:
                r = None if rates is None else rates.detach()
                samples.append((cot, pb.params, pb.xs, pb.ys, *hyper, r, layers, pb.first_order,
                                r is not None))
        elif name == "maml_loss":
            samples.append((p, *pb.data, *hyper, pb.first_order, True))
            samples.append((pb.params, *pb.data, *hyper, pb.first_order, False))
            for (rates, layers), keep_grad in zip(rules, (True, False, True, False)):
                samples.append((p, *pb.data, *hyper, pb.first_order, True, keep_grad, rates,
                                layers, rates is not None))
            for r in [rules[1][0].detach()] if device == "cpu" else []:
                # fixed rates (their gradient not asked for), then no gradient at all
                samples.append((p, *pb.data, *hyper, pb.first_order, True, True, r, None, False))
                samples.append((pb.params, *pb.data, *hyper, pb.first_order, False, False, r,
                                None, True))
        elif name == "reptile":
            samples.append((pb.params, *pb.data, *hyper))
        elif name == "train_chunk":
            # the training ops update params and the optimizer state in place (declared mutable)
            chunk = [torch.stack([t, t.flip(0), 0.5 * t]) for t in pb.data]  # 3 meta-batches
            algorithm = "fomaml" if pb.first_order else "maml"
            for state, opt, opt_hyper in optimizer_samples(p.numel(), dtype, g, device):
                samples.append((pb.params.clone(), state, *chunk, *hyper, algorithm, opt,
                                opt_hyper))
            # with the inner rule: fixed rates with frozen layers, learned rates (their
            # optimizer state after params')
            rates, layers = rules[3]
            samples.append((pb.params.clone(), [], *chunk, *hyper, algorithm, "sgd",
                            [1e-2, 0.0, 0.0, 0.0, 0.0, 0.0], rates.detach().clone(), layers,
                            False))
            momentum = [torch.zeros_like(pb.params), torch.zeros_like(rates.detach())]
            samples.append((pb.params.clone(), momentum, *chunk, *hyper, algorithm, "sgd",
                            [1e-2, 0.9, 0.0, 0.0, 0.0, 0.0], rates.detach().clone(), None,
                            True))
        else:
            raise ValueError(name)
    return samples


@pytest.mark.parametrize("name", ["adapt", "adapt_backward", "maml_loss", "reptile",
                                  *CPU_ONLY_OPS])
def test_opcheck(device, name):
    if device != "cpu" and name in CPU_ONLY_OPS:
        pytest.skip(f"pymaml::{name} has no {device} kernel (the training loop's ops are CPU-only)")
    for args in sample_inputs(name, device):
        torch.library.opcheck(getattr(ops, name).default, args)


def test_one_schema_per_op_family():
    # Learned rates, frozen layers and the value form are arguments of one schema per family
    # (csrc/ops.cpp), each with one fake kernel (pymaml/_ops.py) and one autograd formula.
    names = sorted(s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("pymaml::"))
    assert names == sorted(f"pymaml::{n}" for n in (
        "flatten_params", "adapt", "adapt_backward", "maml_loss", "reptile", "daml_loss",
        "daml_adapt", "train_chunk", "daml_train_chunk")), names


# One problem per dtype, so that the four compiles (each several seconds on the CPU) cover two
# configurations: float32 seed 4 (2 layers, ReLU, MSE, second order, S=3) and float64 seed 6
# (1 layer, tanh, L1, first order, S=0). (seed, steps or None for the seed's own)
COMPILE_PROBLEM = {torch.float32: (4, 3), torch.float64: (6, None)}


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, dtype, compiler):
    # Compiled == eager (in check_compile_matches_eager), and both == the CPU reference.
    seed, steps = COMPILE_PROBLEM[dtype]
    pb = random_problem(seed, dtype)
    pb.steps = pb.steps if steps is None else steps
    value, grad = check_compile_matches_eager(to_device(pb, device), compiler)
    assert grad.device.type == torch.device(device).type
    p = pb.params.clone().requires_grad_()
    expected = compile_step(pb, "reference")(p, *pb.data)
    expected.backward()
    what = f"seed {seed}, compiled with {compiler}"
    assert_matches(value, expected.detach(), dtype, f"{what}: value vs reference")
    assert_matches(grad, p.grad, dtype, f"{what}: gradient vs reference")


def test_no_grad_skips_meta_gradient(device):
    pb = random_problem(2, torch.float64)
    on = to_device(pb, device)
    p = on.params.clone().requires_grad_()
    with torch.no_grad():
        loss = F.maml_loss(p, *on.data, backend="fused", **on.hyper)
    assert not loss.requires_grad and loss.device.type == torch.device(device).type
    ref = F.maml_loss(pb.params, *pb.data, backend="reference", **pb.hyper)
    torch.testing.assert_close(loss.cpu(), ref, rtol=1e-12, atol=1e-12)


def test_backward_without_meta_gradient_is_an_error(device):
    pb = to_device(random_problem(2, torch.float64), device)
    p = pb.params.clone().requires_grad_()
    hyper = (pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss, pb.first_order)
    loss = ops.maml_loss(p, *pb.data, *hyper, False)[0]
    with pytest.raises(RuntimeError, match="need_grad"):
        loss.backward()


@requires_fused
def test_result_independent_of_thread_count():
    # The CPU kernels split the tasks into blocks that do not depend on the thread count, each
    # summed into its own partial sum: 1, 2 and 3 threads give the same bits.
    before = torch.get_num_threads()
    try:
        counts = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            counts.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(before)
    if len(set(counts)) < 2:
        # e.g. a torch without a parallel backend: every run would be the one-thread run.
        pytest.skip(f"torch.set_num_threads(1, 2, 3) gave {counts} threads: nothing to compare")
    pb = random_problem(9, torch.float32, max_tasks=1, max_width=32)
    T = 300
    g = torch.Generator().manual_seed(9)
    data = [t.repeat(T, 1, 1) + 0.01 * torch.randn(T, *t.shape[1:], generator=g) for t in pb.data]
    results = []
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


@requires_fused
def test_the_backward_never_aliases_a_gradient_the_caller_holds():
    # The loss ops' backward scales the gradient their forward computed and saved (the saved
    # tensor shares memory with the op's gradient output): a .grad must never be that memory.
    # A kept gradient output, a retained graph, a view on the way and a second backward must
    # all see the right values.
    pb = random_problem(2, torch.float64)
    pb.first_order = False
    args = (*pb.data, pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss, False, True)
    params = pb.params.clone().requires_grad_()
    loss, kept = ops.maml_loss(params, *args)
    expected = kept.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.equal(kept, expected)  # the caller's tensor untouched by the accumulation
    assert torch.equal(params.grad, 2 * expected)
    params.grad = None
    ops.maml_loss(params, *args)[0].backward(torch.tensor(3.0, dtype=torch.float64))
    assert torch.equal(params.grad, 3 * expected)
    params.grad = None
    F.maml_loss(params, *pb.data, **pb.hyper).backward()  # the user's loop
    assert torch.equal(params.grad, expected)
    params.grad.add_(1.0)  # a step of the user's own on .grad changes nothing saved
    assert torch.equal(kept, expected)
    # a view between the leaf and the op (its backward views the incoming gradient), the
    # gradient output kept: .grad must not share the kept tensor's memory
    params.grad = None
    loss, kept = ops.maml_loss(params.view(-1), *args)
    loss.backward()
    params.grad.add_(1.0)
    assert torch.equal(kept, expected)


@requires_fused
def test_the_value_form_hands_its_gradient_over_once():
    # maml_loss with keep_grad (the value form) keeps the gradient its forward computed and
    # hands it over without a copy unless the graph is kept: a retained graph, an incoming
    # gradient other than 1, torch.autograd.grad, a user's in-place step on .grad and a second
    # backward of a freed graph must all see the right values (or torch's error).
    pb = random_problem(2, torch.float64)
    pb.first_order = False
    args = (*pb.data, pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss, False)
    expected = ops.maml_loss(pb.params, *args, True)[1]
    value = lambda params, need_grad: ops.maml_loss(params, *args, need_grad, True)
    params = pb.params.clone().requires_grad_()
    out = value(params, True)
    assert len(out) == 1  # the loss alone: the gradient stays with autograd
    loss = out[0]
    assert torch.equal(loss, ops.maml_loss(pb.params, *args, False)[0])
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.equal(params.grad, 3 * expected)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    params.grad = None
    value(params, True)[0].backward(torch.tensor(-2.0, dtype=torch.float64))
    assert torch.equal(params.grad, -2 * expected)
    params.grad.add_(1.0)
    (grad,) = torch.autograd.grad(value(params, True)[0], params)
    assert torch.equal(grad, expected)
    params.grad = None
    value(params.view(-1), True)[0].backward()
    assert torch.equal(params.grad, expected)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        value(params, False)[0].backward()
    with torch.inference_mode():
        assert torch.equal(value(pb.params, False)[0], loss.detach())
        # below autograd nothing would keep the gradients: none is computed
        assert [t.shape for t in value(pb.params, True)] == [()]


@requires_fused
def test_a_refused_value_backward_leaves_the_graph_whole():
    # A backward refused for one input (its gradient was not computed) must not have handed
    # the others over first: a retry for the other input still gets its gradient. (That a
    # backward which frees the graph drops the gradients it kept is not observable here:
    # benchmarks/NOTES.md gives the memory measurement.)
    pb = random_problem(3, torch.float64)
    sizes, P = pb.sizes, pb.params.numel()
    params = pb.params.clone().requires_grad_()
    rates = torch.full((1, P), 0.05, dtype=torch.float64, requires_grad=True)
    args = (*pb.data, sizes, 0.0, pb.steps, pb.activation, pb.loss, False, True)
    value = lambda p, r, need_rate_grad: ops.maml_loss(p, *args, True, r, None,
                                                       need_rate_grad)[0]
    loss = value(params, rates, False)
    with pytest.raises(RuntimeError, match="gradient for rates"):
        loss.backward()
    (grad,) = torch.autograd.grad(loss, params)
    expected = ops.maml_loss(pb.params, *args, False, rates.detach(), None, False)[1]
    assert torch.equal(grad, expected)
    # the rates' gradient computed but not asked for (rates fixed), then backward(inputs=...)
    value(params, rates.detach(), True).backward()
    assert torch.equal(params.grad, expected)
    params.grad = None
    value(params, rates, True).backward(inputs=[params])
    assert torch.equal(params.grad, expected) and rates.grad is None


@requires_fused
def test_scalar_rate_with_frozen_layers():
    # adapt_layers without rates: the scalar rate's kernels with frozen layers, which match
    # rates [1, P] holding that rate (the route pymaml.functional takes) and the reference.
    for seed in range(12):
        pb = random_problem(40 + seed, torch.float64)
        depth, P = len(pb.sizes) - 1, pb.params.numel()
        layers = [-1] if seed % 2 else [0]
        hyper = (pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss, pb.first_order)
        rows = torch.full((1, P), pb.inner_lr, dtype=torch.float64)
        scalar = ops.maml_loss(pb.params, *pb.data, *hyper, True, False, None, layers)
        ruled = ops.maml_loss(pb.params, *pb.data, *hyper, True, False, rows, layers)
        # the rates' gradient is listed with rates only
        assert len(scalar) == 2 and ruled[2].shape == (0,)
        p = pb.params.clone().requires_grad_()
        ref = F.maml_loss(p, *pb.data, backend="reference", adapt_layers=layers, **pb.hyper)
        (ref_grad,) = torch.autograd.grad(ref, p)
        for got in (scalar, ruled):
            torch.testing.assert_close(got[0], ref.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[1], ref_grad, rtol=1e-9, atol=1e-11)
        adapted = ops.adapt(pb.params, pb.xs, pb.ys, *hyper, None, layers)
        want = F.adapt(pb.params, pb.xs, pb.ys, backend="reference", adapt_layers=layers,
                       **pb.hyper)
        torch.testing.assert_close(adapted, want, rtol=1e-10, atol=1e-12)
        moving = {l % depth for l in layers}
        for l in set(range(depth)) - moving:  # a frozen layer keeps its weights
            for got, start in zip(F.unflatten(adapted, pb.sizes)[l],
                                  F.unflatten(pb.params, pb.sizes)[l]):
                assert torch.equal(got, start.expand_as(got))
