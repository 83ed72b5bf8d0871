"""The world of a run's processes, without starting any (the collectives run in tests/test_distributed.py)."""

import pytest
import torch

from dp_ops.config import TrainConfig, build_config
from dp_ops.engine import dist, folders
from dp_ops.engine.dist import SINGLE, World, from_env
from dp_ops.engine.learner import micro_batches
from dp_ops.errors import ConfigError

from conftest import make_image_folder

TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}


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


def test_chunk_rows_are_the_rows_of_each_ranks_block_of_chunks():
    assert [World(rank=r, size=2).chunk_rows(10, 3) for r in range(2)] == [range(0, 6), range(6, 10)]
    assert [World(rank=r, size=3).chunk_rows(4, 4) for r in range(3)] == [range(0, 4), range(4, 4), range(4, 4)]
    assert SINGLE.chunk_rows(7, 2) == range(7)


@pytest.fixture
def no_cuda_calls(monkeypatch):
    """Any CUDA query fails the test: what is checked here must not need a GPU (or reach one)."""
    for name in ("is_available", "device_count", "set_device"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, n=name: pytest.fail(f"torch.cuda.{n} called"))


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_cuda_n_under_torchrun_is_refused_before_any_work(device, monkeypatch, no_cuda_calls):
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        dist.join(device)  # (no process group was started: refused first)
    assert str(info.value).startswith(f"device='{device}': under torchrun every process would use that one GPU; ")
    assert "use device=cuda or device=auto (each process then takes cuda:LOCAL_RANK" in str(info.value)
    assert not torch.distributed.is_initialized()
    assert World(size=2).device("cpu") == torch.device("cpu")  # (the CPU, as before)


