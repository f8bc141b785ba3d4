"""Which windows a phase-2 job calibrates on: the seed picks them from a pool; shards split them."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from esa.core.errors import UserError


def select_windows(n_available: int, n_samples: int | None, pool_size: int | None, seed: int) -> torch.Tensor:
    """Indices (ascending) of the calibration windows.

    The pool is the first `pool_size` windows (default: all); the seed draws `n_samples` of them
    without replacement (default: the whole pool, so every seed sees the same windows and a
    deterministic metric gives identical scores).
    """
    pool = n_available if pool_size is None else min(pool_size, n_available)
    if pool < 1:
        raise UserError("the calibration pool is empty")
    n = pool if n_samples is None else n_samples
    if n > pool:
        raise UserError(f"--max-samples {n} is larger than the calibration pool of {pool} windows "
                        "(raise --pool-size or lower --max-samples)")
    if n == pool:
        return torch.arange(pool)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(pool, generator=gen)[:n].sort().values


def shard_slice(indices: torch.Tensor, shard: int, n_shards: int, batch_size: int = 1) -> torch.Tensor:
    """The contiguous run of whole batches of `indices` that shard `shard` of `n_shards` owns.

    Shards split at batch boundaries: gradient metrics average per-batch gradients, so the
    shards' batches must be exactly the unsharded run's batches for the sums to add up to it.
    """
    first, stop = shard_batches(len(indices), shard, n_shards, batch_size)
    return indices[first * batch_size:stop * batch_size]


def shard_batches(n_windows: int, shard: int, n_shards: int, batch_size: int) -> tuple[int, int]:
    """[first, stop) batch indices of shard `shard` of `n_shards` (empty when n > batches)."""
    n_batches = -(-n_windows // batch_size)
    own = torch.tensor_split(torch.arange(n_batches), n_shards)[shard]
    if len(own) == 0:
        return 0, 0
    return int(own[0]), int(own[-1]) + 1


def batches(windows: torch.Tensor, batch_size: int, device: torch.device,
            start_batch: int = 0) -> Iterator[torch.Tensor]:
    """Batches of windows on `device`, optionally resuming at batch `start_batch`."""
    for start in range(start_batch * batch_size, len(windows), batch_size):
        yield windows[start:start + batch_size].to(device)
