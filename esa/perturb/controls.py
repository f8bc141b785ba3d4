"""Control target sets: the null distributions a target perturbation is compared with.

* ``random_k``: for each tensor that holds targets, as many uniformly random weights of the
  same tensor as it holds targets (matched per-tensor counts), targets excluded, without
  replacement. Repeated over seeds it gives the distribution of Δ for "any k weights in the
  same places".
* ``bottom_k``: the k least sensitive weights of a bottom-k ranking (least sensitive first),
  targets excluded; optionally matched per tensor. Deterministic.
* ``magnitude_matched``: like random_k, but drawn among the largest-|W| weights of the same
  tensor (a pool of about ``pool_factor`` times the count). A stronger null than uniform
  random: it asks whether the targets matter more than other *large* weights, which is what
  separates a sensitivity metric from plain magnitude.

Sampling never materialises a permutation of a large tensor: indices are drawn with
replacement and rejected against the excluded set (targets and earlier draws), which costs
O(k) memory; a full permutation is used only where the tensor is small compared with k.
The magnitude pool is found by a chunked top-|W| scan, so no |W| copy of a whole tensor is
made either. All draws come from a seeded CPU generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from esa.core.errors import UserError
from esa.parallel.env import broadcast_object
from esa.parallel.fsdp import gather_to_rank0, is_dtensor
from esa.perturb.targets import (WeightTarget, check_targets_against_shapes, flat_to_index, numel,
                         param_shapes)

__all__ = ["random_k", "bottom_k", "magnitude_matched",
           "magnitude_pool", "counts_per_tensor"]

# Elements of a tensor scanned at once when looking for its largest |W|.
_CHUNK = 1 << 22


def counts_per_tensor(targets: Sequence[WeightTarget]) -> dict[str, int]:
    """Number of targets in each tensor, in order of first appearance."""
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.param] = counts.get(t.param, 0) + 1
    return counts


def _excluded(targets: Sequence[WeightTarget]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for t in targets:
        out.setdefault(t.param, set()).add(t.flat_index)
    return out


def _sample_excluding(n: int, count: int, excluded: set[int], generator: torch.Generator,
                      what: str, clip: bool = False) -> list[int]:
    """``count`` distinct integers in [0, n) outside ``excluded``, uniformly at random
    (``clip``: as many as there are when fewer than ``count`` are left)."""
    available = n - len(excluded)
    if clip:
        count = min(count, available)
    if count > available:
        raise UserError(f"cannot draw {count} control weights from {what}: it has {n} weights, "
                        f"{len(excluded)} of them targets")
    if count <= 0:
        return []
    if 2 * (count + len(excluded)) >= n:
        # Dense request: n is at most twice the O(k) request, so a permutation is cheap.
        perm = torch.randperm(n, generator=generator).tolist()
        return [i for i in perm if i not in excluded][:count]
    chosen: list[int] = []
    taken = set(excluded)
    while len(chosen) < count:
        # Acceptance rate is above 1/2 here, so a draw of twice the shortfall nearly
        # always suffices in one round.
        need = count - len(chosen)
        for i in torch.randint(n, (2 * need + 8,), generator=generator).tolist():
            if i not in taken:
                taken.add(i)
                chosen.append(i)
                if len(chosen) == count:
                    break
    return chosen


def _as_targets(param: str, flats: Iterable[int], shape: tuple[int, ...]) -> list[WeightTarget]:
    return [WeightTarget(param, flat_to_index(f, shape), int(f)) for f in sorted(flats)]


def random_k(named_params: Any, targets: Sequence[WeightTarget],
             generator: torch.Generator, clip: bool = False) -> list[WeightTarget]:
    """Uniform random control set matched to ``targets`` per tensor.

    For every tensor holding c targets, draw c distinct weights of that tensor uniformly
    among its non-target weights. ``named_params`` is a module, a name->tensor or a
    name->shape mapping (only shapes are used). Output: tensors in order of first
    appearance in ``targets``, ascending flat index within each. A tensor with fewer than c
    non-target weights is an error, or with ``clip`` gives all it has (the set is smaller).
    """
    shapes = param_shapes(named_params)
    excluded = _excluded(targets)
    out: list[WeightTarget] = []
    for param, count in counts_per_tensor(targets).items():
        if param not in shapes:
            raise UserError(f"target tensor {param!r} is not among the model's parameters")
        shape = shapes[param]
        flats = _sample_excluding(numel(shape), count, excluded[param], generator, repr(param), clip)
        out.extend(_as_targets(param, flats, shape))
    return out


def bottom_k(named_params: Any, targets: Sequence[WeightTarget],
             ranking: Any, k: int | None = None, per_tensor: bool = False,
             clip: bool = False) -> list[WeightTarget]:
    """The least sensitive weights of ``ranking``, targets excluded.

    ``ranking`` lists weights least sensitive first: a TopK of ``largest=False`` (anything
    with ``.param`` and ``.index`` columns) or an iterable of ``'param:i,j'`` /
    ``(param, index)``. Without ``per_tensor`` the first ``k`` (default: as many as there
    are targets) non-target entries are taken; with ``per_tensor`` each tensor gets as many
    entries of its own as it holds targets (for per_layer rankings). Raises UserError when
    the ranking is too short.
    """
    candidates = check_targets_against_shapes(param_shapes(named_params), ranking)
    taken = {(t.param, t.flat_index) for t in targets}
    candidates = [c for c in candidates if (c.param, c.flat_index) not in taken]
    if not per_tensor:
        k = len(targets) if k is None else int(k)
        if len(candidates) < k:
            raise UserError(f"the bottom-k ranking has {len(candidates)} weights outside the "
                            f"targets; {k} are needed (rank with a larger --topk)")
        return candidates[:k]
    out: list[WeightTarget] = []
    for param, count in counts_per_tensor(targets).items():
        own = [c for c in candidates if c.param == param][:count]
        if len(own) < count and not clip:
            raise UserError(f"the bottom-k ranking has {len(own)} weights of {param!r} outside "
                            f"the targets; {count} are needed")
        out.extend(own)
    return out


def magnitude_pool(tensor: torch.Tensor, size: int, exclude: Iterable[int] = ()) -> torch.Tensor:
    """Flat indices (ascending, CPU int64) of the ``size`` largest-|W| weights of ``tensor``,
    minus ``exclude``.

    Every weight whose |W| equals the size-th largest |W| is included, so the pool does not
    depend on how a top-k kernel breaks ties (it may then hold more than ``size``). NaN
    weights are never in the pool. Scans in chunks: no |W| copy of the whole tensor.
    """
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    size = min(int(size), n)
    if size <= 0:
        return torch.empty(0, dtype=torch.int64)
    best = torch.empty(0, dtype=torch.float32, device=flat.device)
    for start in range(0, n, _CHUNK):
        mag = _magnitude(flat[start:start + _CHUNK])
        both = torch.cat([best, mag])
        best = torch.topk(both, min(size, both.numel())).values
    threshold = best.min()
    parts = []
    for start in range(0, n, _CHUNK):
        mag = _magnitude(flat[start:start + _CHUNK])
        parts.append((torch.nonzero(mag >= threshold).reshape(-1) + start).cpu())
    pool = torch.cat(parts)
    drop = torch.tensor(sorted({int(i) for i in exclude}), dtype=torch.int64)
    return pool[~torch.isin(pool, drop)] if drop.numel() else pool


def _magnitude(chunk: torch.Tensor) -> torch.Tensor:
    """|W| in float32 with NaN mapped below everything (never in a pool)."""
    return torch.nan_to_num(chunk.abs().float(), nan=-1.0)


def magnitude_matched(named_params: Any, targets: Sequence[WeightTarget],
                      generator: torch.Generator, pool_factor: int = 10,
                      min_pool: int = 32, clip: bool = False) -> list[WeightTarget]:
    """Control set drawn among the largest-|W| weights of the targets' own tensors.

    For every tensor holding c targets, the pool is its top ``max(pool_factor*c, min_pool)``
    weights by |W| after the targets are excluded (computed as the top that many plus the
    tensor's target count, then targets removed; ties at the pool edge all join); c distinct
    weights are drawn uniformly from the pool. ``named_params`` must hold tensors (a module or
    a name->tensor mapping). Output order as in :func:`random_k`.
    """
    if pool_factor < 1 or min_pool < 1:
        raise UserError("magnitude_matched needs pool_factor >= 1 and min_pool >= 1")
    params = dict(named_params.named_parameters()) if isinstance(
        named_params, torch.nn.Module) else dict(named_params)
    excluded = _excluded(targets)
    out: list[WeightTarget] = []
    for param, count in counts_per_tensor(targets).items():
        if param not in params:
            raise UserError(f"target tensor {param!r} is not among the model's parameters")
        size = max(pool_factor * count, min_pool) + len(excluded[param])
        shape = tuple(params[param].shape)
        pick = _on_rank0(params[param], lambda t: _draw_from_pool(t, param, count, size, excluded[param],
                                                                  generator, clip))
        out.extend(_as_targets(param, pick, shape))
    return out


def _draw_from_pool(tensor: torch.Tensor, param: str, count: int, size: int, excluded: set[int],
                    generator: torch.Generator, clip: bool) -> list[int]:
    pool = magnitude_pool(tensor, size, excluded)
    if clip:
        count = min(count, pool.numel())
    if pool.numel() < count:
        raise UserError(f"cannot draw {count} magnitude-matched controls from {param!r}: "
                        f"its pool outside the targets holds {pool.numel()} weights")
    return pool[torch.randperm(pool.numel(), generator=generator)[:count]].tolist()


def _on_rank0(tensor: torch.Tensor, draw: Callable[[torch.Tensor], list[int]]) -> list[int]:
    """draw(tensor); for a sharded tensor the whole tensor is gathered on rank 0 (one tensor at a
    time), drawn from there, and the draw (or its error) is sent to every rank."""
    if not is_dtensor(tensor):
        return draw(tensor)
    full = gather_to_rank0(tensor.detach())
    answer: tuple[list[int] | None, str | None] = (None, None)
    if full is not None:
        try:
            answer = (draw(full), None)
        except UserError as exc:
            answer = (None, str(exc))
        del full
    picked, error = broadcast_object(answer)
    if error is not None:
        raise UserError(error)
    return picked  # type: ignore[return-value]
