"""What the CLI shows: progress bars fed by loop events, the end-of-run table and summary, and what each study
prints (the sweep's trials and best, the scaling table and headline, the benchmark's lines, table and headline).

Here, apart from the commands, so that :mod:`dp_ops.cli` only builds configs, calls the library and hands
its results to these printers, and every number is formatted in one place (multipliers: :func:`times`).
Heavy or optional modules (the studies, MLflow's helpers) are imported by the printer that needs them:
``dpops run`` imports this module. It imports torch (:class:`RichObserver` is a loop observer), so the light
commands (``config show``, ``theory``) print their one table themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table

from dp_ops.config import Config
from dp_ops.engine.loop import Observer, RoundRecord, RunResult
from dp_ops.engine.rounds import RoundParts
from dp_ops.engine.strategies import STRATEGIES

if TYPE_CHECKING:  # types only: `dpops run` imports this module and must not import scipy or the studies
    from dp_ops.engine.dist import World
    from dp_ops.engine.quality import Quality
    from dp_ops.runner import TrackedRun
    from dp_ops.studies.bench import BenchReport, JobResult, Prepared
    from dp_ops.studies.bench_stats import ArmStats, Headline
    from dp_ops.studies.scaling_report import ScalingHeadline, ScalingReport
    from dp_ops.studies.sweep import SweepOutcome, TrialOutcome


def progress_bars(console: Console) -> Progress:
    """The display every long command shows its bars in (one line each: what, bar, count, elapsed, left)."""
    return Progress(
        TextColumn("[bold]{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def bar(progress: Progress, description: str) -> Callable[[int, int], None]:
    """A progress callback whose bar appears (and starts its clock) at the first update."""
    tasks: list[TaskID] = []

    def update(completed: int, total: int) -> None:
        if not tasks:
            tasks.append(progress.add_task(description, total=total))
        progress.update(tasks[0], completed=completed, total=total)

    return update


class RichObserver(Observer):
    """One bar for training (whole budget) and one per round of generation."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._train: TaskID | None = None
        self._gen: TaskID | None = None
        self._round = 0
        self._acc = float("nan")

    def on_progress(self, task: str, completed: int, total: int) -> None:
        if task == "train":
            if self._train is None:
                self._train = self.progress.add_task("train learner", total=total)
            self.progress.update(self._train, completed=completed, description=self._train_label())
        else:
            if self._gen is None:
                self._gen = self.progress.add_task(f"generate round {self._round}", total=total)
            self.progress.update(self._gen, completed=completed, total=total)

    def on_eval(self, iteration: int, val_acc: float) -> None:
        # (the loop reports a chunk's iterations, then evaluates: shown now, not at the next chunk's
        # progress, the bar says the evaluation just made, the run's last one included)
        self._acc = val_acc
        if self._train is not None:
            self.progress.update(self._train, description=self._train_label())

    def _train_label(self) -> str:
        return f"train (val {self._acc:.3f})"

    def on_round(self, record: RoundRecord, round_parts: RoundParts) -> None:
        if self._gen is not None:
            self.progress.remove_task(self._gen)
            self._gen = None
        self._round = record.round + 1


def rounds_table(result: RunResult) -> Table:
    table = Table(
        title="rounds (trigger: val acc that triggered it; H: learner entropy of new samples, nats)",
        title_justify="left",
    )
    for col in ("round", "iter", "trigger", "new", "gen'd", "pool", "H mean", "H p90", "T_max", "gen s", "train s"):
        table.add_column(col, justify="right")
    for r in result.records:
        trigger = "—" if r.val_acc_at_trigger is None else f"{r.val_acc_at_trigger:.3f}"
        table.add_row(
            str(r.round),
            str(r.iteration),
            trigger,
            str(r.n_new),
            str(r.n_generated),
            str(r.pool_size),
            f"{r.entropy_mean:.3f}",
            f"{r.entropy_p90:.3f}",
            str(r.patience),
            f"{r.gen_seconds:.1f}",
            f"{r.train_seconds:.1f}",
        )
    return table


def print_run(console: Console, cfg: Config, result: RunResult) -> None:
    console.print(rounds_table(result))
    console.print("\n".join(run_summary(cfg, result)), soft_wrap=True)


