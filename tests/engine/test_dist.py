"""The world of a run's processes, without starting any (the collectives run in tests/test_distributed.py)."""

import pytest
import torch

from dp_ops.config import TrainConfig
from dp_ops.engine.dist import SINGLE, World, from_env
from dp_ops.engine.learner import micro_batches
from dp_ops.errors import ConfigError


@pytest.mark.parametrize(("n", "size"), [(5, 2), (3, 2), (2, 3), (0, 2), (9, 4), (7, 1)])
def test_blocks_are_contiguous_cover_everything_once_and_differ_by_at_most_one(n, size):
    blocks = [World(rank=r, size=size).block(n) for r in range(size)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert [len(b) for b in blocks] == sorted((len(b) for b in blocks), reverse=True)  # the first ranks get more


def test_one_process_is_a_world_of_one_whose_collectives_do_nothing():
    assert from_env({}) == SINGLE and not SINGLE.distributed and SINGLE.main and SINGLE.local_main
    assert SINGLE.all_sum([3, 4]) == [3, 4] and SINGLE.broadcast("x") == "x" and SINGLE.all_gather(1) == [1]
    SINGLE.barrier()


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    world = from_env(env)
    assert (world.rank, world.size, world.local_rank, world.node) == (3, 4, 1, 1)
    assert not world.main and not world.local_main and world.distributed
    assert world.device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="RANK=4, WORLD_SIZE=4"):
        from_env({**env, "RANK": "4"})
    with pytest.raises(ConfigError, match="not integers"):
        from_env({**env, "WORLD_SIZE": "four"})


def test_micro_batches_default_to_one_per_process_and_must_be_shared_evenly():
    assert micro_batches(TrainConfig(batch_size=16), SINGLE) == 1
    assert micro_batches(TrainConfig(batch_size=16), World(size=2)) == 2
    assert micro_batches(TrainConfig(batch_size=16, micro_batches=4), World(size=2)) == 4
    with pytest.raises(ConfigError, match=r"train.micro_batches=2: must be a multiple of the run's 4 processes"):
        micro_batches(TrainConfig(batch_size=16, micro_batches=2), World(size=4))
    with pytest.raises(ConfigError, match=r"train.batch_size=18: must be divisible by the 4 micro-batches"):
        micro_batches(TrainConfig(batch_size=18), World(size=4))
