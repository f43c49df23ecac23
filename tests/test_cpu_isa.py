"""The CPU kernels are compiled once per instruction set (generic, AVX2, AVX-512) and chosen at
run time: every build this CPU can run must match the autograd oracle, on widths that exercise
each code path of the SIMD products (narrower than a vector, an overlapping last vector,
several strips)."""

import pytest
import torch

import pymaml
from pymaml import _ops

from conftest import assert_matches, random_problem, requires_fused
from pymaml.testing import backend_outputs

pytestmark = requires_fused

ISAS = ["generic", "avx2", "avx512"]
ORDER = {name: i for i, name in enumerate(ISAS)}
WIDE = dict(max_depth=3, max_width=140, max_steps=3, max_points=12, max_tasks=3)


def supported(isa):
    return _ops.available() and ORDER[isa] <= ORDER[_ops._C.best_cpu_isa()]


@pytest.fixture
def use_isa(request):
    before = _ops._C.cpu_isa()
    yield lambda isa: _ops._C.set_cpu_isa(isa)
    _ops._C.set_cpu_isa(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_every_instruction_set_matches_reference(isa, dtype, use_isa):
    if not supported(isa):
        pytest.skip(f"this CPU cannot run {isa}")
    use_isa(isa)
    assert _ops._C.cpu_isa() == isa
    widths = set()
    for seed in range(2000, 2016):
        pb = random_problem(seed, dtype, **WIDE)
        widths.update(pb.sizes)
        fused, ref = backend_outputs(pb, "fused"), backend_outputs(pb, "reference")
        for key in ref:
            assert_matches(fused[key], ref[key], dtype, f"{isa} seed {seed} {key} {pb.sizes}")
    # The seeds cover narrow (< 8 lanes), mid (overlapping last vector) and multi-strip widths.
    assert min(widths) < 8 and any(20 < w < 64 for w in widths) and max(widths) > 100


def test_instruction_sets_agree_to_rounding(use_isa):
    # The same float64 problem under every supported build: equal to rounding (the order of
    # the sums and the use of fused multiply-adds differ between builds).
    isas = list(filter(supported, ISAS))
    if len(isas) < 2:
        # One build on this CPU: the comparison would be of its result with itself.
        pytest.skip(f"this CPU runs only the {isas[0]} build: no other to compare it with")
    pb = random_problem(5, torch.float64, **WIDE)
    results = {}
    for isa in isas:
        use_isa(isa)
        results[isa] = backend_outputs(pb, "fused")["meta_grad"]
    first = results[isas[0]]
    for isa in isas[1:]:
        torch.testing.assert_close(results[isa], first, rtol=1e-12, atol=1e-12, msg=isa)


def test_bad_instruction_set_names_the_choices(use_isa):
    with pytest.raises(ValueError, match="'generic', 'avx2' or 'avx512'"):
        _ops._C.set_cpu_isa("sse9")


def test_info_reports_the_instruction_set():
    assert pymaml.fused_available()
    assert _ops._C.cpu_isa() in ISAS and _ops._C.best_cpu_isa() in ISAS