def run_summary(cfg: Config, result: RunResult) -> list[str]:
    """The lines under the rounds table: what ran and how well, what it used, where its files are."""
    s = result.summary
    acquired = "round 0 only" if s.rounds == 0 else f"round 0 and {plural(s.rounds, 'more round')}"
    ood = "" if s.final_ood_acc is None else f"; OOD acc {s.final_ood_acc:.4f} on {OOD_SETS[cfg.data.name]}"
    return [
        f"[bold]{s.strategy}[/] ({_setting(cfg, s.strategy)}seed={cfg.seed}): "
        f"final val acc [bold]{s.final_val_acc:.4f}[/], held-out test acc [bold]{s.final_test_acc:.4f}[/] "
        f"(best val {s.best_val_acc:.4f}){ood}",
        f"pool {plural(s.pool_size, 'sample')} from {s.generated_samples} generated in {acquired}; "
        f"{plural(s.iterations, 'iteration')}; generation {s.gen_seconds:.1f} s, training {s.train_seconds:.1f} s",
        f"metrics: {cfg.output.metrics}   rounds: {cfg.output.rounds}   curve: {cfg.output.curve}",
    ]


# what an embedded world's learner is also scored on at the end (RealData.ood), by data.name
OOD_SETS = {"digits": "the 5,000 MNIST digits", "mnist": "the 1,797 scikit-learn digits"}


def _setting(cfg: Config, strategy: str) -> str:
    """What a strategy's rounds were made with (its entry of the strategy table says), followed by ", ";
    nothing for a strategy with no setting (static makes no round after round 0)."""
    setting = STRATEGIES[strategy].setting(cfg.dp)
    return f"{setting}, " if setting else ""


def plural(n: int, word: str) -> str:
    """``1 round``, ``2 rounds``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def bench_table(rows: Sequence[ArmStats]) -> Table:
    """The benchmark's one table: an arm per row, mean ± sd over its seeds."""
    seeds = sorted({r.seeds for r in rows})
    table = Table(
        "arm",
        "seeds",
        "generated",
        "kept pool",
        "iters",
        "gen s",
        "model evals",
        *(Column(name, no_wrap=True, min_width=13) for name in ("val acc", "test acc", "OOD acc")),  # mean±sd whole
        title=f"DP vs static vs oversample-then-prune: mean ± sd over {'/'.join(map(str, seeds)) or 'no'} seed(s)",
        title_justify="left",
    )
    for r in rows:
        m, sd = r.mean, r.sd
        table.add_row(
            r.arm,
            str(r.seeds),
            f"{m['generated_samples']:,.0f}",
            f"{m['pool_size']:,.0f}",
            f"{m['iterations']:,.0f}",
            f"{m['gen_seconds']:.1f}",
            f"{m['model_evals']:.3g}",
            f"{m['final_val_acc']:.4f}±{sd['final_val_acc']:.4f}",
            f"{m['final_test_acc']:.4f}±{sd['final_test_acc']:.4f}",
            _mean_sd(m, sd, "final_ood_acc"),
        )
    return table


def _mean_sd(mean: dict[str, float], sd: dict[str, float], key: str) -> str:
    """``mean±sd`` to 4 places; ``—`` where no run of the arm has the metric (NaN)."""
    value = mean.get(key, math.nan)
    return "—" if math.isnan(value) else f"{value:.4f}±{sd[key]:.4f}"


def print_bench_result(console: Console, r: JobResult) -> None:
    """One line per benchmark run as it ends."""
    if r.metrics is not None:
        m = r.metrics
        console.print(
            f"{r.arm} seed {r.seed}: val {m['final_val_acc']:.4f} test {m['final_test_acc']:.4f} "
            f"pool {m['pool_size']} generated {m['generated_samples']}  run {r.run_id}"
            + (" (resumed)" if r.resumed else ""),
            soft_wrap=True,
            highlight=False,
        )
    elif r.error:
        console.print(f"[red]{r.arm} seed {r.seed} FAILED[/]: {r.error}", soft_wrap=True, highlight=False)


