"""Splitting a job's windows over its ranks so that a sharded run equals an unsharded one.

Calibration (phase 2): every global batch of `data.batch_size` windows is split over the ranks
(`local_batches`). Each rank backpropagates its part's mean loss times world · n_local / n_batch;
FSDP2 averages the ranks' gradients, so every parameter's gradient is exactly the gradient of the
global batch's mean loss — the unsharded run's. A rank with no window in a batch (a last batch
smaller than the world) still runs one window with weight 0: every forward and backward is a
collective all ranks take part in. Forward-only metrics use the same batches and ignore the
weight-0 ones.

Evaluation (phases 1, 3): each rank takes a contiguous run of the windows; per-window results are
gathered back in window order (`all_gather_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

from esa.parallel.env import comm_device, rank, world_size

__all__ = ["LocalBatch", "as_local", "split_range", "local_batches", "eval_steps", "all_gather_rows"]


class LocalBatch(NamedTuple):
    """This rank's part of one global calibration batch."""

    ids: torch.Tensor  # LongTensor [n_local, T] (one stand-in window when n_local is 0)
    weight: float  # multiplies the local mean loss: world * n_local / n_global (0 for a stand-in)
    n_global: int  # windows in the global batch
    first: int = 0  # position of the first local window in the global batch

    @property
    def real(self) -> bool:
        """False for a stand-in (a rank with no window in this batch); its results are ignored."""
        return self.weight > 0


def as_local(item: torch.Tensor | LocalBatch) -> LocalBatch:
    """A plain batch [B, T] is a whole global batch of one rank."""
    if isinstance(item, LocalBatch):
        return item
    return LocalBatch(item, 1.0, int(item.shape[0]) if item.dim() else 1)


def split_range(n: int, world: int, r: int) -> tuple[int, int]:
    """[start, stop) of part r of n items split into `world` contiguous parts (the first n % world
    parts get one more)."""
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def local_batches(windows: torch.Tensor, batch_size: int, device: torch.device,
                  start_batch: int = 0) -> Iterator[LocalBatch]:
    """This rank's part of each global batch of `windows`, from global batch `start_batch` on."""
    world, me = world_size(), rank()
    for start in range(start_batch * batch_size, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        a, b = split_range(len(batch), world, me)
        if b > a:
            yield LocalBatch(batch[a:b].to(device), world * (b - a) / len(batch), len(batch), a)
        else:
            yield LocalBatch(batch[:1].to(device), 0.0, len(batch))


def eval_steps(n_windows: int, batch_size: int) -> Iterator[tuple[int, int, bool]]:
    """(start, stop, real) of this rank's evaluation batches over its contiguous part of the windows;
    every rank yields the same number of steps (a stand-in step has real False and repeats a window)."""
    world, me = world_size(), rank()
    parts = [split_range(n_windows, world, r) for r in range(world)]
    local_batch = max(1, math.ceil(batch_size / world))
    steps = max(math.ceil((b - a) / local_batch) for a, b in parts)
    a, b = parts[me]
    for i in range(steps):
        s = a + i * local_batch
        if s < b:
            yield s, min(s + local_batch, b), True
        else:
            first = min(a, n_windows - 1)
            yield first, first + 1, False


def all_gather_rows(local: torch.Tensor, n_total: int) -> torch.Tensor:
    """Every rank's rows of a contiguous split (split_range) of `n_total`, in order, on every rank."""
    world = world_size()
    if world == 1:
        return local
    sizes = [split_range(n_total, world, r) for r in range(world)]
    width = max(b - a for a, b in sizes)
    device = comm_device()
    pad = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=device)
    pad[:local.shape[0]] = local.to(device)
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:b - a] for p, (a, b) in zip(parts, sizes)]).to(local.device)
