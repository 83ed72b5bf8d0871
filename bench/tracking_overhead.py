"""Share of a round's wall time spent on tracking + versioning (MLflow runs, shard + `dvc add`,
checkpoint), per round, over a run with many rounds. Target: <= 5%, not growing with the round index.

    .venv/bin/python bench/tracking_overhead.py [-S key=value ...]

Runs in a temporary git + DVC workspace with a temporary SQLite MLflow store, using the generator at
generator.path (trained first if absent). Defaults give 10+ rounds: small P, patience 1, no growth.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dp_ops import runner
from dp_ops.config import load_config
from dp_ops.engine.loop import DPLoop, Observer
from dp_ops.paths import generator_exists
from dp_ops.records.checkpoint import Checkpointer
from dp_ops.records.tracking import MlflowTracker, TrackingStore
from dp_ops.records.versioning import DvcVersioner

DEFAULTS = ["dp.round_size=100", "dp.patience=1", "dp.incremental_patience=false", "train.eval_every=50"]


class Timed(Observer):
    """Forwards every hook to ``inner``; adds the seconds of its round hooks to ``ledger[round]``."""

    def __init__(self, inner: Observer, ledger: dict[int, float]) -> None:
        self.inner, self.ledger, self.round = inner, ledger, 0

    def _timed(self, hook, *args) -> None:
        t0 = time.perf_counter()
        hook(*args)
        self.ledger[self.round] = self.ledger.get(self.round, 0.0) + time.perf_counter() - t0

    def on_round(self, record, round_parts) -> None:
        self.round = record.round
        self._timed(self.inner.on_round, record, round_parts)

    def on_checkpoint(self, state) -> None:
        self._timed(self.inner.on_checkpoint, state)

    def on_eval(self, iteration, val_acc) -> None:
        self.inner.on_eval(iteration, val_acc)  # one metric per evaluation; counted as training time

    def on_finish(self, result) -> None:
        self.inner.on_finish(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-S", "--set", action="append", default=[])
    args = ap.parse_args()
    repo = Path.cwd()
    cfg = load_config(repo / "params.yaml" if (repo / "params.yaml").exists() else None, [*DEFAULTS, *args.set])
    real = runner.load_real_data(cfg)
    generator = runner.load_generator(cfg) if generator_exists(cfg) else runner.train_and_save_generator(cfg, real)[0]
    ledger: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        subprocess.run(["git", "init", "-q", tmp], check=True)
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True, env=env, cwd=tmp)
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": f"sqlite:///{tmp}/mlflow.db"})})
        tracker = MlflowTracker(TrackingStore.from_config(cfg), cfg)
        records = runner.RunRecords(
            tracker, DvcVersioner(Path(tmp) / "data" / tracker.run_id)
        )  # as run_tracked wires them
        edges = [Timed(o, ledger) for o in (records, Checkpointer(Path(tmp) / "ckpt" / "state.pt"))]
        with tracker.lifecycle():
            result = DPLoop(cfg, generator, real, edges, shards=records.versioner.data_dir).run()
    print(
        f"# {len(result.records)} rounds, P={cfg.dp.round_size}, {cfg.train.iterations} iterations; "
        "round wall = generation + training since the previous round + tracking/versioning"
    )
    print(f"{'round':>5}{'pool':>7}{'gen s':>8}{'train s':>9}{'track+ver s':>13}{'share':>8}")
    for r in result.records:
        overhead = ledger.get(r.round, 0.0)
        wall = r.gen_seconds + r.train_seconds + overhead
        print(
            f"{r.round:>5}{r.pool_size:>7}{r.gen_seconds:>8.2f}{r.train_seconds:>9.2f}{overhead:>13.2f}"
            f"{overhead / wall:>8.1%}"
        )
    total = sum(ledger.values())
    wall = result.summary.gen_seconds + result.summary.train_seconds + total
    print(f"total: tracking+versioning {total:.1f} s of {wall:.1f} s = {total / wall:.1%}")


if __name__ == "__main__":
    main()
