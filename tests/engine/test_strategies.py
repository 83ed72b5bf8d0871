"""Every entry of the strategy table walked through everything that reads it: the config's names, a tiny
run with one round of its own, its run name, note and summary, what the scaling report leaves out for it,
and the benchmark's plan and run order. A new strategy that forgets a piece fails here, in the fast tier."""

from typing import get_args

import pytest
import yaml

from dp_ops.config import DPConfig, build_config, flatten
from dp_ops.engine.loop import DPLoop
from dp_ops.engine.strategies import STRATEGIES
from dp_ops.records.tracking.names import run_name, run_note
from dp_ops.render import run_summary
from dp_ops.studies.bench import iteration_arms, jobs, plan
from dp_ops.studies.bench_stats import SERIES
from dp_ops.studies.scaling_report import measured

from conftest import tiny_tree


def test_the_table_has_exactly_the_configs_strategies():
    assert sorted(STRATEGIES) == sorted(get_args(DPConfig.model_fields["strategy"].annotation))
    assert all(entry.name == name for name, entry in STRATEGIES.items())


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_makes_its_round_in_a_tiny_run_and_describes_it(name, tiny_generator, real, tmp_path):
    entry = STRATEGIES[name]
    cfg = build_config(tiny_tree(dp={"strategy": name}, train={"iterations": 10, "eval_every": 10}))
    loop = DPLoop(cfg, tiny_generator, real, shards=tmp_path)
    loop._acquire(cfg.dp.initial_size, omega=0.0, keep=cfg.dp.initial_size, trigger=None)  # round 0
    more = loop._next_round()  # what the loop does at a plateau before the cool-down
    assert more == entry.acquire(cfg.dp)
    if more is not None:
        assert 0 < more.keep <= more.n and more.omega >= 0
        loop._acquire(more.n, omega=more.omega, keep=more.keep, trigger=0.5)
        r = loop.records[-1]
        assert (r.round, r.n_generated, r.n_new, r.omega) == (1, more.n, more.keep, more.omega)
    result = loop.run()  # trains on the pool so far and finishes
    assert result.summary.strategy == name and result.summary.pool_size == sum(r.n_new for r in result.records)

    assert run_name(cfg).startswith(f"{name}-") and run_name(cfg).endswith("-seed0")
    assert entry.run_detail(cfg.dp) and entry.note(cfg.dp) in run_note(cfg)
    setting = entry.setting(cfg.dp)
    assert run_summary(cfg, result)[0].startswith(f"[bold]{name}[/] ({setting + ', ' if setting else ''}seed=0): ")
    params = {k: str(v) for k, v in flatten(cfg).items()}
    for key in entry.unused:  # each names config keys (a misspelt one would silently leave nothing out)
        assert any(k == key or (key.endswith(".") and k.startswith(key)) for k in params), key
        assert not any(k.startswith(key) for k in measured(name, params)), key


def test_run_names_and_notes_tell_the_strategies_apart():
    cfgs = [build_config(tiny_tree(dp={"strategy": name})) for name in STRATEGIES]
    assert len({run_name(c) for c in cfgs}) == len({run_note(c) for c in cfgs}) == len(STRATEGIES)


def test_every_strategy_has_bench_arms_each_series_drawn_and_a_run_order(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_tree()))
    bp, _ = plan(params, [], static_sizes=(30, 60), seeds=[0], experiment="e")
    done = {(a.name, s): {"final_val_acc": 0.5} for a in bp.arms for s in bp.seeds}  # (the iteration series too)
    arms = (*bp.arms, *iteration_arms(bp, done))
    assert {a.strategy for a in arms} <= set(STRATEGIES)
    for name, entry in STRATEGIES.items():
        series = {a.series for a in arms if a.strategy == name}
        assert series, f"{name}: no arm in dp_ops.studies.bench.plan"
        assert series == {s.series for s in entry.bench_series}, name  # every series it runs in is drawn
        assert series <= set(SERIES), name  # and can be chosen (--series)
    labels = [s.label for entry in STRATEGIES.values() for s in entry.bench_series]
    assert len(set(labels)) == len(labels)
    order = [STRATEGIES[j.arm.strategy].bench_order for j in jobs(bp, {}, {}, tmp_path, arms)]
    assert order == sorted(order)
