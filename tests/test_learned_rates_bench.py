"""The benchmark suite's learned-rate and ANIL rows (benchmarks/: the rates section): the
workloads' labels and keywords, every row that serves them agreeing on the meta-gradient in
params and rates and stepping both alike, the rows that do not skipped with the reason, and the
report's issue-14 targets on a pytest-benchmark JSON written here."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402
from conftest import assert_rows_agree, assert_steps_agree  # noqa: E402
import report  # noqa: E402
from workloads import W2, W2_ANIL, W2_METASGD, meta_iteration_flops  # noqa: E402


def tiny(w, **changes):
    return w.replace(**dict(dict(sizes=(1, 8, 8, 1), K=4, Q=3, S=2, T=3), **changes))


def test_labels_and_keywords():
    assert W2_METASGD.label() == "W2 Meta-SGD" and W2_ANIL.label() == "W2 ANIL"
    assert W2_ANIL.replace(first_order=True).test_id() == "W2-ANIL-1st"
    assert W2.replace(adapt_layers=(0, 2)).label() == "W2 adapt=0,2"
    assert W2_ANIL.hyper["adapt_layers"] == [-1] and "adapt_layers" not in W2.hyper
    assert W2.plain and not W2_ANIL.plain and not W2_METASGD.plain
    # learned rates and frozen layers count as MAML on the same sizes
    assert meta_iteration_flops(W2_ANIL) == meta_iteration_flops(W2_METASGD) == meta_iteration_flops(W2)


def test_learned_rates_start_at_inner_lr():
    params = torch.zeros(5)
    assert harness.learned_rates(W2, params) is None
    assert torch.equal(harness.learned_rates(W2_METASGD, params), torch.full((5,), W2.inner_lr))
    assert harness.learned_rates(W2.replace(rates="per-step"), params).shape == (W2.S, 1)


def test_rows_that_time_plain_maml_only_are_skipped():
    for name in ("fused_op", "jax"):
        assert "plain MAML only" in harness.skip_reason(name, W2_ANIL)
    assert harness.skip_reason("reference", W2_METASGD) is None


ROWS = [n for n in ("fused", "reference", "torchfunc")]


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
@pytest.mark.parametrize("variant", [W2_METASGD, W2_ANIL, W2.replace(rates="per-parameter-step",
                                                                      adapt_layers=(0, 2))],
                         ids=lambda w: w.label().replace(" ", "-"))
def test_rows_agree_and_step_alike(variant, first_order):
    w = tiny(variant, first_order=first_order)
    batch, params = harness.make_data(w)
    names = [n for n in ROWS if harness.skip_reason(n, w) is None]
    assert {"reference", "torchfunc"} <= set(names)
    runners = {n: harness.make_runner(n, w, batch, params) for n in names}
    grads = assert_rows_agree(runners)
    rates = harness.learned_rates(w, params)
    assert grads["reference"].numel() == params.numel() + (0 if rates is None else rates.numel())
    for n, grad in grads.items():
        assert harness.verify(n, w, grad)["verify_error"] <= harness.VERIFY_TOLERANCE
    assert_steps_agree(runners, list(runners))


def test_a_learned_rates_gradient_is_checked_too():
    # The rates' half of the meta-gradient is verified like the weights' half.
    w = tiny(W2_METASGD)
    _, expected = harness.oracle(w)
    wrong = expected.clone()
    wrong[-1] += 1.0
    with pytest.raises(AssertionError, match="not timed"):
        harness.verify("torchfunc", w, wrong)


def entry(w, impl, median, threads=1, device="cpu"):
    """A rates-section benchmark as pytest-benchmark's JSON writes it."""
    config = dataclasses.asdict(w)
    config["adapt_layers"] = None if w.adapt_layers is None else list(w.adapt_layers)
    return dict(group=f"rates: {w.label()} {w.order} order", name=f"test[{impl}]",
                stats=dict(median=median),
                extra_info=dict(section="rates", impl=impl, device=device, threads=threads,
                                timed="meta-iteration", config=config, workload=w.label(),
                                order=w.order, flops=meta_iteration_flops(w)))


def test_report_marks_the_issue_14_targets():
    first = dict(first_order=True)
    benchmarks = [entry(W2, "fused", 1.0e-3), entry(W2, "reference", 40e-3),
                  entry(W2_METASGD, "fused", 1.1e-3), entry(W2_METASGD, "reference", 45e-3),
                  entry(W2_ANIL, "fused", 0.6e-3), entry(W2.replace(**first), "fused", 0.5e-3),
                  entry(W2_ANIL.replace(**first), "fused", 0.1e-3)]
    table = report.format_report(dict(machine_info=dict(cpu=dict(brand_raw="CPU", count=2)),
                                      datetime="now", benchmarks=benchmarks,
                                      matmul_gflops=dict(cpu=100.0)))
    targets = table.split("== targets")[1]
    assert "fused W2 Meta-SGD <= 1.15x plain MAML (W2): pass (1.10x)" in targets
    assert "fused W2 ANIL >= 2x faster than MAML (W2): MISS (1.67x)" in targets
    assert targets.count("pass") + targets.count("MISS") == 2  # second order only
    assert "== rates: W2 Meta-SGD 2nd order" in table


def test_report_reads_json_from_before_the_rates_fields():
    old = entry(W2, "fused", 1e-3)
    for field in ("rates", "adapt_layers"):
        del old["extra_info"]["config"][field]
    assert report.workload(old["extra_info"]) == W2
