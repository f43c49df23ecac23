"""init_params, mlp_forward and the nn.Sequential conversion."""

import math

import pytest
import torch
from torch import nn

from pymaml import functional as F
from pymaml import nn as pnn


def test_init_params_like_nn_linear():
    sizes = [3, 64, 64, 2]
    p = F.init_params(sizes, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert p.shape == (F.num_params(sizes),) and p.dtype == torch.float64
    for (W, b), fan_in in zip(pnn.unflatten(p, sizes), sizes[:-1]):
        bound = 1 / math.sqrt(fan_in)
        for t in (W, b):
            assert t.abs().max() <= bound
            if t.numel() >= 50:
                assert t.abs().max() > 0.8 * bound  # spread over the whole interval
        assert abs(W.var().item() - bound**2 / 3) < 0.2 * bound**2 / 3  # U(-a, a) variance
    again = F.init_params(sizes, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(p, again)


def test_mlp_forward_matches_sequential():
    sizes = [3, 7, 5, 2]
    for activation, act_cls in (("relu", nn.ReLU), ("tanh", nn.Tanh)):
        p = F.init_params(sizes, generator=torch.Generator().manual_seed(1))
        model = pnn.to_sequential(p, sizes, activation)
        assert [type(m) for m in model] == [nn.Linear, act_cls, nn.Linear, act_cls, nn.Linear]
        x = torch.randn(4, 6, 3)
        torch.testing.assert_close(F.mlp_forward(p, x, sizes=sizes, activation=activation), model(x))
        # per-task params [T, P] with x [T, N, n_in]
        batch = torch.stack([p, 2 * p])
        out = F.mlp_forward(batch, x[:2], sizes=sizes, activation=activation)
        torch.testing.assert_close(out[0], model(x[0]))
        torch.testing.assert_close(out[1], F.mlp_forward(2 * p, x[1], sizes=sizes, activation=activation))


def test_sequential_round_trip():
    model = nn.Sequential(nn.Linear(2, 9), nn.Tanh(), nn.Linear(9, 4))
    params, sizes, activation = pnn.from_sequential(model)
    assert sizes == [2, 9, 4] and activation == "tanh"
    assert torch.equal(params, torch.cat([model[0].weight.flatten(), model[0].bias,
                                          model[2].weight.flatten(), model[2].bias]))
    back = pnn.to_sequential(params, sizes, activation)
    x = torch.randn(5, 2)
    torch.testing.assert_close(back(x), model(x))


@pytest.mark.parametrize("model,words", [
    (nn.Sequential(nn.Linear(2, 3), nn.ReLU()), "end with a Linear"),
    (nn.Sequential(nn.Linear(2, 3), nn.GELU(), nn.Linear(3, 1)), "ReLU or nn.Tanh"),
    (nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(4, 1)), "takes 4 inputs"),
    (nn.Sequential(nn.Linear(2, 3, bias=False)), "with bias"),
    (nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)), "one kind"),
])
def test_from_sequential_rejects(model, words):
    with pytest.raises(ValueError, match=words):
        pnn.from_sequential(model)


def test_mlp_forward_bad_input():
    sizes = [3, 4, 1]
    p = F.init_params(sizes)
    with pytest.raises(ValueError, match="x must be"):
        F.mlp_forward(p, torch.randn(5, 2), sizes=sizes)
    with pytest.raises(ValueError, match="x must be"):
        F.mlp_forward(torch.stack([p, p]), torch.randn(3, 5, 3), sizes=sizes)
    with pytest.raises(TypeError, match="x must have the dtype"):
        F.mlp_forward(p, torch.randn(5, 3, dtype=torch.float64), sizes=sizes)
    with pytest.raises(ValueError, match="params"):
        F.mlp_forward(p[:-1], torch.randn(5, 3), sizes=sizes)
