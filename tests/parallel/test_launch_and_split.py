"""The pure parts of sharding: which rank a launcher says this process is, and how work is split."""

from __future__ import annotations

import torch

from esa.parallel.fsdp import shard_rows
from esa.parallel.launch import DistEnv, detect_env, expand_nodelist
from esa.parallel.split import LocalBatch, as_local, eval_steps, local_batches, split_range


def test_torchrun_variables():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
                      "TORCHELASTIC_RUN_ID": "x"})
    assert env == DistEnv(3, 4, 1, "n1", 1234, "torchrun") and env.distributed


def test_srun_tasks():
    env = detect_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
                      "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (1, 2, 1, "gpu07", "slurm")
    assert env.master_port == detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77"}).master_port


def test_one_task_or_nothing_is_unsharded():
    assert not detect_env({}).distributed
    assert not detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "5"}).distributed


def test_nodelists():
    assert expand_nodelist("gpu[01-03,7],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu5"]
    assert expand_nodelist("node1") == ["node1"]
    assert expand_nodelist("a[8-10]b") == ["a8b", "a9b", "a10b"]


def test_split_range_covers_everything_once():
    for n in range(0, 12):
        for world in range(1, 5):
            parts = [split_range(n, world, r) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_shard_rows_match_torch_chunk():
    for rows in (1, 7, 8, 32):
        for world in (1, 2, 3, 4):
            sizes = [b - a for a, b in shard_rows(rows, world)]
            chunks = [len(c) for c in torch.arange(rows).chunk(world)]
            assert sizes == chunks + [0] * (world - len(chunks))


def test_one_rank_batches_are_the_plain_batches():
    windows = torch.arange(7 * 4).view(7, 4)
    parts = list(local_batches(windows, 3, torch.device("cpu")))
    assert [p.ids.shape[0] for p in parts] == [3, 3, 1] and all(p.weight == 1.0 and p.real for p in parts)
    assert [p.n_global for p in parts] == [3, 3, 1]
    assert [p.ids.shape[0] for p in local_batches(windows, 3, torch.device("cpu"), start_batch=2)] == [1]
    local = as_local(windows[:2])
    assert isinstance(local, LocalBatch) and local.ids is not None and (local.weight, local.n_global) == (1.0, 2)
    assert as_local(local) is local
    assert list(eval_steps(7, 3)) == [(0, 3, True), (3, 6, True), (6, 7, True)]
