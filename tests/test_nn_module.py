"""pymaml.MAML: the one-line wrapper of an nn.Sequential. Its meta-loss and the gradients it
leaves in the model's own parameters are the functional API's on the same flat parameters
(bitwise: the same op), for every activation, loss and order; the reference backend agrees
to the oracle tolerances; torch.optim steps the model's parameters; adapt returns modules
that predict as the adapted flat parameters do; anything but Linear / ReLU / Tanh is refused
with the offending layer named."""

import pytest
import torch
from torch import nn

import pymaml
from pymaml import functional as F
from pymaml.nn import from_sequential

from conftest import assert_matches, random_problem, requires_fused

DTYPES = [torch.float64, torch.float32]


def sequential_of(pb):
    """The nn.Sequential holding problem pb's network and weights."""
    return pymaml.nn.to_sequential(pb.params, pb.sizes, pb.activation)


def wrapper_of(pb, model, backend="auto"):
    return pymaml.MAML(model, inner_lr=pb.inner_lr, steps=pb.steps, loss=pb.loss,
                       first_order=pb.first_order, backend=backend)


def grads_in_layout(model):
    """The gradients in the model's parameters, in pymaml's flat layout."""
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@requires_fused
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_and_gradients_are_the_functional_apis(dtype):
    for seed in range(40):
        pb = random_problem(seed, dtype)
        model = sequential_of(pb)
        value = wrapper_of(pb, model)(*pb.data)
        value.backward()
        params = pb.params.clone().requires_grad_()
        expected = F.maml_loss(params, *pb.data, **pb.hyper)
        expected.backward()
        assert torch.equal(value, expected), f"seed {seed}"
        assert torch.equal(grads_in_layout(model), params.grad), f"seed {seed}"


@requires_fused
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_reference_backend_agrees(dtype):
    for seed in range(10):
        pb = random_problem(seed, dtype)
        fused_model, ref_model = sequential_of(pb), sequential_of(pb)
        for model, backend in ((fused_model, "auto"), (ref_model, "reference")):
            wrapper_of(pb, model, backend)(*pb.data).backward()
        assert_matches(grads_in_layout(fused_model), grads_in_layout(ref_model), dtype,
                       f"seed {seed}")


def test_the_wrapper_holds_the_models_parameters_and_torch_optim_steps_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    maml = pymaml.MAML(model, inner_lr=0.05, steps=3)
    assert list(maml.parameters()) == list(model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    x = torch.rand(2, 4, 10, 1) * 6 - 3  # support and query of 4 tasks
    phase = torch.rand(4, 1, 1) * 3
    y = torch.sin(x + phase)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = maml(x[0], y[0], x[1], y[1])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    params, _, _ = from_sequential(model)
    assert torch.equal(maml.flat_params().detach(), params)  # the wrapper reads the live weights


@pytest.mark.parametrize("batched", [False, True], ids=["one-task", "T-tasks"])
def test_adapt_returns_modules_of_the_adapted_weights(batched):
    pb = random_problem(3, torch.float64)
    model = sequential_of(pb)
    maml = wrapper_of(pb, model)
    x, y = (pb.xs, pb.ys) if batched else (pb.xs[0], pb.ys[0])
    adapted = maml.adapt(x, y, steps=4)
    expected = F.adapt(pb.params, pb.xs if batched else pb.xs[:1], pb.ys if batched else pb.ys[:1],
                       **dict(pb.hyper, steps=4))
    models = adapted if batched else [adapted]
    assert len(models) == expected.shape[0]
    for m, p in zip(models, expected):
        assert isinstance(m, nn.Sequential)
        assert torch.equal(from_sequential(m)[0], p)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("model,match", [
    (nn.Linear(1, 1), "model must be an nn.Sequential, got Linear"),
    (nn.Sequential(nn.Linear(1, 4), nn.GELU(), nn.Linear(4, 1)), r"model\[1\] must be nn.ReLU or nn.Tanh"),
    (nn.Sequential(nn.Conv1d(1, 1, 1)), r"model\[0\] must be an nn.Linear"),
    (nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(5, 1)), r"model\[2\] takes 5 inputs"),
    (nn.Sequential(nn.Linear(1, 4), nn.ReLU()), "end with a Linear"),
    (nn.Sequential(nn.Linear(1, 4, bias=False)), r"model\[0\] must be an nn.Linear with bias"),
])
def test_other_modules_are_refused_naming_the_layer(model, match):
    with pytest.raises((TypeError, ValueError), match=match):
        pymaml.MAML(model, inner_lr=0.1, steps=1)