def times(v: float | None, never: str = "∞×") -> str:
    """A multiplier as every report prints it, ``2.50×``: ``never`` where it is ∞ (the other arm never got
    there), ``—`` where there is none (None)."""
    if v is None:
        return "—"
    return never if math.isinf(v) else f"{v:.2f}×"


# ---- dpops run ---------------------------------------------------------------------------------------
VERSIONING_NOTES = {
    "none": "not in a DVC workspace: md5s recorded, files not versioned",
    "dvc stage outs": "versioned by the dvc.yaml stage outputs",
    "dvc add": "each round added to DVC, one .dvc file for the run",
}


def print_tracked(console: Console, cfg: Config, run: TrackedRun) -> None:
    """The end of ``dpops run`` on rank 0: the rounds table and summary, then where the run is recorded (its
    MLflow run, model and data) and the DVC commands left to the user."""
    from dp_ops.records.tracking import browse_hint, run_url

    print_run(console, cfg, run.result)
    tracker, versioner = run.tracker, run.versioner
    assert tracker is not None and versioner is not None  # (rank 0's run)
    store, model = tracker.store, run.model
    page = run_url(store.uri, tracker.experiment_id, run.run_id)
    lines = [
        f"MLflow run [bold]{run.run_id}[/] ({plural(len(tracker.round_run_ids), 'round run')}) in experiment "
        f"'{tracker.experiment_name}' at {store.uri}",
        f"  browse: {browse_hint(store.uri)}",
        *([f"  page:   {page}"] if page else []),
    ]
    if model is not None:
        registered = "" if model.version is None else f", registered as {model.registered_name} v{model.version}"
        lines.append(f"  model:  runs:/{run.run_id}/model (mlflow.pytorch.load_model{registered})")
    lines.append(f"  data:   {versioner.data_dir}/ ({VERSIONING_NOTES[versioner.mode]})")
    hint = versioner.commit_hint()  # (none inside dvc repro, whose dvc.lock records the outputs, or without DVC)
    if hint:
        lines.append(f"  {hint}")
    push = versioner.push_hint()  # (none when every round was pushed to the default remote already)
    if push:
        lines.append(f"  {push}")
    console.print(
        "\n".join(lines),
        soft_wrap=True,  # never break a path or a command in two
    )


def resume_hint(exc: KeyboardInterrupt, params: Path | None, overrides: list[str] | None) -> str:
    """What a stopped ``dpops run`` says: which run ended KILLED and the command that resumes it (with the
    options that chose its tracking store and its output locations)."""
    run_id, resumable = getattr(exc, "run_id", None), getattr(exc, "resumable", False)
    if run_id is None:
        return ""
    if not resumable:
        return f"run {run_id} ended KILLED before its first round completed (nothing to resume); start it again"
    store = [f"-S {o}" for o in overrides or () if o.strip().startswith(("tracking.", "output."))]
    named = [o.partition("=")[2] for o in overrides or () if o.strip().startswith("tracking.run_name=")]
    if named:  # (a named run: the same command resumes it)
        store = [o for o in store if not o.startswith("-S tracking.run_name=")] + [f"--run-name {named[-1]}"]
    resume = [] if named else [f"--resume {run_id}"]
    command = " ".join(["dpops run", *([f"--params {params}"] if params else []), *store, *resume])
    return f"run {run_id} ended KILLED at its last completed round; resume it with: {command}"


def generator_saved(cfg: Config, quality: Quality) -> str:
    """What ``dpops generator train`` says of the generator it saved: where, and how good."""
    return (
        f"Saved to [bold]{cfg.generator.path}[/]. A judge trained on real digits "
        f"(real test accuracy {quality.judge_test_acc:.1%}) recognises [bold]{quality.recognition:.1%}[/] "
        f"of {quality.n_samples} unguided samples ({cfg.generator.steps} DDIM steps, CFG {cfg.generator.cfg_scale:g})."
    )


