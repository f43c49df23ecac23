"""Shared helpers: random MAML problems and the per-dtype tolerances of the oracle tests."""

import pytest
import torch

import pymaml
from pymaml.testing import Problem, random_problem  # noqa: F401  (re-exported to tests)

# max |fused - reference| <= TOL[dtype] * max(1, max |reference|)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

requires_fused = pytest.mark.skipif(not pymaml.fused_available(),
                                    reason="pymaml._C is not built")


def assert_matches(actual, expected, dtype, what):
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max |diff| {err:.3g} > {TOL[dtype]:g} * {scale:.3g}"
    return err / scale