def test_bad_settings_are_refused_by_name():
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="steps must be >= 0"):
        pymaml.MAML(model, inner_lr=0.1, steps=-1)
    with pytest.raises(ValueError, match="loss must be one of"):
        pymaml.MAML(model, inner_lr=0.1, steps=1, loss="huber")
    with pytest.raises(ValueError, match="backend must be one of"):
        pymaml.MAML(model, inner_lr=0.1, steps=1, backend="jax")


# ---- torch.ops.pymaml.flatten_params: what pymaml.MAML feeds the fused ops ---------------------

@requires_fused
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flatten_params_is_the_layouts_flatten_and_its_gradient_splits_back(dtype):
    from pymaml._layout import flatten
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
             for shape in ([3, 2], [3], [1, 3], [1])]
    parts[1].requires_grad_(False)  # a frozen tensor gets no gradient
    flat = torch.ops.pymaml.flatten_params(parts)
    assert torch.equal(flat, flatten(parts))
    w = torch.randn(flat.shape, generator=g, dtype=dtype)
    (flat * w).sum().backward()
    expected = [w[:6].view(3, 2), None, w[9:12].view(1, 3), w[12:].view(1)]
    for p, e in zip(parts, expected):
        assert (p.grad is None) if e is None else torch.equal(p.grad, e)
    (flatten(parts) * w).sum().backward()  # a second backward accumulates, as torch.cat's does
    assert torch.equal(parts[0].grad, 2 * w[:6].view(3, 2))
    # an expanded incoming gradient (sum's backward) still splits
    for p in parts:
        p.grad = None
    torch.ops.pymaml.flatten_params(parts).sum().backward()
    assert torch.equal(parts[3].grad, torch.ones(1, dtype=dtype))
    torch.autograd.gradcheck(lambda *ts: torch.ops.pymaml.flatten_params(list(ts)),
                             [p.detach().double().requires_grad_() for p in parts])


@requires_fused
def test_flatten_params_refuses_what_it_cannot_flatten_by_name():
    op = torch.ops.pymaml.flatten_params
    with pytest.raises(ValueError, match="at least one tensor"):
        op([])
    with pytest.raises(TypeError, match=r"parts\[1\] has dtype Float but parts\[0\] has Double"):
        op([torch.zeros(2, dtype=torch.float64), torch.zeros(2)])


@requires_fused
def test_flatten_params_opcheck_and_compile():
    parts = [torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    torch.library.opcheck(torch.ops.pymaml.flatten_params.default, (parts,))
    compiled = torch.compile(lambda ps: torch.ops.pymaml.flatten_params(ps) * 2, fullgraph=True)
    assert torch.equal(compiled(parts), torch.cat([parts[0].reshape(-1), parts[1]]) * 2)


@requires_fused
def test_the_wrapper_compiles_and_its_gradients_are_the_eager_ones():
    pb = random_problem(3, torch.float32)
    model = sequential_of(pb)
    maml = wrapper_of(pb, model)
    data = (pb.xs, pb.ys, pb.xq, pb.yq)
    maml(*data).backward()
    eager = grads_in_layout(model)
    model.zero_grad()
    torch.compile(maml, fullgraph=True)(*data).backward()
    torch.testing.assert_close(grads_in_layout(model), eager)


@requires_fused
def test_the_wrappers_gradients_accumulate_over_a_retained_graph():
    # flatten_params splits the incoming gradient into views that become .grad, later added
    # to in place: a retained graph's second and third backward must still add the same
    # gradient (the saved meta-gradient untouched), not a growing one.
    pb = random_problem(4, torch.float64)
    pb.first_order = False
    model = sequential_of(pb)
    maml = wrapper_of(pb, model)
    maml(*pb.data).backward()
    once = grads_in_layout(model)
    model.zero_grad()
    loss = maml(*pb.data)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(grads_in_layout(model), 3 * once, rtol=1e-12, atol=1e-12)


# ---- the wrapper computes the module as it is at each call, or refuses in one line -------------

def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 1, generator=g, dtype=torch.float64) for _ in range(4)]