# ---- dpops sweep ---------------------------------------------------------------------------------------
def print_trial(console: Console, progress: Progress, o: TrialOutcome) -> None:
    """A trial this worker finished: its bars removed, one line in their place."""
    from dp_ops.studies.sweep import fmt_params

    for task in list(progress.task_ids):  # the finished trial's bars
        progress.remove_task(task)
    value = "" if o.values is None else " → " + ", ".join(f"{v:.4g}" for v in o.values)
    error = f" ({o.error})" if o.error else ""
    console.print(
        f"trial {o.number} {o.state}: {fmt_params(o.params)}{value}  run {o.mlflow_run_id}{error}",
        soft_wrap=True,
        highlight=False,
    )


def print_sweep(console: Console, outcome: SweepOutcome, experiment_name: str, uri: str) -> None:
    """The end of a sweep worker: the study's budget, its best trial or Pareto front and how to replay it,
    and where to browse the runs and the study."""
    from dp_ops.records.tracking import browse_hint
    from dp_ops.studies.sweep import dashboard_command, fmt_params, replay_command

    go_on = "raise --n-trials to extend it" if outcome.counted >= outcome.budget else "run again to continue it"
    console.print(
        f"this worker ran {plural(len(outcome.ran), 'trial')}; the study has {outcome.counted}/{outcome.budget} "
        f"of its budget ({go_on})"
    )
    if not outcome.best:
        console.print("no trial has completed yet")
    table = Table(
        "trial",
        "params",
        "objective",
        "MLflow run",
        box=None,
        title="best" if len(outcome.best) == 1 else "Pareto front (final_val_acc ↑, generated_samples ↓)",
        title_justify="left",
    )
    for t in outcome.best:
        table.add_row(
            str(t.number),
            fmt_params(t.params),
            ", ".join(f"{v:.4g}" for v in t.values),
            str(t.user_attrs.get("dpops.mlflow_run_id")),
        )
    if outcome.best:
        console.print(table)
        console.print(
            f"replay the best: {replay_command(outcome.best[0])}\n"
            f"   or with DVC: {replay_command(outcome.best[0], 'dvc')}",
            soft_wrap=True,
            highlight=False,
        )
    console.print(
        f"runs: experiment '{experiment_name}' — {browse_hint(uri)}\n"
        f"study: {dashboard_command(outcome.storage)}   (pip install optuna-dashboard)",
        soft_wrap=True,
        highlight=False,
    )


# ---- dpops scaling -------------------------------------------------------------------------------------
def print_scaling(console: Console, report: ScalingReport, files: Sequence[Path]) -> None:
    """``dpops scaling``'s report: the laws' table, the groups left unfitted and why, the headline, its files."""
    console.print(scaling_table(report))
    for s, why in report.unfitted.items():
        console.print(f"{s}: no fit ({why})", soft_wrap=True)
    print_scaling_headline(console, report.headline, report.no_headline)
    console.print(f"wrote {files[0]} and {files[1]}")


def scaling_table(report: ScalingReport) -> Table:
    """One row per fitted law: its points, parameters with their 95% intervals, samples needed per target."""
    targets: dict[str, float] = next(iter(report.targets.values()), {})
    table = Table(
        "strategy",
        "points",
        "a [95% CI]",
        "α [95% CI]",
        "c [95% CI]",
        *(f"n for {t}" for t in targets),
        title=f"error = a·n^(−α) + c; n = {report.x}, accuracy = {report.metric}",
        title_justify="left",
    )
    for s, f in report.fits.items():
        ci = lambda v, lo_hi: f"{v:.3g} [{lo_hi[0]:.3g}, {lo_hi[1]:.3g}]"
        need = [("∞" if _unreachable(n) else f"{n:,.0f}") for n in report.targets[s].values()]
        table.add_row(s, str(f.n_points), ci(f.a, f.a_ci), ci(f.alpha, f.alpha_ci), ci(f.c, f.c_ci), *need)
    return table


NEVER_REACHED = "∞× (never reached)"


