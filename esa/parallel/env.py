"""The process group of a sharded job (joined and left once per job), this rank's device, and the
few collectives the phases use. Which rank this process is comes from esa.parallel.launch; the
backend is nccl on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from esa.core.errors import UserError
from esa.core.logs import get_logger
from esa.parallel.launch import DistEnv, detect_env

__all__ = ["device_for", "init", "teardown", "distributed_job", "rank",
           "world_size", "is_rank0", "sharded", "comm_device", "barrier", "any_rank", "all_sum", "all_max", "broadcast_object", "all_gather_objects"]

log = get_logger("parallel")
# How long a rank waits in a collective for a peer that died before it gives up (seconds).
TIMEOUT_ENV = "ESA_DIST_TIMEOUT_S"


def device_for(env: DistEnv, prefer: str = "auto") -> torch.device:
    """This rank's device: cuda:LOCAL_RANK (or cuda:0 when each task sees one GPU), or the CPU."""
    if prefer != "cpu" and torch.cuda.is_available():
        # One GPU per task: cuda:LOCAL_RANK, or cuda:0 when each task sees only its own GPU.
        return torch.device("cuda", env.local_rank if torch.cuda.device_count() > 1 else 0)
    if prefer == "cuda":
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible (use --device cpu)")
    return torch.device("cpu")


def init(prefer_device: str = "auto") -> DistEnv:
    """Join the job's process group when it has several ranks (a no-op for one rank, or when this
    process has joined already). The group lives as long as the process: several jobs run in one
    process (`esa profile --seeds`, the in-process executor) share it, because the launcher's
    rendezvous store cannot host a second group of the same ranks."""
    env = detect_env()
    if not env.distributed or dist.is_initialized():
        return env
    device = device_for(env, prefer_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800)))
    dist.init_process_group(backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size, timeout=timeout,
                            **({"device_id": device} if device.type == "cuda" else {}))
    atexit.register(teardown)
    log.info("rank %d of %d (%s) on %s, backend %s", env.rank, env.world_size, env.launcher, device, backend)
    return env


def teardown() -> None:
    """Leave the process group (at exit). Nothing waits for the peers here: after a failure a barrier
    would hang until the timeout, and the launcher (torchrun, srun --kill-on-bad-exit) ends them."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_job(prefer_device: str = "auto") -> Iterator[DistEnv]:
    """One job on every rank: the process group joined on entry; on success the ranks leave the job
    together (a barrier), so no rank starts the next job while another still writes this one's files."""
    env = init(prefer_device)
    yield env
    if env.distributed and sharded():
        dist.barrier()


def sharded() -> bool:
    """Whether this process is one rank of several."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when unsharded)."""
    return dist.get_rank() if sharded() else 0


def world_size() -> int:
    """Ranks of the job (1 when unsharded)."""
    return dist.get_world_size() if sharded() else 1


def is_rank0() -> bool:
    """Whether this process writes the job's files."""
    return rank() == 0


def comm_device() -> torch.device:
    """Where tensors handed to a collective must live (the GPU under nccl, else the CPU)."""
    if sharded() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (a no-op unsharded)."""
    if sharded():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (so that all ranks take the same branch)."""
    if not sharded():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    if not sharded():
        return t
    dev = comm_device()
    if t.device == dev:
        dist.all_reduce(t, op=op)
        return t
    moved = t.to(dev)
    dist.all_reduce(moved, op=op)
    return t.copy_(moved)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks in place (every rank gets the total); returns it."""
    return _reduce(t, dist.ReduceOp.SUM)


def all_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of `t` over the ranks, in place; returns it."""
    return _reduce(t, dist.ReduceOp.MAX)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (small picklable values only)."""
    if not sharded():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small picklable values only)."""
    if not sharded():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
