"""pymaml.bench and `pymaml bench`: the flop count, the three implementations agreeing and
stepping alike, verification, timing and skipping, peak memory, and the command line (its
--quick run writes the JSON and the figure; bad flags are one-line errors with exit code 2)."""

import contextlib
import io
import json

import pytest
import torch

import pymaml
from pymaml import bench
from pymaml.cli import main

from conftest import assert_one_line, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

IMPLS = [pytest.param(n, marks=pytest.mark.skipif(n == "fused" and not pymaml.fused_available(),
                                                   reason="pymaml._C is not built"))
         for n in bench.IMPLEMENTATIONS]
TINY_TIMING = dict(rounds=3, round_s=0.001, cell_budget_s=0.05, max_iter_s=10.0)



def tiny(**changes):
    return bench.W2.replace(**dict(dict(sizes=(1, 8, 8, 1), K=4, Q=3, S=2, T=3), **changes))


def test_flops_by_hand():
    # W1: P_w = 1*32 + 32*32 + 32*1 = 1088; 6 * 1088 * (3*5*4 + 4) = 417,792 per meta-iteration.
    assert bench.meta_iteration_flops(bench.W1) == 417_792
    assert bench.meta_iteration_flops(bench.W1.replace(first_order=True)) == 6 * 1088 * (5 * 4 + 4)
    # W2: P_w = 40 + 1600 + 40 = 1680; 25 tasks * 6 * 1680 * (3*5*10 + 10) = 40,320,000.
    assert bench.meta_iteration_flops(bench.W2) == 40_320_000
    # Unequal widths, biases ignored: P_w = 3*5 + 5*2 = 25; T=2, S=1, K=2, Q=3.
    w = bench.W2.replace(sizes=(3, 5, 2), S=1, T=2, K=2, Q=3)
    assert bench.meta_iteration_flops(w) == 2 * 6 * 25 * (3 * 2 + 3) == 2700
    assert bench.meta_iteration_flops(w.replace(first_order=True)) == 2 * 6 * 25 * (2 + 3) == 1500


def test_labels_name_what_differs():
    assert bench.W2.label() == "W2"
    assert bench.W2.replace(S=1).label() == "W2 S=1"
    assert bench.W2.replace(sizes=(1, 128, 128, 1), T=64).label() == "W2 w=128 T=64"
    assert bench.W1.replace(first_order=True).order == "1st"