def print_scaling_headline(console: Console, h: ScalingHeadline | None, why: str) -> None:
    """The scaling report's multipliers in words, or why there are none."""
    if h is None:
        console.print(f"no data multiplier: {why}", soft_wrap=True, highlight=False)
        return
    fit = h.data_multiplier_fit
    against = f", read against {h.static_group}" if h.static_group is not None else ""  # (runs of other settings)
    console.print(
        f"DP's best run (by validation accuracy): accuracy {h.dp_accuracy:.4f} with {h.dp_samples:.0f} "
        f"samples (run {h.dp_run}){against}\n"
        f"data multiplier: static needs {times(h.data_multiplier_points, NEVER_REACHED)} the samples (points, no fit)"
        + (
            ""
            if fit is None
            else f", {times(fit, NEVER_REACHED)} by its fitted law ({h.static_samples_needed_fit:,.0f} samples"
            + (", extrapolated beyond the largest static pool)" if h.fit_extrapolated else ")")
        )
        + _laws_line(h)
        + f"\niteration multiplier: static needs {times(h.iteration_multiplier, NEVER_REACHED)} the iterations to "
        f"reach val {h.dp_val_acc:.4f} ({h.static_iterations_to_val:.0f} vs {h.dp_iterations_to_val:.0f})",
        soft_wrap=True,
    )


def _laws_line(h: ScalingHeadline) -> str:
    """The data multiplier from the two fitted laws, if both strategies have one."""
    if h.data_multiplier_laws is None or h.data_multiplier_laws_ci is None:
        return ""
    lo, hi = h.data_multiplier_laws_ci
    shown = [times(v, NEVER_REACHED) for v in (lo, hi)]
    ci = "" if lo is None or math.isnan(lo) else f", 95% interval [{shown[0]}, {shown[1]}]"
    need = "∞" if _unreachable(h.static_samples_needed_law) else f"{h.static_samples_needed_law:,.0f}"
    return (
        f"\nfrom the two fitted laws ({h.data_multiplier_laws_verdict}): static needs "
        f"{times(h.data_multiplier_laws, NEVER_REACHED)} the samples DP needs for {h.dp_accuracy:.4f} "
        f"({need} vs {h.dp_samples_needed_law:,.0f}{ci})"
    )


def _unreachable(v: float | None) -> bool:
    """∞ in memory, ``null`` once written to JSON: either way never reached."""
    return v is None or math.isinf(v)


# ---- dpops bench ---------------------------------------------------------------------------------------
def bench_intro(p: Prepared, world: World) -> str:
    """The benchmark's first line: its arms and seeds, and what this invocation has left to run, and how."""
    where = (
        f"across {world.size} processes, one after another"
        if world.distributed
        else (f"in {p.workers} worker(s) × {p.threads} thread(s)")
    )
    return (
        f"benchmark [bold]{p.plan.bench_id}[/]: {len(p.plan.arms)} arms (and static at "
        f"{', '.join(f'{k}×' for k in p.plan.iteration_factors)} the budget at its best size) × "
        f"{len(p.plan.seeds)} seed(s); "
        f"{p.finished} run(s) finished earlier, {p.resuming} to resume, {len(p.todo)} to run {where}"
    )


def print_bench_report(console: Console, report: BenchReport, p: Prepared, experiment: str, wall: float) -> None:
    """The benchmark's end: its table, its headline in words, and where its files, runs and report are."""
    from dp_ops.records.tracking import browse_hint
    from dp_ops.studies.bench import scaling_command

    console.print(bench_table(report.rows))
    h = report.headline
    lines = bench_headline_lines(h) if h else ["no headline: it needs dp and 2 static sizes"]
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)
    console.print(
        f"wall {wall / 60:.1f} min for the run(s) made now; wrote {report.json_path} and "
        f"{report.png_path}\nruns and report (MLflow run {report.run_id}, dpops.role=benchmark): experiment "
        f"'{experiment}' — {browse_hint(p.uri)}\n"
        f"scaling laws from these runs: {scaling_command(p)}",
        soft_wrap=True,
        highlight=False,
    )


