"""The benchmark suite's JSON (pytest-benchmark's --benchmark-json) as the table users read and
the speed-up figure: per group (a workload), each implementation's median time, its ratio to
the public fused API's, GFLOP/s, % of the measured matmul rate, the meta-gradient check and the
targets; the fused API's speed-up over the others against T and S (W2).

    python -m pytest benchmarks --benchmark-json=bench.json
    python benchmarks/report.py bench.json [--plot bench.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from workloads import (ANIL_TARGET, CUDA_PCT_TARGET, CUDA_SPEEDUP_TARGET, CUDA_TIME_TARGET,
                       DAML_SPEEDUP_TARGET, GRID_JAX_TARGET, GRID_PCT_TARGET, GRID_PEER_TARGET,
                       GRID_THREADS_TARGET, JAX_SPEEDUP_TARGETS, LAYER_TARGET, METASGD_TARGET,
                       THREADS_TARGET, TIME_TARGETS_S, TRAIN_TARGET_S, W2, DAMLWorkload,
                       Workload)

BASELINE = "fused"  # the ratio column reads every row against the public fused API


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def workload(row: dict) -> Optional[Workload]:
    config = row.get("config")
    if not config:
        return None
    if "loss_sizes" in config:  # DAML (issue 15)
        return DAMLWorkload(**dict(config, sizes=tuple(config["sizes"]),
                                   loss_sizes=tuple(config["loss_sizes"])))
    layers = config.get("adapt_layers")  # JSON gives lists; older JSON has no such field
    return Workload(**dict(config, sizes=tuple(config["sizes"]),
                           adapt_layers=None if layers is None else tuple(layers)))


def load_rows(report: dict) -> List[dict]:
    """One dict per benchmark: its extra_info, with `median_s` (per meta-iteration: a train()
    call's median divided by its iterations), `gflops`, `pct_matmul`, `label`, and `rank`: the
    implementation's place in the order they first appear (the registry's, as the tests run)."""
    rates = report.get("matmul_gflops", {})
    thread_rates = report.get("matmul_gflops_threads", {})  # issue 26: all threads
    ranks, rows = {}, []
    for b in report["benchmarks"]:
        info = dict(b["extra_info"], group=b["group"], name=b["name"])
        info["median_s"] = b["stats"]["median"] / info.get("iterations", 1)
        info["label"] = info["impl"] + (", no step" if info.get("timed") == "meta-gradient" else "")
        info["rank"] = ranks.setdefault(info["impl"], len(ranks))
        if info.get("flops"):
            info["gflops"] = info["flops"] / info["median_s"] / 1e9
            rate = rates.get(info["device"].split(":")[0])
            if info["threads"] > 1 and info["device"] == "cpu":
                rate = thread_rates.get(str(info["threads"]))
            info["pct_matmul"] = 100 * info["gflops"] / rate if rate else None
        rows.append(info)
    return rows


def order_key(row: dict):
    return row["rank"], row.get("timed") == "meta-gradient", row["threads"]


def target_of(row: dict, group: List[dict], rows: List[dict] = ()) -> Optional[dict]:
    """The target this row is held to, with its measured value, or None (`rows`: the whole
    report, for targets that read a row of another group)."""
    w, by = workload(row), {(r["impl"], r.get("timed"), r["threads"]): r for r in group}
    if row["section"] == "rates":
        return rates_target(row, w, rows)
    if row["section"] == "daml":
        return daml_target(row, w, by)
    if row["section"] == "grid":
        return grid_target(row, w, by)
    core_fused = row["section"] == "core" and row["impl"] == BASELINE
    if core_fused and row["timed"] == "meta-iteration" and w in TIME_TARGETS_S:
        return dict(what=f"fused {row['workload']} <= {fmt_time(TIME_TARGETS_S[w])}",
                    value=row["median_s"], limit=TIME_TARGETS_S[w], kind="max")
    fused = by.get((BASELINE, "meta-iteration", 1))
    if row["section"] == "core" and fused and w in JAX_SPEEDUP_TARGETS and row["impl"] == "jax":
        least = JAX_SPEEDUP_TARGETS[w]
        return dict(what=f"fused {row['workload']} >= {least:g}x faster than JAX",
                    value=row["median_s"] / fused["median_s"], limit=least, kind="min", unit="x")
    if (row["section"] == "core" and fused and w == LAYER_TARGET[0]
            and row["impl"] == "fused_op" and row.get("timed") == "meta-iteration"):
        return dict(what=f"fused {row['workload']} <= {LAYER_TARGET[1]:g}x the raw op + step",
                    value=fused["median_s"] / row["median_s"], limit=LAYER_TARGET[1],
                    kind="max", unit="x")
    if row["section"] == "train" and row["impl"].startswith("pymaml.train reptile") \
            and row["impl"].endswith(" chunked"):
        fomaml = by.get(("pymaml.train fomaml chunked", row.get("timed"), 1))
        if fomaml:
            kind = row["impl"].split()[1]
            return dict(what=f"Reptile ({kind}) in pymaml.train ({row['workload']}) <= FO-MAML",
                        value=row["median_s"] / fomaml["median_s"], limit=1.0, kind="max",
                        unit="x")
    if row["section"] == "train" and row["workload"] == "W1" and row["impl"] in (
            "pymaml.train chunked", "pymaml.train maml chunked"):  # older JSON: no algorithm
        return dict(what=f"W1 in pymaml.train <= {fmt_time(TRAIN_TARGET_S)}/iteration",
                    value=row["median_s"], limit=TRAIN_TARGET_S, kind="max")
    one = by.get((row["impl"], row.get("timed"), 1))
    if row["section"] == "threads" and row["threads"] == 2 and one and w.T >= 25:
        return dict(what=f"fused {row['workload']}: 2 threads >= {THREADS_TARGET:g}x one",
                    value=one["median_s"] / row["median_s"], limit=THREADS_TARGET, kind="min",
                    unit="x")
    return cuda_target(row, w, by) if row["section"] == "cuda" and w.replace(T=W2.T) == W2 else None


def cuda_target(row: dict, w: Workload, by: dict) -> Optional[dict]:
    """The H100 targets of W2 on the GPU (fused rows only)."""
    if row["impl"] != BASELINE:
        return None
    if w.T == CUDA_TIME_TARGET[0]:
        return dict(what=f"fused W2 T={w.T} on CUDA <= {fmt_time(CUDA_TIME_TARGET[1])}",
                    value=row["median_s"], limit=CUDA_TIME_TARGET[1], kind="max")
    if w.T == CUDA_SPEEDUP_TARGET[0]:
        tf = by.get(("torchfunc", row.get("timed"), row["threads"]))
        return dict(what=f"fused W2 T={w.T} on CUDA >= {CUDA_SPEEDUP_TARGET[1]:g}x torch.func "
                         f"and >= {CUDA_PCT_TARGET[1]:g} % of the matmul rate",
                    value=tf["median_s"] / row["median_s"] if tf else None,
                    limit=CUDA_SPEEDUP_TARGET[1], kind="min", unit="x",
                    also=(row.get("pct_matmul"), CUDA_PCT_TARGET[1]))
    return None


def rates_target(row: dict, w: Workload, rows: List[dict]) -> Optional[dict]:
    """Issue 14's ratios, in the rates section: the fused API's meta-iteration on W2 with
    Meta-SGD's rates, and as ANIL, against plain MAML's on W2 (second order, one thread, CPU)."""
    def fused_cpu(r):
        return (r["section"] == "rates" and r["impl"] == BASELINE and r["device"] == "cpu"
                and r.get("timed") == "meta-iteration" and r["threads"] == 1)
    if not fused_cpu(row) or w not in (METASGD_TARGET[0], ANIL_TARGET[0]):
        return None
    plain = next((r for r in rows if fused_cpu(r) and workload(r) == W2), None)
    if plain is None:
        return None
    if w == METASGD_TARGET[0]:
        return dict(what=f"fused {row['workload']} <= {METASGD_TARGET[1]:g}x plain MAML (W2)",
                    value=row["median_s"] / plain["median_s"], limit=METASGD_TARGET[1],
                    kind="max", unit="x")
    return dict(what=f"fused {row['workload']} >= {ANIL_TARGET[1]:g}x faster than MAML (W2)",
                value=plain["median_s"] / row["median_s"], limit=ANIL_TARGET[1], kind="min",
                unit="x")


def daml_target(row: dict, w: Workload, by: dict) -> Optional[dict]:
    """Issue 15's target, on the reference row of D1's group: the public fused API's DAML
    meta-iteration at least DAML_SPEEDUP_TARGET[1] times faster than the reference's (one
    thread, CPU)."""
    workload_, least = DAML_SPEEDUP_TARGET
    fused = by.get((BASELINE, "meta-iteration", 1))
    if (w != workload_ or row["impl"] != "reference" or row.get("timed") != "meta-iteration"
            or row["threads"] != 1 or row["device"] != "cpu" or fused is None):
        return None
    return dict(what=f"fused DAML meta-step ({row['workload']}) >= {least:g}x faster than the "
                     "reference", value=row["median_s"] / fused["median_s"], limit=least,
                kind="min", unit="x")


def grid_target(row: dict, w: Workload, by: dict) -> Optional[dict]:
    """Issue 26's targets, on the grid's public-API rows (second order, CPU): one thread:
    >= GRID_JAX_TARGET x JAX, >= GRID_PEER_TARGET x the faster of the autograd loop and
    torch.func, and on the wide workloads >= GRID_PCT_TARGET % of the one-thread matmul rate;
    all threads: >= GRID_THREADS_TARGET x its one-thread row."""
    if row["impl"] != BASELINE or row.get("timed") != "meta-iteration":
        return None
    one = by.get((BASELINE, "meta-iteration", 1))
    if row["threads"] > 1:
        return one and dict(what=f"grid {row['workload']}: {row['threads']} threads >= "
                                 f"{GRID_THREADS_TARGET:g}x one",
                            value=one["median_s"] / row["median_s"], limit=GRID_THREADS_TARGET,
                            kind="min", unit="x")
    jax = by.get(("jax", "meta-iteration", 1))
    peers = [by[(p, "meta-iteration", 1)]["median_s"] for p in ("reference", "torchfunc_list")
             if (p, "meta-iteration", 1) in by]
    least_jax = GRID_JAX_TARGET.get(w.base, 2.0)
    # the margin: the smaller of (JAX / fused) / its target and (peer / fused) / its target
    ratios, margins = [], []
    if jax:
        ratios.append(f"JAX {jax['median_s'] / row['median_s']:.2f}x")
        margins.append(jax["median_s"] / row["median_s"] / least_jax)
    if peers:
        ratios.append(f"peers {min(peers) / row['median_s']:.2f}x")
        margins.append(min(peers) / row["median_s"] / GRID_PEER_TARGET)
    t = dict(what=f"grid {row['workload']}: >= {least_jax:g}x JAX, >= {GRID_PEER_TARGET:g}x the "
                  f"faster of reference and torch.func ({', '.join(ratios)}; margin)",
             value=min(margins) if margins else None, limit=1.0, kind="min", unit="x")
    if w.base in GRID_PCT_TARGET[0]:
        t["also"] = (row.get("pct_matmul"), GRID_PCT_TARGET[1])
        t["what"] += f", >= {GRID_PCT_TARGET[1]:g} % of the matmul rate"
    return t


def verdict(t: dict) -> str:
    value, limit = t["value"], t["limit"]
    if value is None:
        return "n/a"
    ok = value <= limit if t["kind"] == "max" else value >= limit
    shown = f"{value:.2f}x" if t.get("unit") == "x" else fmt_time(value)
    if "also" in t:
        pct, least = t["also"]
        ok = ok and pct is not None and pct >= least
        shown += f", {pct or 0:.1f} %"
    return f"{'pass' if ok else 'MISS'} ({shown})"


def group_lines(name: str, group: List[dict], targets: List[str],
                rows: List[dict] = ()) -> List[str]:
    """One group's rows: median, ratio to the fused API (threads: speed-up over one thread;
    train: to the chunked path), GFLOP/s, %mm, the check, the target (`rows`: the whole
    report, where a target reads another group)."""
    group = sorted(group, key=order_key)
    base = next((r for r in group if r["impl"] == BASELINE and r["threads"] == 1
                 and r.get("timed") != "meta-gradient"), group[0])
    lines = [f"== {name}"]
    for r in group:
        threads = r["section"] == "threads"
        ratio = base["median_s"] / r["median_s"] if threads else r["median_s"] / base["median_s"]
        cells = [f"{r['label']:26s}", f"thr {r['threads']}", f"{fmt_time(r['median_s']):>9s}",
                 f"{ratio:7.2f}x" + ("/1thr" if threads else "     ")]
        if r.get("gflops"):
            pct = "-" if r["pct_matmul"] is None else f"{r['pct_matmul']:.1f}"
            cells.append(f"{r['gflops']:8.2f} GFLOP/s {pct:>5s} %mm")
        if r["section"] == "cuda":
            cells.append(f"{r['config']['T'] / r['median_s']:10.4g} tasks/s")
        if "verify_error" in r:
            against = r.get("verified_against")
            cells.append(f"check {r['verify_error']:.0e} vs {against}" if against else "oracle")
        t = target_of(r, group, rows)
        if t:
            cells.append(f"target: {verdict(t)}")
            targets.append(f"  {t['what']}: {verdict(t)}")
        lines.append("  ".join(cells).rstrip())
    return lines


def format_report(report: dict) -> str:
    m = report["machine_info"]
    rates = ", ".join(f"{d} {v:.1f} GFLOP/s" for d, v in report.get("matmul_gflops", {}).items())
    lines = [f"pymaml {m.get('pymaml_version')} on {m['cpu'].get('brand_raw')} "
             f"({m['cpu'].get('count')} cores), torch {m.get('torch_version')} "
             f"({m.get('torch_cpu_capability')}), {report['datetime']}",
             "float32 matmul rate (one thread on the CPU; TF32 off on a GPU): "
             + (rates or "not measured"),
             f"ratio = time / the {BASELINE} row's time (threads: speed-up over one thread; train: "
             "time per iteration, ratio to the chunked path); %mm = GFLOP/s / matmul rate", ""]
    groups, rows = {}, load_rows(report)
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    targets = []
    for name, group in groups.items():
        lines += group_lines(name, group, targets, rows) + [""]
    if targets:
        lines += ["== targets"] + targets
    return "\n".join(lines)


def speedups(report: dict, field: str) -> dict:
    """{(rank, implementation, order): [(value of field, time / fused time)]} over the W2 rows that
    differ from W2 in `field` alone (the sweep's and core's; one thread, the CPU)."""
    times = {}
    for r in load_rows(report):
        w = workload(r)
        if (r["section"] in ("core", "T", "S") and r["device"] == "cpu"
                and r["timed"] == "meta-iteration"
                and w.replace(**{field: getattr(W2, field), "first_order": False}) == W2):
            times.setdefault((r["rank"], r["impl"], r["order"]), {})[getattr(w, field)] = r["median_s"]
    base = {order: by_x for (_, impl, order), by_x in times.items() if impl == BASELINE}
    out = {}
    for (rank, impl, order), by_x in sorted(times.items()):
        points = [(x, by_x[x] / base[order][x]) for x in sorted(by_x) if x in base.get(order, {})]
        if impl != BASELINE and points:
            out[(rank, impl, order)] = points
    return out


def plot(report: dict, path: str) -> None:
    """The fused API's speed-up over each other implementation against T and against S (W2,
    one thread), second order solid, first order dashed."""
    from matplotlib.figure import Figure  # no pyplot: no display needed
    fig = Figure(figsize=(11, 4.5), constrained_layout=True)
    for ax, field in zip(fig.subplots(1, 2), ("T", "S")):
        lines = speedups(report, field)
        for (rank, impl, order), points in lines.items():
            ax.plot(*zip(*points), marker="o", color=f"C{rank}",
                    linestyle="-" if order == "2nd" else "--",
                    label=f"{impl} / {BASELINE}, {order} order")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(xlabel=f"{field} (W2 otherwise)", ylabel=f"time / {BASELINE} time",
               title=f"W2, scaling in {field}")
        if lines:
            ax.set(xscale="log", yscale="log")
            ax.legend(fontsize=8)
    m = report["machine_info"]
    fig.suptitle(f"pymaml {m.get('pymaml_version')}, {m['cpu'].get('brand_raw')}, "
                 f"torch {m.get('torch_version')}, one thread", fontsize=9)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", help="pytest-benchmark's --benchmark-json output")
    ap.add_argument("--plot", metavar="PNG", help="also write the speed-up figure there")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        report = json.load(f)
    print(format_report(report))
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
