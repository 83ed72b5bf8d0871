"""Does DP beat static generation and oversample-then-prune on the embedded world? One table says.

    .venv/bin/python bench/dp_vs_baselines.py [--quick] [--seeds 0 1 2] [-S key=value ...]

Arms, each with the same seeds, learner, iteration budget and evaluation (only the acquisition differs):
``static`` at every size of ``sweep.static_sizes``; ``dp`` at the configured ω and at ω = 0 (the same
dynamic schedule without guidance: isolates guidance); ``oversample`` at ratios 2, 4, 8 (same N, P and
patience, so equal kept size per round). Every run is an ordinary experiment run in the MLflow
experiment ``--experiment`` (tags ``dpops.bench``, ``dpops.arm``), so ``dpops scaling`` reads them too.
Re-running the same command skips runs that already FINISHED: an interrupted benchmark resumes.

Prints one table (mean ± sd over seeds) and the headline ratios, writes ``bench.json`` and
``bench.png`` (test accuracy vs generated samples, log x) to ``--out``. The test split is only reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

from mlflow import MlflowClient
from rich.console import Console
from rich.table import Table

from dp_ops import experiment
from dp_ops.config import flatten, load_config, load_tree
from dp_ops.scaling import interpolate_samples_for_accuracy
from dp_ops.sweep import sweep_config
from dp_ops.tracking import get_or_create_experiment, tracking_uri

# --quick: a smoke check (< 5 min on 2 cores): short budget, one seed, two static sizes, one ratio.
QUICK = ["train.iterations=600", "train.eval_every=50", "dp.initial_size=300", "dp.round_size=100",
         "generator.steps=6"]  # fmt: skip
FIELDS = ("generated_samples", "pool_size", "iterations", "gen_seconds", "unet_evals", "final_val_acc",
          "final_test_acc")  # fmt: skip


def arms(cfg, sizes: tuple[int, ...], quick: bool) -> list[tuple[str, list[str]]]:
    sizes = sizes[:2] if quick else sizes
    out = [(f"static N={n}", ["dp.strategy=static", f"dp.initial_size={n}"]) for n in sizes]
    out += [(f"dp ω={cfg.dp.omega:g}", ["dp.strategy=dp"]), ("dp ω=0", ["dp.strategy=dp", "dp.omega=0"])]
    out += [(f"oversample r={r}", ["dp.strategy=oversample", f"dp.oversample_ratio={r}"]) for r in ((4,) if quick else (2, 4, 8))]
    return out


def finished_runs(client: MlflowClient, exp_id: str, bench: str) -> dict[tuple[str, str], dict]:
    runs = client.search_runs([exp_id], f"tags.`dpops.bench` = '{bench}' and attributes.status = 'FINISHED'",
                              max_results=10_000)  # fmt: skip
    return {(r.data.tags["dpops.arm"], r.data.params["seed"]): r.data.metrics for r in runs}


def main() -> None:
    console = Console(width=None if sys.stdout.isatty() else 140)
    base = [*(QUICK if ARGS.quick else []), *ARGS.set, f"tracking.experiment={ARGS.experiment}"]
    cfg0 = load_config(ARGS.params, base)
    plan = arms(cfg0, sweep_config(load_tree(ARGS.params, ARGS.set)).static_sizes, ARGS.quick)
    experiment.preflight(cfg0)
    real = experiment.load_real_data(cfg0)
    generator = experiment.load_generator(cfg0) if experiment.generator_exists(cfg0) else \
        experiment.train_and_save_generator(cfg0, real)[0]  # fmt: skip
    uri = tracking_uri(cfg0)
    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, ARGS.experiment, uri)
    # finished runs are reused only by the same benchmark: the same mode and the same resolved config
    bench = ("quick-" if ARGS.quick else "full-") + hashlib.md5(repr(flatten(cfg0)).encode()).hexdigest()[:8]
    seeds = [ARGS.seeds[0]] if ARGS.quick else ARGS.seeds
    t0 = time.perf_counter()
    done = finished_runs(client, exp_id, bench)
    for arm, overrides in plan:
        for seed in seeds:
            if (arm, str(seed)) in done:
                continue
            cfg = load_config(ARGS.params, [*base, *overrides, f"seed={seed}",
                                            f"output.metrics={ARGS.out}/runs/metrics.json",
                                            f"output.rounds={ARGS.out}/runs/rounds.json"])  # fmt: skip
            console.print(f"{arm} seed {seed} …", end=" ")
            result, tracker, _ = experiment.run_tracked(cfg, generator, real, tags={"dpops.bench": bench, "dpops.arm": arm})
            s = result.summary
            console.print(f"val {s.final_val_acc:.4f} test {s.final_test_acc:.4f} pool {s.pool_size} run {tracker.run_id}")
    wall = time.perf_counter() - t0
    rows = summarise(finished_runs(client, exp_id, bench), [a for a, _ in plan])
    headline = headlines(rows, cfg0)
    console.print(table(rows))
    for line in headline["lines"]:
        console.print(line, soft_wrap=True)
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"rows": rows, "headline": headline, "wall_seconds": wall}, indent=2))
    plot(rows, out / "bench.png")
    console.print(f"benchmark {bench}: wall {wall / 60:.1f} min for the runs this invocation made; wrote {out / 'bench.json'}, "
                  f"{out / 'bench.png'}; runs in MLflow experiment '{ARGS.experiment}' at {uri}", soft_wrap=True)


def summarise(runs: dict[tuple[str, str], dict], order: list[str]) -> list[dict]:
    rows = []
    for arm in order:
        per_seed = [m for (a, _), m in sorted(runs.items()) if a == arm]
        if not per_seed:
            continue
        row = {"arm": arm, "seeds": len(per_seed)}
        for f in FIELDS:
            values = [m[f] for m in per_seed]
            row[f] = statistics.fmean(values)
            row[f + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def headlines(rows: list[dict], cfg) -> dict:
    by = {r["arm"]: r for r in rows}
    static = sorted((r for r in rows if r["arm"].startswith("static")), key=lambda r: r["generated_samples"])
    dp = by.get(f"dp ω={cfg.dp.omega:g}")
    out: dict = {"lines": []}
    if dp is None or len(static) < 2:
        return out
    need = interpolate_samples_for_accuracy([r["generated_samples"] for r in static],
                                            [r["final_test_acc"] for r in static], dp["final_test_acc"])  # fmt: skip
    out["data_multiplier"] = need / dp["generated_samples"]
    out["lines"].append(
        f"data multiplier: static needs {_x(out['data_multiplier'])} the samples DP generated to reach DP's test "
        f"accuracy {dp['final_test_acc']:.4f} ({_n(need)} vs {dp['generated_samples']:.0f}; interpolated in log n "
        "on static's mean accuracies, no extrapolation)"
    )
    over = [r for r in rows if r["arm"].startswith("oversample")]
    reaching = [r for r in over if r["final_test_acc"] >= dp["final_test_acc"]]
    if reaching:
        cheapest = min(reaching, key=lambda r: r["unet_evals"])
        out["compute_multiplier_vs_oversample"] = cheapest["unet_evals"] / dp["unet_evals"]
        out["seconds_multiplier_vs_oversample"] = cheapest["gen_seconds"] / dp["gen_seconds"]
        # UNet evaluations count forward passes; a guided step also back-propagates through the UNet,
        # which generation seconds include: both are reported
        out["lines"].append(f"generation compute vs oversample: {cheapest['arm']} (the cheapest at DP's accuracy or "
                            f"better) uses {_x(out['compute_multiplier_vs_oversample'])} DP's UNet evaluations and "
                            f"{_x(out['seconds_multiplier_vs_oversample'])} its generation seconds")
    elif over:
        best = max(over, key=lambda r: r["final_test_acc"])
        out["compute_multiplier_vs_oversample"] = math.inf
        out["lines"].append(f"generation compute vs oversample: no ratio reached DP's accuracy (best {best['arm']}: "
                            f"{best['final_test_acc']:.4f} with {best['unet_evals'] / dp['unet_evals']:.2f}× DP's "
                            "UNet evaluations)")
    return out


def table(rows: list[dict]) -> Table:
    t = Table("arm", "seeds", "generated", "kept pool", "iters", "gen s", "UNet evals", "val acc", "test acc",
              title="DP vs static vs oversample-then-prune (mean ± sd over seeds)", title_justify="left")
    for r in rows:
        t.add_row(r["arm"], str(r["seeds"]), f"{r['generated_samples']:.0f}", f"{r['pool_size']:.0f}",
                  f"{r['iterations']:.0f}", f"{r['gen_seconds']:.1f}", f"{r['unet_evals']:.3g}",
                  f"{r['final_val_acc']:.4f} ± {r['final_val_acc_sd']:.4f}",
                  f"{r['final_test_acc']:.4f} ± {r['final_test_acc_sd']:.4f}")  # fmt: skip
    return t


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    groups = {"static": [], "dp": [], "oversample": []}
    for r in rows:
        groups[r["arm"].split()[0]].append(r)
    for i, (name, rs) in enumerate(groups.items()):
        if not rs:
            continue
        rs = sorted(rs, key=lambda r: r["generated_samples"])
        ax.errorbar([r["generated_samples"] for r in rs], [r["final_test_acc"] for r in rs],
                    yerr=[r["final_test_acc_sd"] for r in rs], fmt="o-" if name == "static" else "o", color=f"C{i}",
                    capsize=3, label=name)  # fmt: skip
        for r in rs:
            if name != "static":
                ax.annotate(r["arm"].split(" ", 1)[1], (r["generated_samples"], r["final_test_acc"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("generated samples")
    ax.set_ylabel("held-out test accuracy")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _x(v: float) -> str:
    return "∞×" if math.isinf(v) else f"{v:.2f}×"


def _n(v: float) -> str:
    return "more than the largest static size" if math.isinf(v) else f"{v:.0f}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke check: short budget, 1 seed, 2 sizes, r=4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("-S", "--set", action="append", default=[], help="override a params.yaml key")
    parser.add_argument("--experiment", default="dp-ops-bench", help="MLflow experiment of the benchmark runs")
    parser.add_argument("--out", default="results/bench")
    ARGS = parser.parse_args()
    main()
