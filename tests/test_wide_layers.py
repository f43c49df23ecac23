"""Issue 26's paths of the CPU kernel: products over many points (sums cut into chunks of
128 terms) and layers wide enough for the weight gradients' transposed copies to be
transpositions (K >= 48, in * out >= 4096): fused vs the reference in float64 and float32,
cross-entropy too, and the same bits on one and two threads."""

import pytest
import torch

from pymaml import functional as F

# (sizes, K, Q, S, T, loss): widths not multiples of the vector width (the transposition's
# edges), K over 128 + 64 (chunked sums) and under 48 (two products), one and several tasks.
CASES = [((3, 67, 45, 2), 300, 70, 2, 2, "mse"),
         ((5, 80, 64, 7), 60, 200, 1, 3, "cross_entropy"),
         ((2, 96, 96, 1), 40, 50, 2, 1, "l1"),
         ((1, 130, 70, 33, 1), 49, 49, 3, 2, "mse")]


def _problem(case, dtype, seed=0):
    sizes, K, Q, S, T, loss = case
    g = torch.Generator().manual_seed(seed)
    params = F.init_params(list(sizes), generator=g, dtype=torch.float64).to(dtype)
    xs, xq = (torch.randn(T, n, sizes[0], generator=g, dtype=torch.float64).to(dtype)
              for n in (K, Q))
    if loss == "cross_entropy":
        ys, yq = (torch.randint(0, sizes[-1], (T, n), generator=g) for n in (K, Q))
    else:
        ys, yq = (torch.randn(T, n, sizes[-1], generator=g, dtype=torch.float64).to(dtype)
                  for n in (K, Q))
    hyper = dict(sizes=list(sizes), inner_lr=0.05, steps=S, activation="relu", loss=loss,
                 first_order=False)
    return params, (xs, ys, xq, yq), hyper


def _meta_grad(params, batch, hyper, backend):
    p = params.clone().requires_grad_()
    loss = F.maml_loss(p, *batch, backend=backend, **hyper)
    return loss.detach(), torch.autograd.grad(loss, p)[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[0])) + f"-K{c[1]}")
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_matches_reference(case, dtype, tol):
    params, batch, hyper = _problem(case, dtype)
    loss, grad = _meta_grad(params, batch, hyper, "fused")
    ref_loss, ref_grad = _meta_grad(params, batch, hyper, "reference")
    scale = max(1.0, ref_grad.abs().max().item())
    assert (grad - ref_grad).abs().max().item() / scale <= tol
    assert abs(loss.item() - ref_loss.item()) / max(1.0, abs(ref_loss.item())) <= tol


@pytest.mark.parametrize("case", CASES[:2], ids=["mse", "cross_entropy"])
def test_same_bits_on_one_and_two_threads(case):
    params, batch, hyper = _problem(case, torch.float32, seed=1)
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(_meta_grad(params, batch, hyper, "fused"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