def bench_headline_lines(h: Headline) -> list[str]:
    """The headline in words, one sentence per figure: its word (resolved / bound / not resolved), the figure,
    its 95% interval and its per-seed values."""
    lines = []
    word = {name: f"{name} ({h.verdicts[name]})" for name in h.verdicts}
    if h.static_reached:
        lines.append(
            f"{word['data multiplier']}: static needs {times(h.data_multiplier)} the samples {h.dp_arm} generated "
            f"to reach its test accuracy {h.dp_test_acc:.4f}{_interval(h, 'data multiplier')} "
            f"({h.static_samples_needed:,.0f} vs {h.dp_samples:,.0f}; static's mean accuracies interpolated in "
            f"log n; per DP seed: {_seeds(h.data_multiplier_per_seed)})"
        )
    else:
        lines.append(
            f"{word['data multiplier']}: more than {times(h.data_multiplier)}{_interval(h, 'data multiplier')} — "
            f"no static size reached {h.dp_arm}'s test accuracy {h.dp_test_acc:.4f} with {h.dp_samples:,.0f} "
            f"samples (per DP seed: {_seeds(h.data_multiplier_per_seed)})"
        )
    if h.iteration_multiplier is not None and h.iterations_reached:
        lines.append(
            f"{word['iteration multiplier']}: {h.static_best} needs {times(h.iteration_multiplier)} DP's "
            f"{h.dp_iterations:,.0f} iterations to reach its test accuracy{_interval(h, 'iteration multiplier')} "
            f"({h.static_iterations_needed:,.0f}, read off its 1×/2×/4× budget runs in log iterations; per DP seed: "
            f"{_seeds(h.iteration_multiplier_per_seed)})"
        )
    elif h.iteration_multiplier is not None:
        lines.append(
            f"{word['iteration multiplier']}: more than {times(h.iteration_multiplier)}"
            f"{_interval(h, 'iteration multiplier')} — {h.static_best} (static's best size by validation) did not "
            f"reach DP's test accuracy even with {times(h.iteration_multiplier)} DP's iterations (per DP seed: "
            f"{_seeds(h.iteration_multiplier_per_seed)})"
        )
    if h.oversample_arm is not None:
        name, seeds = "generation compute vs oversample", _seeds(h.compute_multiplier_per_seed)
        if h.oversample_reached:
            lines.append(
                f"{word[name]}: {h.oversample_arm}, the cheapest ratio at DP's test accuracy or better, uses "
                f"{times(h.compute_multiplier)} DP's model evaluations{_interval(h, name)} (per seed: {seeds}) "
                f"and {times(h.seconds_multiplier)} its generation seconds"
            )
        else:
            lines.append(
                f"{word[name]}: no ratio reached DP's test accuracy; the most accurate, {h.oversample_arm}, used "
                f"{times(h.compute_multiplier)} DP's model evaluations{_interval(h, name)} (per seed: {seeds}) "
                f"and {times(h.seconds_multiplier)} its generation seconds"
            )
    if h.ood_gain is not None:
        lines.append(
            f"{word['OOD gain']}: {h.dp_arm} − {h.static_best} = {h.ood_gain:+.4f} out-of-distribution accuracy"
            f"{_interval(h, 'OOD gain')} (sd {h.ood_gain_sd:.4f})"
        )
    if h.guidance_effect is not None:
        lines.append(
            f"{word['guidance effect']}: {h.dp_arm} − dp ω=0 = {h.guidance_effect:+.4f} test accuracy"
            f"{_interval(h, 'guidance effect')} (sd {h.guidance_effect_sd:.4f})"
        )
    return lines


def _interval(h: Headline, name: str) -> str:
    """``, 95% interval [a, b] (how, over n seeds)``: multipliers as :func:`times`, differences signed; an
    open end where it is infinite, or where a multiplier's is 0 (one seed: no interval, ``(0×, ∞×)``)."""
    ci = h.intervals[name]
    if ci.method == "t":  # (a difference: signed; a multiplier is bootstrapped)
        low, high = (f"{v:+.4f}" if math.isfinite(v) else ("−∞" if v < 0 else "+∞") for v in (ci.low, ci.high))
        open_low = math.isinf(ci.low)
    else:
        open_low = ci.low <= 0
        low, high = "0×" if open_low else times(ci.low), times(ci.high)
    how = "t over paired seeds" if ci.method == "t" else "bootstrap over seeds"
    opening, closing = "(" if open_low else "[", ")" if math.isinf(ci.high) else "]"
    return f", 95% interval {opening}{low}, {high}{closing} ({how}, {ci.seeds})"


def _seeds(values: dict[int, float]) -> str:
    return ", ".join(times(v) for _, v in sorted(values.items())) or "—"
