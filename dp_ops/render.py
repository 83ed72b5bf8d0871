"""What the CLI shows: progress bars fed by loop events, and the end-of-run table and summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Column, Table

from dp_ops.config import Config
from dp_ops.engine.loop import Observer, RoundRecord, RunResult
from dp_ops.engine.rounds import RoundParts

if TYPE_CHECKING:  # types only: `dpops run` imports this module and must not import scipy or the studies
    from dp_ops.studies.bench import JobResult
    from dp_ops.studies.bench_stats import ArmStats


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

    def on_round(self, record: RoundRecord, increment: RoundParts) -> None:
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
    """What a strategy's rounds were made with: ω guides dp's; oversample keeps the most uncertain of an
    unguided batch; static makes no round after round 0."""
    dp = cfg.dp
    if strategy == "dp":
        return f"ω={dp.omega:g}, "
    if strategy == "oversample":
        return f"keeps {dp.round_size} of {dp.round_size * dp.oversample_ratio} unguided per round, "
    return ""


def plural(n: int, word: str) -> str:
    """``1 round``, ``2 rounds``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def bench_table(rows: Sequence[ArmStats]) -> Table:
    """The benchmark's one table: an arm per row, mean ± sd over its seeds."""
    seeds = sorted({r.seeds for r in rows})
    table = Table(
        "arm",
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