def test_one_process_on_cuda_n_makes_that_gpu_current(monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert dist.join("cuda:2") == SINGLE and current == [torch.device("cuda", 2)]  # (not GPU 0)
    for device in ("cpu", "cuda", "cuda:7"):  # GPU 0 already; or an error of check_devices, later
        dist.join(device)
    assert current == [torch.device("cuda", 2)]


def _folder_data(tmp_path):
    make_image_folder(tmp_path / "val", per_class=5)  # 15 images: chunks of 4 are 4 + 4 | 4 + 3
    make_image_folder(tmp_path / "test", per_class=2, seed=1)  # 6: 4 | 2
    tree = {"name": "folder", "val_root": str(tmp_path / "val"), "test_root": str(tmp_path / "test"), "resolution": 8}
    return build_config({"generator": {"backend": "sd", "model": "unused"}, "data": tree}).data


def test_each_rank_decodes_only_its_block_of_a_folder_split_and_the_blocks_make_it_whole(tmp_path, monkeypatch):
    cfg = _folder_data(tmp_path)
    whole = folders.load_folder_data(cfg)
    assert whole.val.split_size is None  # one process: the whole split
    read, decode = [], folders.read_image
    monkeypatch.setattr(folders, "read_image", lambda path, *a: read.append(path) or decode(path, *a))
    ranks = []
    for rank in range(2):
        read.clear()
        ranks.append(folders.load_folder_data(cfg, world=World(rank=rank, size=2), chunk=4))
        assert len(read) == len(ranks[-1].val) + len(ranks[-1].test)  # decoded: its own rows, nothing else
    assert [len(r.val) for r in ranks] == [8, 7] and [len(r.test) for r in ranks] == [4, 2]
    for split in ("val", "test"):
        parts = [getattr(r, split) for r in ranks]
        assert {p.split_size for p in parts} == {len(getattr(whole, split))}
        assert torch.equal(torch.cat([p.images for p in parts]), getattr(whole, split).images)
        assert torch.equal(torch.cat([p.labels for p in parts]), getattr(whole, split).labels)


def test_more_ranks_than_chunks_leaves_a_rank_an_empty_block(tmp_path):
    cfg = _folder_data(tmp_path)
    last = folders.load_folder_data(cfg, world=World(rank=2, size=3), chunk=8)  # 6 test rows: one chunk
    assert last.test.images.shape == (0, 3, 8, 8) and last.test.images.dtype == torch.uint8
    assert last.test.split_size == 6 and len(last.val) == 0


def test_restarts_under_torchrun_name_the_run_by_the_rendezvous_id():
    from dp_ops.engine.dist import elastic_run_id

    assert elastic_run_id({}) is None  # not under torchrun
    assert elastic_run_id({"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "abc"}) is None
    assert elastic_run_id({"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_RUN_ID": "4711"}) == "4711"
    with pytest.raises(ConfigError, match=r"--max-restarts > 0 without --rdzv-id.*dpops run --run-name NAME"):
        elastic_run_id({"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_RUN_ID": "none"})


def _cgroup(tmp_path, line, files):
    """A fake /proc/self/cgroup holding ``line`` and a /sys/fs/cgroup tree of ``files`` (path: text)."""
    root = tmp_path / "cgroup"
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(line + "\n")
    return root, proc


@pytest.mark.parametrize(
    ("line", "files", "env", "expected"),
    [
        ("0::/", {}, {}, 16),  # nothing limits it: its affinity
        ("0::/", {"cpu.max": "max 100000"}, {}, 16),
        ("0::/job/step", {"job/step/cpu.max": "max 100000", "job/cpu.max": "400000 100000"}, {}, 4),  # a parent's
        ("0::/job", {"job/cpu.max": "150000 100000"}, {}, 1),  # 1.5 CPUs: rounded down
        ("0::/job", {"job/cpu.max": "20000 100000"}, {}, 1),  # at least one
        ("0::/host/path", {"cpu.max": "300000 100000"}, {}, 3),  # (a container's own cgroup as its root)
        ("4:cpu,cpuacct:/docker/x", {"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, {}, 2),
        ("4:cpu,cpuacct:/", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, {}, 16),  # v1, none
        ("0::/", {}, {"SLURM_CPUS_PER_TASK": "6"}, 6),
        ("0::/", {"cpu.max": "300000 100000"}, {"SLURM_CPUS_PER_TASK": "6"}, 3),  # the smallest of all
    ],
)
def test_available_cpus_are_the_affinity_less_a_cgroup_quota_and_slurms_share(
    tmp_path, monkeypatch, line, files, env, expected
):
    """Not os.cpu_count(): a container limited to 2 of 64 cores, or a Slurm task of 6, offers that many."""
    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: set(range(16)))
    root, proc = _cgroup(tmp_path, line, files)
    assert dist.available_cpus(env, root, proc) == expected


def test_auto_threads_are_the_users_omp_setting_one_per_torchrun_process_or_the_cpus(monkeypatch):
    monkeypatch.setattr(dist, "available_cpus", lambda env=None: 12)
    two = World(rank=1, size=2, local_rank=1, local_size=2)
    assert dist.thread_count(3, SINGLE, {"OMP_NUM_THREADS": "5"}) == 3  # the key wins
    assert dist.thread_count(3, two, {}) == 3
    assert dist.thread_count(0, SINGLE, {"OMP_NUM_THREADS": "5"}) == 5
    assert dist.thread_count(0, two, {"OMP_NUM_THREADS": "1"}) == 1  # (what torchrun sets)
    assert dist.thread_count(0, two, {}) == 1  # several processes on the node: one each
    assert dist.thread_count(0, World(rank=1, size=2, local_size=1), {}) == 12  # (one per node)
    assert dist.thread_count(0, SINGLE, {}) == 12
    assert dist.thread_count(0, SINGLE, {"OMP_NUM_THREADS": "zero"}) == 12  # (unreadable: ignored)


def test_use_threads_gives_torch_that_many_and_the_run_records_it():
    before = torch.get_num_threads()
    try:
        assert dist.use_threads(2) == 2 and torch.get_num_threads() == 2
        assert dist.threads_tag() == {"dpops.torch_threads": "2"}
        assert dist.use_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
