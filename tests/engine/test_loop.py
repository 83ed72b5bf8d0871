import dataclasses
import math
from itertools import pairwise

import pytest

from dp_ops.config import build_config
from dp_ops.engine.learner import wsd_factor
from dp_ops.engine.loop import Observer, Plateau, patience_for
from helpers import run_experiment

from conftest import tiny_tree


def test_plateau_counts_evaluations_without_improvement():
    p = Plateau(patience=2)
    assert [p.update(a) for a in (0.5, 0.6, 0.6, 0.55)] == [False, False, False, True]
    p.reset(patience=3)
    assert [p.update(a) for a in (0.6, 0.61, 0.6, 0.6, 0.6)] == [False, False, False, False, True]
    assert p.best == 0.61


def test_incremental_patience_grows_with_the_pool():
    cfg = build_config(tiny_tree(dp={"patience": 2, "initial_size": 100, "incremental_patience": True}))
    assert [patience_for(cfg, n) for n in (100, 150, 200, 420)] == [2, 3, 4, 9]
    fixed = build_config(tiny_tree(dp={"patience": 2, "initial_size": 100, "incremental_patience": False}))
    assert patience_for(fixed, 420) == 2


def test_wsd_schedule_warms_up_holds_and_cools_down():
    total = 100
    f = [wsd_factor(i, total, 0.1, 0.2) for i in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:80])
    assert all(a >= b for a, b in pairwise(f[80:])) and f[-1] == pytest.approx(0.0, abs=1e-12)


class Recorder(Observer):
    def __init__(self):
        self.rounds, self.evals, self.round_parts_seen = [], [], []

    def on_eval(self, iteration, val_acc):
        self.evals.append(iteration)

    def on_round(self, record, round_parts):
        self.rounds.append(record)
        self.round_parts_seen.append(round_parts)


def _run(tiny_generator, real, **sections):
    rec = Recorder()
    result = run_experiment(build_config(tiny_tree(**sections)), tiny_generator, real, [rec])
    return result, rec


def test_dp_triggers_guided_rounds_that_grow_the_pool_by_p(tiny_generator, real):
    result, rec = _run(tiny_generator, real)
    rounds = result.records
    assert rounds[0].round == 0 and rounds[0].n_new == 40 and rounds[0].val_acc_at_trigger is None
    assert len(rounds) >= 2, "patience 1 over 6 evaluations must trigger at least one round"
    for prev, cur in pairwise(rounds):
        assert cur.pool_size == prev.pool_size + 20 and cur.n_new == cur.n_generated == 20
        assert cur.val_acc_at_trigger is not None and cur.iteration > prev.iteration
        assert cur.iteration <= 60 - round(0.2 * 60)  # nothing arrives during the cool-down
    s = result.summary
    assert s.pool_size == 40 + 20 * (len(rounds) - 1) and s.generated_samples == s.pool_size
    assert s.iterations == 60 and s.rounds == len(rounds) - 1
    assert rec.evals == [10, 20, 30, 40, 50, 60] and len(result.curve) == 6
    assert 0.0 <= s.final_test_acc <= 1.0 and s.final_val_acc == result.curve[-1][1]
    assert 0.0 <= s.final_ood_acc <= 1.0 and s.to_dict()["final_ood_acc"] == s.final_ood_acc  # on MNIST, reported
    assert [r.round for r in rec.rounds] == list(range(len(rounds)))


def test_a_world_without_an_ood_set_reports_no_ood_accuracy(tiny_generator, real):
    result, _ = _run(tiny_generator, dataclasses.replace(real, ood=None), dp={"strategy": "static"})
    assert result.summary.final_ood_acc is None and "final_ood_acc" not in result.summary.to_dict()


def test_static_never_adds_data(tiny_generator, real):
    result, _ = _run(tiny_generator, real, dp={"strategy": "static", "initial_size": 80})
    assert len(result.records) == 1 and result.summary.pool_size == 80 == result.summary.generated_samples
    assert result.summary.rounds == 0


def test_oversample_keeps_exactly_p_of_ratio_p_with_the_highest_entropy(tiny_generator, real):
    result, rec = _run(tiny_generator, real, dp={"strategy": "oversample"})
    later = result.records[1:]
    assert later, "a round must be triggered"
    for r, inc in zip(later, rec.round_parts_seen[1:], strict=True):
        assert r.n_generated == 60 and r.n_new == 20 == len(inc)
    assert result.summary.generated_samples == 40 + 60 * len(later)
    assert result.summary.pool_size == 40 + 20 * len(later)


def test_oversample_selection_is_the_top_p_by_entropy(tiny_generator, real, tmp_path):
    # Regenerate the same 60 candidates (same seeds and labels, same learner): the kept 20 are the top 20.
    import torch

    from dp_ops.engine.loop import DPLoop, round_labels, round_seeds

    rec = Recorder()
    loop = DPLoop(build_config(tiny_tree(dp={"strategy": "oversample"})), tiny_generator, real, [rec], shards=tmp_path)
    loop._acquire(60, omega=0.0, keep=20, trigger=0.5)
    g = loop.cfg.generator
    candidates = tiny_generator.sample(
        round_labels(0, 0, 60, 10),
        round_seeds(0, 0, 60),
        steps=g.steps,
        cfg_scale=g.cfg_scale,
        learner=loop.trainer.classify,
        batch_size=g.batch_size,
    )
    top = candidates.seeds[torch.argsort(candidates.entropy, descending=True)[:20].numpy()]
    assert sorted(rec.round_parts_seen[0].seeds.tolist()) == sorted(top.tolist())
    assert loop.records[0].n_generated == 60 and loop.records[0].n_new == 20 and len(loop.pool) == 20


def test_max_rounds_caps_acquisitions(tiny_generator, real):
    result, _ = _run(tiny_generator, real, dp={"max_rounds": 1})
    assert result.summary.rounds == 1


def test_same_seed_same_records_different_seed_different(tiny_generator, real):
    def decisions(result):
        timings = {"gen_seconds", "train_seconds"}
        return [{k: v for k, v in dataclasses.asdict(r).items() if k not in timings} for r in result.records], (
            result.curve,
            result.summary.final_test_acc,
        )

    a, _ = _run(tiny_generator, real)
    b, _ = _run(tiny_generator, real)
    c, _ = _run(tiny_generator, real, seed=1)
    assert decisions(a) == decisions(b)
    assert decisions(a) != decisions(c)
    assert not math.isnan(a.summary.final_test_acc)
    # the fast settings too: bfloat16 generation and training, channels-last learner, the x0 gradient
    fast = dict(
        generator={"precision": "bfloat16", "guidance_gradient": "x0"},
        train={"precision": "bfloat16", "channels_last": True},
    )
    d, _ = _run(tiny_generator, real, **fast)
    e, _ = _run(tiny_generator, real, **fast)
    assert decisions(d) == decisions(e)
    assert decisions(d) != decisions(a)
