"""DAML with a loss network of any output width (issue 23, item 4): the adaptation loss is the
mean of |h| or h^2 over all the loss network's outputs and all the points (docs/design.md §8.3).
The fused CPU op against the autograd reference and the torch.func oracle
(pymaml.testing.torch_func_daml) for widths 2 to 5, both dtypes, both adaptation losses, with
and without learned rates, shared and per-step source batches; gradcheck and opcheck; training
(the chunked op against the reference backend and the per-iteration path); DAMLModel; the
argument checks. Width 1 is test_daml.py's."""

import dataclasses

import pytest
import torch

import pymaml
from pymaml import daml
from pymaml import functional as F
from pymaml._layout import unflatten
from pymaml.daml_model import DAMLModel
from pymaml.testing import max_relative, relative_error, torch_func_daml

from test_daml import TOL, backend_outputs, random_problem, requires_fused_daml

WIDTHS = [2, 3, 4, 5]


def wide_problem(seed, dtype, width, adapt_loss, per_step):
    """test_daml.random_problem with `width` loss network outputs, the adaptation loss and the
    source layout ([T, K, n_in] or [T, steps, K, n_in]) forced."""
    pb = random_problem(seed, torch.float64, loss_out=width)
    T, K, n_in = pb.xs.shape[0], pb.xs.shape[-2], pb.xs.shape[-1]
    g = torch.Generator().manual_seed(10_000 + seed)
    shape = (T, pb.steps, K, n_in) if per_step else (T, K, n_in)
    xs = torch.randn(shape, generator=g, dtype=torch.float64)
    return dataclasses.replace(pb, adapt_loss=adapt_loss, xs=xs).to(dtype)


def oracle_outputs(pb, rates=None):
    """The torch.func oracle's loss, gradients (and the rates' gradient) and adapted params."""
    meta_loss, adapt = torch_func_daml(**pb.loss_hyper)
    args = (pb.params, pb.loss_params, *pb.data) + ((rates,) if rates is not None else ())
    argnums = (0, 1, 5) if rates is not None else (0, 1)
    grads, value = torch.func.grad_and_value(meta_loss, argnums=argnums)(*args)
    out = dict(loss=value, grad_params=grads[0], grad_loss_params=grads[1],
               adapted=adapt(pb.params, pb.loss_params, pb.xs, rates))
    if rates is not None:
        out["grad_rates"] = grads[2]
    return out


def rate_outputs(pb, rates, backend):
    """daml_loss with learned rates through the public API: the loss and the three gradients,
    and the adapted parameters (daml_adapt, no grad)."""
    leaves = [t.clone().requires_grad_() for t in (pb.params, pb.loss_params, rates)]
    value = pymaml.daml_loss(leaves[0], leaves[1], *pb.data, backend=backend,
                             **dict(pb.loss_hyper, inner_lr=leaves[2]))
    g = torch.autograd.grad(value, leaves)
    with torch.no_grad():
        adapted = pymaml.daml_adapt(pb.params, pb.loss_params, pb.xs,
                                    **dict(pb.hyper, inner_lr=rates))
    return dict(loss=value.detach(), grad_params=g[0], grad_loss_params=g[1], grad_rates=g[2],
                adapted=adapted)


def random_rates(pb, seed):
    """Rates of one of the shapes inner_lr takes ([], [P], [steps, 1], [steps, P])."""
    P = pb.params.numel()
    shape = [(), (P,), (pb.steps, 1), (pb.steps, P)][seed % 4]
    g = torch.Generator().manual_seed(20_000 + seed)
    return (pb.inner_lr * (1 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64))
            ).to(pb.params.dtype)


def assert_close_all(got, want, dtype, what, measure=relative_error):
    for key in want:
        err = measure(got[key], want[key])
        assert err <= TOL[dtype], f"{what}: {key}: {err:.3g} > {TOL[dtype]:g}"


# ---- the reference and the oracle (no build needed) ---------------------------------------

@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("adapt_loss", ["l1", "mse"])
def test_reference_matches_torch_func(width, adapt_loss):
    for seed in range(4):
        pb = wide_problem(100 * width + seed, torch.float64, width, adapt_loss, seed % 2 == 1)
        assert_close_all(backend_outputs(pb, "reference"), oracle_outputs(pb), torch.float64,
                         f"width {width}, seed {seed}, {pb.loss_hyper}")


