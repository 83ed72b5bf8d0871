"""Rounds written as fixed parts; the pool streamed from them by a stateless sampler."""

import numpy as np
import pytest
import torch
from scipy import stats

from dp_ops.engine.data import LabelledImages, batch_indices, from_uint8
from dp_ops.engine.loop import round_labels, round_seeds
from dp_ops.engine.pool import Pool
from dp_ops.engine.rounds import Sampling, generate_round, keep_top, top_order
from dp_ops.engine.shards import PartReader, part_name, scan_round, write_part
from dp_ops.records.versioning import md5_file


def _learner(x):
    return x.flatten(1)[:, :10] * 3  # any differentiable logits: guidance and scoring need no training here


def _round(generator, folder, *, n=96, batch=16, part_size=32, parts=None, omega=0.1):
    how = Sampling(steps=3, cfg_scale=2.0, guide_every=1, batch_size=batch, learner=_learner)
    return generate_round(
        generator,
        round_labels(0, 1, n, 10),
        round_seeds(0, 1, n),
        folder,
        how,
        round_index=1,
        omega=omega,
        part_size=part_size,
        fmt="raw",
        parts=parts,
    )


def test_a_part_has_the_same_bytes_whatever_else_is_generated_with_it(tiny_generator, tmp_path):
    """Part p depends on its sample indices only: all parts at once, one part alone, or an uneven subset
    (as ranks of a multi-process run would make them) give identical files, guided."""
    whole = _round(tiny_generator, tmp_path / "whole")
    alone = _round(tiny_generator, tmp_path / "alone", parts=[2])
    some = _round(tiny_generator, tmp_path / "some", parts=[0, 2])
    md5 = {p.index: md5_file(p.path) for p in whole.parts}
    assert len(md5) == 3 and len(set(md5.values())) == 3
    assert md5_file(alone.parts[0].path) == md5[2]
    assert [md5_file(p.path) for p in some.parts] == [md5[0], md5[2]]
    assert [(p.start, p.count) for p in whole.parts] == [(0, 32), (32, 32), (64, 32)]
    # the pool reads back exactly the quantised samples the generator made, in order
    direct = tiny_generator.sample(
        round_labels(0, 1, 96, 10),
        round_seeds(0, 1, 96),
        steps=3,
        cfg_scale=2.0,
        learner=_learner,
        omega=0.1,
        guide_every=1,
        batch_size=16,
    )
    stored = np.concatenate([PartReader(p.path).images() for p in scan_round(tmp_path / "whole")])
    assert torch.equal(from_uint8(torch.from_numpy(stored)), ((direct.images + 1) * 127.5).round() / 127.5 - 1)


def test_keep_top_selects_by_entropy_over_the_whole_round(tiny_generator, tmp_path):
    candidates = _round(tiny_generator, tmp_path / "cand", omega=0.0)
    entropy, images = candidates.entropy.copy(), np.concatenate([PartReader(p.path).images() for p in candidates.parts])
    order = np.argsort(-entropy, kind="stable")[:40]
    assert np.array_equal(top_order(candidates.entropy, 40), order)
    kept = keep_top(candidates, order, tmp_path / "kept", part_size=32, fmt="png")
    assert [p.count for p in kept.parts] == [32, 8]
    assert keep_top(candidates, order, tmp_path / "some", part_size=32, fmt="png", parts=[1]).parts[0].count == 8
    assert np.array_equal(kept.entropy, entropy[order]) and np.array_equal(kept.seeds, round_seeds(0, 1, 96)[order])
    assert np.array_equal(np.concatenate([PartReader(p.path).images() for p in kept.parts]), images[order])


def test_the_sampler_is_uniform_and_stateless():
    a, b = batch_indices(7, 123, 50, 20_000), batch_indices(7, 123, 50, 20_000)
    assert torch.equal(a, b) and not torch.equal(a, batch_indices(7, 124, 50, 20_000))
    assert not torch.equal(a, batch_indices(8, 123, 50, 20_000))
    counts = torch.bincount(a, minlength=50).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform over the pool as it stands
    assert int(batch_indices(0, 5, 7, 1000).max()) == 6  # ... and only over it


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_the_pool_streams_batches_from_its_parts(tmp_path, fmt):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (70, 3, 8, 8), dtype=np.uint8)
    labels = np.arange(70) % 10
    pool = Pool()
    for k, (start, stop) in enumerate([(0, 32), (32, 64), (64, 70)]):
        pool.add(
            [
                write_part(
                    tmp_path / f"r{k}" / part_name(0),
                    images[start:stop],
                    labels[start:stop],
                    np.zeros(stop - start),
                    np.arange(start, stop),
                    round_index=k,
                    index=0,
                    start=0,
                    omega=0.0,
                    fmt=fmt,
                )
            ]
        )
    assert len(pool) == 70
    memory = LabelledImages(torch.from_numpy(images), torch.from_numpy(labels))
    streamed = list(pool.batches(3, 10, 14, 16))
    in_memory = list(memory.batches(3, 10, 14, 16))  # the same (seed, t) keys draw the same samples
    assert len(streamed) == 4
    for (x, y), (x2, y2) in zip(streamed, in_memory, strict=True):
        assert x.dtype == torch.uint8 and torch.equal(x, x2) and torch.equal(y, y2)
    workers = list(pool.batches(3, 10, 14, 16, num_workers=2))
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(streamed, workers, strict=True))
