"""Shared helpers: random MAML problems and the per-dtype tolerances of the oracle tests."""

import pytest
import torch

import pymaml
from pymaml.testing import Problem, random_problem, relative_error  # noqa: F401  (re-exported to tests)

# max |fused - reference| <= TOL[dtype] * max(1, max |reference|)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

requires_fused = pytest.mark.skipif(not pymaml.fused_available(),
                                    reason="pymaml._C is not built")


def assert_matches(actual, expected, dtype, what):
    err = relative_error(actual, expected)
    assert err <= TOL[dtype], f"{what}: max |diff| / max(1, max |ref|) = {err:.3g} > {TOL[dtype]:g}"