@pytest.mark.parametrize("activation, loss", [("relu", "mse"), ("tanh", "l1")])
@pytest.mark.parametrize("first_order", [False, True])
def test_implementations_agree_and_step_alike(first_order, activation, loss):
    w = tiny(first_order=first_order, activation=activation, loss=loss)
    batch, params = bench.make_data(w)
    names = [n for n in bench.IMPLEMENTATIONS if n != "fused" or pymaml.fused_available()]
    impls = {n: bench.make_implementation(n, w, batch, params) for n in names}
    results = {n: impl.meta_grad() for n, impl in impls.items()}
    checks = bench.verify({n: g for n, (_, g) in results.items()})
    assert checks["reference"]["role"] == "oracle"
    for n in names:
        torch.testing.assert_close(results[n][1], results["reference"][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[n][0], results["reference"][0], rtol=1e-5, atol=1e-6)
        if n != "reference":
            assert checks[n]["ok"] and checks[n]["oracle"] == "reference"
    # One meta-iteration each from the same weights with the same optimizer: the same weights.
    for impl in impls.values():
        impl.step()
    assert not torch.equal(impls["reference"].params, params)
    for n in names:
        torch.testing.assert_close(impls[n].params, impls["reference"].params, rtol=1e-5, atol=1e-6)


def test_second_order_differs_from_first_order():
    # Guards against an implementation that silently ignores first_order.
    batch, params = bench.make_data(tiny())
    second = bench.make_implementation("torchfunc", tiny(), batch, params).meta_grad()[1]
    first = bench.make_implementation("torchfunc", tiny(first_order=True), batch, params).meta_grad()[1]
    assert (second - first).abs().max() > 1e-4


def test_verify_reports_a_mismatch():
    g = torch.linspace(-1, 1, 50)
    checks = bench.verify({"reference": g, "torchfunc": g + 1e-6, "fused": g + 1e-2})
    assert checks["torchfunc"]["ok"] and not checks["fused"]["ok"]
    assert checks["fused"]["error"] == pytest.approx(1e-2, rel=1e-3)
    # Without the reference, torch.func is the oracle; alone, nothing is checked.
    assert bench.verify({"torchfunc": g, "fused": g})["fused"]["oracle"] == "torchfunc"
    assert bench.verify({"fused": g})["fused"]["role"] == "unchecked"


def test_a_mismatching_implementation_is_not_timed(monkeypatch):
    real = bench.make_implementation

    def broken(name, w, batch, params0):
        impl = real(name, w, batch, params0)
        if name != "torchfunc":
            return impl
        return impl._replace(meta_grad=lambda: (lambda lg: (lg[0], lg[1] * 1.01))(impl.meta_grad()))

    monkeypatch.setattr(bench, "make_implementation", broken)
    rows = {r["impl"]: r for r in bench.measure_workload(tiny(), ["reference", "torchfunc"],
                                                         section="core", timing=TINY_TIMING)}
    assert rows["reference"]["status"] == "ok" and rows["reference"]["median_s"] > 0
    assert rows["torchfunc"]["status"] == "mismatch" and rows["torchfunc"]["median_s"] is None
    assert "differs from reference" in rows["torchfunc"]["note"]


def test_time_steps_rounds_budget_and_interleaving():
    order = []
    entries = {
        "slow": bench.Timed(lambda: order.append("slow"), first_call_s=0.1),
        "fast": bench.Timed(lambda: order.append("fast"), first_call_s=1e-4,
                            before=lambda: order.append("before fast")),
    }
    out = bench.time_steps(entries, rounds=4, round_s=0.01, cell_budget_s=0.25)
    # slow: one call per round (a call is estimated at 0.1 s > round_s) and 0.25 s of budget:
    # 3 rounds (the minimum) after one warm-up call. fast: 100 calls per round, all 4 rounds.
    assert out["slow"]["calls_per_round"] == 1 and len(out["slow"]["rounds_s"]) == 3
    assert out["fast"]["calls_per_round"] == 100 and len(out["fast"]["rounds_s"]) == 4
    assert order.count("slow") == 1 + 3 and order.count("fast") == 100 * (1 + 4)
    assert order.count("before fast") == 1 + 4  # before the warm-up and before every round
    # Warm-up of each, then the rounds interleaved: slow, fast, slow, fast, ..., fast's last.
    assert [x for x in order if x != "fast"] == ["slow", "before fast"] * 4 + ["before fast"]
    assert out["slow"]["median_s"] == sorted(out["slow"]["rounds_s"])[1]


def test_sweep_skips_an_implementation_over_the_cap():
    small, big = tiny(T=1), tiny(T=64)
    # As if the reference had taken 0.1 s at T=1: 64x the flops extrapolates to 6.4 s.
    estimates = {("reference", "cpu", "2nd", "T"): (bench.meta_iteration_flops(small), 0.1)}
    rows = {r["impl"]: r for r in bench.measure_workload(
        big, ["reference", "torchfunc"], section="T", estimates=estimates,
        timing=dict(TINY_TIMING, max_iter_s=1.0))}
    assert rows["reference"]["status"] == "skipped" and rows["reference"]["median_s"] is None
    assert "estimated 6.4 s/iteration" in rows["reference"]["note"]
    assert rows["torchfunc"]["status"] == "ok" and rows["torchfunc"]["check"] == "unchecked"
    assert ("torchfunc", "cpu", "2nd", "T") in estimates  # the next point extrapolates from it


def test_format_table_marks_skips_mismatches_and_targets():
    w = bench.W2
    base = dict(section="core", workload="W2", order="2nd", device="cpu", threads=1, note="",
                config=dict(S=5, T=25), flops=bench.meta_iteration_flops(w))
    rows = [dict(base, impl="fused", status="ok", median_s=1e-3, ratio_to_fused=1.0, gflops=40.3,
                 pct_matmul=30.0, check="checked", verify_error=1e-7,
                 target=dict(what="fused W2 <= 0.6 ms", value=1e-3, limit=6e-4, kind="max",
                             unit="s", passed=False)),
            dict(base, impl="reference", status="skipped", median_s=None, note="estimated 9 s"),
            dict(base, impl="torchfunc", status="mismatch", median_s=None, check="checked",
                 verify_error=0.5, note="differs")]
    report = dict(machine=bench.machine_info(), matmul={"cpu": dict(gflops=100.0)}, results=rows,
                  train=None, targets=[rows[0]["target"]], elapsed_s=1.0)
    table = bench.format_table(report)
    assert "skipped" in table and "estimated 9 s" in table and "MISMATCH" in table
    assert "MISS (1 ms)" in table and "<= 600.0 us" in table


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `pymaml bench --quick` (seconds), shared by the checks on its outputs:
    (exit code, printed table, output prefix)."""
    out = tmp_path_factory.mktemp("bench") / "bench"
    threads = torch.get_num_threads()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        code = main(["bench", "--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the run puts the thread count back
    return code, printed.getvalue(), out


def test_cli_quick_writes_json_and_png(quick_run):
    code, _, out = quick_run
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    for key in ("cpu_model", "torch_version", "torch_cpu_capability", "default_threads", "date"):
        assert report["machine"][key] not in (None, "")
    assert report["matmul"]["cpu"]["gflops"] > 0
    assert report["settings"]["quick"] is True
    sections = {r["section"] for r in report["results"]}
    assert sections == {"core", "T", "S", "width", "threads", "memory"}
    timed = [r for r in report["results"] if r["section"] != "memory"]
    expected = set(bench.IMPLEMENTATIONS) if pymaml.fused_available() else {"reference", "torchfunc"}
    assert {r["impl"] for r in timed if r["status"] == "ok"} == expected
    for r in timed:
        assert r["status"] in ("ok", "skipped"), r  # a mismatch is a bug somewhere
        if r["status"] == "ok":
            assert r["median_s"] > 0 and len(r["rounds_s"]) >= 3 and r["gflops"] > 0
            w = bench.Workload(**dict(r["config"], sizes=tuple(r["config"]["sizes"])))
            assert r["flops"] == bench.meta_iteration_flops(w)
            if pymaml.fused_available() and r["section"] != "threads":
                assert r["ratio_to_fused"] > 0
    memory = {r["impl"]: r for r in report["results"] if r["section"] == "memory"}
    # The reference keeps every task's double-backward graph: its peak is well above setup.
    assert memory["reference"]["increase_mb"] > 1.0
    assert memory["reference"]["peak_mb"] >= memory["reference"]["baseline_mb"] > 0
    if pymaml.fused_available():
        assert 0 <= memory["fused"]["increase_mb"] < memory["reference"]["increase_mb"]
    assert report["train"]["median_s"] > 0 and 1 <= report["train"]["iterations"] <= 300
    assert any(t["what"].startswith("W1 in pymaml.train") for t in report["targets"])
    # the processes section: one and two processes (torchrun), each with tasks/s
    settings = [(r["processes"], r["threads"]) for r in report["processes"]]
    assert settings == [(1, 1), (1, 2), (2, 1)]
    for r in report["processes"]:
        assert r["median_s"] > 0 and r["tasks_per_s"] == pytest.approx(r["T"] / r["median_s"])
    assert all(r["speedup_vs_1_process_1_thread"] > 0 for r in report["processes"][1:])
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == PNG_SIGNATURE


def test_cli_quick_prints_the_table(quick_run):
    _, printed, out = quick_run
    for text in ("workload", "ratio", "GFLOP/s", "%mm", "W1", "W2 T=4", "W2 S=2", "torchfunc",
                 "reference", "== targets", "== processes", "tasks/s",
                 f"wrote {out}.json and {out}.png"):
        assert text in printed


@pytest.mark.parametrize("argv, words", [
    (["bench", "--only", "core,bogus"], ["bogus", "core,T,S,width"]),
    (["bench", "--threads", "1,0"], ["thread counts"]),
    (["bench", "--threads", "two"], ["two"]),
])
def test_cli_bad_flags_are_one_line_errors(capsys, argv, words):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_line(err)
    for word in words:
        assert word in err


def test_cli_unwritable_out_fails_before_measuring(capsys, tmp_path):
    code, out, err = run_cli(capsys, "bench", "--quick", "--out", str(tmp_path / "missing" / "b"))
    assert code == 1 and out == ""
    assert_one_line(err)
    assert "does not exist" in err