def _meta(model, **kw):
    return pymaml.MAML(model, inner_lr=0.1, steps=2, **kw)


class _OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _OwnSequential(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + 1


def test_a_linear_subclass_or_a_sequential_with_its_own_forward_is_refused():
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), _OwnForward(4, 1))
    with pytest.raises(ValueError, match=r"model\[2\] is a _OwnForward, not a plain nn.Linear"):
        _meta(model)
    with pytest.raises(ValueError, match=r"_OwnSequential\) has a forward of its own"):
        _meta(_OwnSequential(nn.Linear(1, 1)))
    model = _mlp()
    model[0].forward = lambda x: x  # an instance's own forward, too
    with pytest.raises(ValueError, match=r"model\[0\] \(Linear\) has a forward of its own"):
        _meta(model)


@pytest.mark.parametrize("where", ["model", "layer", "activation"])
@pytest.mark.parametrize("kind", ["register_forward_hook", "register_forward_pre_hook",
                                  "register_full_backward_hook"])
def test_hooks_are_refused_at_construction_and_when_added_later(where, kind):
    model = _mlp()
    target = {"model": model, "layer": model[2], "activation": model[1]}[where]
    hook = (lambda *a: None)
    handle = getattr(target, kind)(hook)
    name = {"model": "model", "layer": r"model\[2\]", "activation": r"model\[1\]"}[where]
    with pytest.raises(ValueError, match=rf"{name} \(\w+\) has a .*hook"):
        _meta(model)
    handle.remove()
    maml = _meta(model)
    maml(*_data())
    handle = getattr(target, kind)(hook)  # after wrapping: the next call sees it
    with pytest.raises(ValueError, match=rf"{name} \(\w+\) has a .*hook"):
        maml(*_data())
    handle.remove()
    maml(*_data())


def test_a_global_module_hook_is_refused():
    maml = _meta(_mlp())
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        with pytest.raises(ValueError, match="a global module hook is registered"):
            maml(*_data())
    finally:
        handle.remove()
    maml(*_data())


def test_tied_layers_and_shared_parameters_are_refused():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"model\[2\] is the same module as an earlier layer"):
        _meta(nn.Sequential(lin, nn.ReLU(), lin))
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match="shares a weight or bias between layers"):
        _meta(model)


def test_a_layer_replaced_after_wrapping_is_the_one_computed_and_gets_the_gradient():
    model, data = _mlp(), _data()
    maml = _meta(model)
    maml(*data)
    model[2] = nn.Linear(8, 8).double()
    loss = maml(*data)
    loss.backward()
    assert model[2].weight.grad is not None and model[2].bias.grad is not None
    fresh = _meta(model)
    assert torch.equal(loss, fresh(*data))
    model[0].weight = nn.Parameter(model[0].weight.detach() * 3)  # a parameter replaced
    assert torch.equal(maml(*data), _meta(model)(*data))
    model[2] = nn.Linear(8, 5).double()  # and one that no longer fits is named
    with pytest.raises(ValueError, match=r"model\[4\] takes 8 inputs but the previous Linear gives 5"):
        maml(*data)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_frozen_layers_keep_their_weights_in_the_inner_loop_and_get_no_gradient(backend):
    model, data = _mlp(), _data()
    expected_model = _mlp()
    expected = _meta(expected_model, adapt_layers=[1, 2], backend=backend)(*data)
    maml = _meta(model, backend=backend)
    model[0].requires_grad_(False)  # frozen after wrapping: the next call reads it
    loss = maml(*data)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert model[2].weight.grad is not None
    # with adapt_layers too: the frozen layers drop out of it
    expected = _meta(_mlp(), adapt_layers=[2], backend=backend)(*data)
    torch.testing.assert_close(_meta(model, adapt_layers=[0, 2], backend=backend)(*data), expected,
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="every layer pymaml.MAML would adapt has requires_grad=False"):
        _meta(model, adapt_layers=[0])
    model[0].requires_grad_(True)
    torch.testing.assert_close(maml(*data), _meta(_mlp(), backend=backend)(*data), rtol=1e-12, atol=1e-12)