def test_reference_with_learned_rates_matches_torch_func():
    for seed in range(8):
        width = WIDTHS[seed % 4]
        pb = wide_problem(500 + seed, torch.float64, width, ("l1", "mse")[seed // 4],
                          seed % 2 == 0)
        rates = random_rates(pb, seed)
        assert_close_all(rate_outputs(pb, rates, "reference"), oracle_outputs(pb, rates),
                         torch.float64, f"width {width}, seed {seed}", max_relative)


def test_the_adaptation_loss_is_the_mean_over_all_outputs():
    # A loss network whose m output rows are copies of a width-1 network's row gives the same
    # adaptation loss (a mean, not a sum), so the same DAML loss and adapted parameters.
    pb1 = random_problem(42, torch.float64)
    m = 3
    psi1 = [t for layer in unflatten(pb1.loss_params, pb1.loss_sizes) for t in layer]
    W, b = psi1[-2], psi1[-1]
    psi_m = torch.cat([t.reshape(-1) for t in psi1[:-2]] + [W.repeat(m, 1).reshape(-1),
                                                            b.repeat(m)])
    pbm = dataclasses.replace(pb1, loss_sizes=pb1.loss_sizes[:-1] + [m], loss_params=psi_m)
    backends = ["reference"] + (["fused"] if daml.fused_available() else [])
    for adapt_loss in ("l1", "mse"):
        for backend in backends:
            one = backend_outputs(dataclasses.replace(pb1, adapt_loss=adapt_loss), backend)
            many = backend_outputs(dataclasses.replace(pbm, adapt_loss=adapt_loss), backend)
            for key in ("loss", "grad_params", "adapted"):
                assert relative_error(many[key], one[key]) <= 1e-12, (backend, adapt_loss, key)
            # psi's gradient: the copies share the width-1 row's gradient (m rows, each 1/m)
            g1 = unflatten(one["grad_loss_params"], pb1.loss_sizes)[-1]
            gm = unflatten(many["grad_loss_params"], pbm.loss_sizes)[-1]
            assert relative_error(gm[0].sum(0, keepdim=True), g1[0]) <= 1e-12
            assert relative_error(gm[1].sum().reshape(1), g1[1]) <= 1e-12


# ---- the fused op -------------------------------------------------------------------------------

@requires_fused_daml
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("adapt_loss", ["l1", "mse"])
def test_fused_matches_reference_and_torch_func(dtype, width, adapt_loss):
    for seed in range(6):
        pb = wide_problem(1000 * width + seed, dtype, width, adapt_loss, seed % 2 == 1)
        fused = backend_outputs(pb, "fused")
        what = f"{dtype}, width {width}, seed {seed}, {pb.loss_hyper}"
        assert_close_all(fused, backend_outputs(pb, "reference"), dtype, what + " vs reference")
        assert_close_all(fused, oracle_outputs(pb), dtype, what + " vs torch.func")


@requires_fused_daml
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("adapt_loss", ["l1", "mse"])
def test_fused_learned_rates_match_reference_and_torch_func(dtype, adapt_loss):
    for seed in range(16):
        width = WIDTHS[seed % 4]
        pb = wide_problem(3000 + seed, dtype, width, adapt_loss, (seed // 4) % 2 == 0)
        rates = random_rates(pb, seed // 4 + seed)
        fused = rate_outputs(pb, rates, "fused")
        what = f"{dtype}, width {width}, seed {seed}, rates {list(rates.shape)}"
        assert_close_all(fused, rate_outputs(pb, rates, "reference"), dtype,
                         what + " vs reference", max_relative)
        assert_close_all(fused, oracle_outputs(pb, rates), dtype, what + " vs torch.func",
                         max_relative)


@requires_fused_daml
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_gradcheck_wide_loss_network(seed):
    pb = wide_problem(4000 + seed, torch.float64, 3, ("l1", "mse")[seed], seed == 1)
    pb = dataclasses.replace(pb, xs=pb.xs[:2], xq=pb.xq[:2], yq=pb.yq[:2])

    def f(theta, psi):
        return pymaml.daml_loss(theta, psi, *pb.data, backend="fused", **pb.loss_hyper)

    inputs = (pb.params.clone().requires_grad_(), pb.loss_params.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    rates = random_rates(pb, 3)

    def g(theta, psi, r):
        return pymaml.daml_loss(theta, psi, *pb.data, backend="fused",
                                **dict(pb.loss_hyper, inner_lr=r))

    inputs = inputs + (rates.clone().requires_grad_(),)
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@requires_fused_daml
def test_opcheck_wide_loss_network():
    for seed, dtype in ((0, torch.float64), (1, torch.float32)):
        pb = wide_problem(4100 + seed, dtype, 4, "mse", seed == 0)
        hyper = (pb.sizes, pb.loss_sizes, pb.inner_lr, pb.steps, pb.activation)
        p, q = pb.params.clone().requires_grad_(), pb.loss_params.clone().requires_grad_()
        for keep_grad in (False, True):  # the gradients as outputs, or kept for autograd
            torch.library.opcheck(torch.ops.pymaml.daml_loss.default,
                                  (p, q, *pb.data, *hyper, pb.loss, pb.adapt_loss, True,
                                   keep_grad))
        torch.library.opcheck(torch.ops.pymaml.daml_adapt.default,
                              (pb.params, pb.loss_params, pb.xs, *hyper, pb.adapt_loss))


@requires_fused_daml
def test_the_op_refuses_bad_output_widths_naming_loss_sizes():
    pb = wide_problem(4200, torch.float64, 2, "l1", False)
    for bad in (0, pymaml._ops._C.max_width + 1):
        loss_sizes = pb.loss_sizes[:-1] + [bad]
        q = torch.zeros(max(1, F.num_params(loss_sizes)), dtype=torch.float64)
        with pytest.raises(ValueError, match="loss_sizes"):
            torch.ops.pymaml.daml_loss(pb.params, q, *pb.data, pb.sizes, loss_sizes,
                                       pb.inner_lr, pb.steps, pb.activation, pb.loss,
                                       pb.adapt_loss, True)
    # over the fused op's widths, the public API's "auto" runs the reference, "fused" says why
    loss_sizes = pb.loss_sizes[:-1] + [pymaml._ops._C.max_width + 1]
    q = F.init_params(loss_sizes, dtype=torch.float64)
    args = dict(pb.loss_hyper, loss_sizes=loss_sizes)
    value = pymaml.daml_loss(pb.params, q, *pb.data, **args)
    ref = pymaml.daml_loss(pb.params, q, *pb.data, backend="reference", **args)
    assert torch.equal(value, ref)
    with pytest.raises(RuntimeError, match="widths up to"):
        pymaml.daml_loss(pb.params, q, *pb.data, backend="fused", **args)


# ---- training and the model ---------------------------------------------------------------------

QUIET = dict(progress=False, log_every=0)


def _train(**kw):
    return pymaml.train("daml-sine", algorithm="daml", loss_sizes=[65, 16, 3], **QUIET, **kw)


@requires_fused_daml
def test_train_wide_loss_network_chunked_matches_reference():
    fused = _train(iterations=20, dtype=torch.float64)
    ref = _train(iterations=20, dtype=torch.float64, backend="reference")
    assert fused.config["backend"] == "fused" and fused.fast_iterations == 20
    assert ref.config["backend"] == "reference" and ref.fast_iterations == 0
    assert fused.model.loss_sizes == [65, 16, 3]
    torch.testing.assert_close(ref.losses, fused.losses, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ref.model.weights, fused.model.weights, rtol=1e-9, atol=1e-12)


@requires_fused_daml
def test_train_wide_loss_network_chunk_and_per_iteration_agree_bitwise():
    class PerIterationSGD(torch.optim.SGD):  # not a class the chunked op takes over
        pass

    fast = _train(iterations=60, adapt_loss="mse")
    slow = _train(iterations=60, adapt_loss="mse", optimizer=PerIterationSGD,
                  optimizer_kwargs=dict(fused=True))
    assert fast.fast_iterations == 60 and slow.fast_iterations == 0
    assert torch.equal(fast.losses, slow.losses)
    assert torch.equal(fast.model.weights, slow.model.weights)


def test_daml_model_with_a_wide_loss_network(tmp_path):
    m = DAMLModel([1, 8, 1], [9, 6, 4], adapt_loss="mse", inner_steps=3,
                  generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert m.loss_sizes == [9, 6, 4] and m.loss_params.numel() == F.num_params([9, 6, 4])
    xs = torch.randn(5, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = daml.reference_adapt(m.params.detach(), m.loss_params.detach(), xs[None],
                                sizes=m.sizes, loss_sizes=m.loss_sizes, inner_lr=m.inner_lr,
                                steps=3, activation=m.activation, adapt_loss="mse")[0]
    adapted = m.adapt(xs)
    assert relative_error(adapted.params.detach(), want) <= TOL[torch.float64]
    path = str(tmp_path / "wide.pt")
    m.save(path)
    back = DAMLModel.load(path)
    assert back.loss_sizes == [9, 6, 4] and torch.equal(back.weights, m.weights)


@requires_fused_daml
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_the_reference_serves_a_wide_loss_network():
    # DAML has no CUDA kernels: "auto" runs the reference there, at any output width.
    pb = wide_problem(4300, torch.float64, 3, "mse", True)
    cuda = dataclasses.replace(pb, **{f: getattr(pb, f).cuda() for f in
                                      ("params", "loss_params", "xs", "xq", "yq")})
    got = backend_outputs(cuda, "auto")
    assert_close_all({k: v.cpu() for k, v in got.items()}, backend_outputs(pb, "fused"),
                     torch.float64, "cuda (reference) vs cpu (fused)")