def test_a_layer_frozen_in_part_is_refused():
    model = _mlp()
    model[2].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="linear layer 1's bias has requires_grad=False but its "
                                         "weight does not: pymaml.MAML freezes whole layers only"):
        _meta(model)


def test_an_activation_with_a_forward_of_its_own_or_a_class_swapped_after_wrapping_is_read():
    """Found by the s30-25p review: an activation's own forward was computed as ReLU, and a
    layer whose class changed after wrapping (ReLU -> Tanh) kept the old activation."""
    model, data = _mlp(), _data()
    maml = _meta(model)
    maml(*data)
    for i in (1, 3):  # classes swapped in place: the next call reads them
        model[i].__class__, model[i].inplace = nn.ReLU, False
    torch.testing.assert_close(maml(*data), _meta(model)(*data), rtol=0, atol=0)
    assert maml.activation == "relu"
    model[3].forward = lambda x: x * 2
    with pytest.raises(ValueError, match=r"model\[3\] \(ReLU\) has a forward of its own"):
        maml(*data)
    model._modules["3"] = None  # a position emptied: named, not an AttributeError
    with pytest.raises(ValueError, match=r"model\[3\] must be nn.ReLU or nn.Tanh .*got None"):
        maml(*data)


@pytest.mark.parametrize("change", ["dtype", "device"])
def test_layers_of_different_dtypes_or_devices_are_refused_naming_the_layer(change):
    """Found by the s30-25p review: a last layer on the meta device was flattened with the
    others into a loss of garbage weights; one in float32 among float64 ones was refused by
    the op's name; and either, changed by .to() after wrapping, was not seen."""
    other = dict(dtype=torch.float32) if change == "dtype" else dict(device="meta")
    want = r"model\[4\]'s weight is torch.float\d+ on \w+ but model\[0\]'s weight is"
    model = _mlp()
    model[4].to(**other)
    with pytest.raises(ValueError, match=want):
        _meta(model)
    model, data = _mlp(), _data()
    maml = _meta(model)
    maml(*data)
    model[4].to(**other)  # in place: the same Parameter objects
    with pytest.raises(ValueError, match=want):
        maml(*data)


@pytest.mark.parametrize("transform", ["jacfwd", "detached", "vmap"])
def test_tensors_put_in_by_functional_call_are_the_weights_not_frozen_layers(transform):
    """Found by the s30-25p review: torch.func.functional_call's tensors (under jacfwd, or
    detached ones) have requires_grad=False, and the wrapper took them for frozen layers:
    "every layer ... has requires_grad=False" under jacfwd, or layers silently not adapted."""
    model, data = _mlp(), _data()
    maml = _meta(model)
    ps = dict(maml.named_parameters())
    call = lambda p: torch.func.functional_call(maml, p, tuple(data))  # noqa: E731
    if transform == "jacfwd":
        got = torch.func.jacfwd(call)(ps)
        want = torch.func.grad(call)(ps)
        for k in ps:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12)
    elif transform == "detached":
        half = {k: v.detach() if k.startswith("module.0") else v for k, v in ps.items()}
        torch.testing.assert_close(call(half), maml(*data), rtol=0, atol=0)
    else:
        stacked = {k: torch.stack([v.detach()] * 2) for k, v in ps.items()}
        torch.testing.assert_close(torch.func.vmap(call)(stacked), maml(*data).detach().expand(2))
