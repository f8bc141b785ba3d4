"""Ranking of individual weights by score: top-k / bottom-k, per tensor or over the model.

``per_layer`` ranks within each parameter tensor; ``global`` ranks over every scored tensor
by a streaming merge: each tensor is read in slices (on its own device), each slice offers
its best candidates, and only a running best-``k`` list is kept -- all scores are never
concatenated, and the extra memory is O(k + slice) however large the model. Once k
candidates are held, a slice offers only elements that beat the current k-th score.

Ties are broken deterministically: by score, then by the tensor's position in the input
mapping, then by flat index (lower first). This holds across the k-th boundary too: among
equal scores the lower flat index is selected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from esa.core.errors import UserError
from esa.results.tables import CandidateScores, TopK
from esa.spec.manifest import MODES
from esa.spec.weights import matches

__all__ = ["rank_scores", "rank_candidates", "tensor_topk", "fill_values"]

# Scores are ranked in slices of this many elements: torch.topk on CPU copies its input
# (values and int64 indices), so slicing bounds that temporary memory to ~12 bytes x chunk
# however large the tensor (an 8B model's embedding has 525M scores).
_CHUNK = 1 << 22
_CHUNK_CUDA = 1 << 26


class _RunningBest:
    """The best ``k`` candidates seen so far, as numpy columns sorted best first.

    Candidates arrive chunk by chunk (a chunk = a slice of one tensor's flattened scores).
    Once k candidates are kept, a chunk contributes only elements strictly better than the
    worst kept score: an equal element always comes later (higher tensor position, or same
    tensor and higher flat index), so it loses the tie. Keeping the tie rule exact is what
    makes this pruning safe, and the pruning is what makes streaming cheap: most chunks of
    a large model then cost a single max (or min) reduction.
    """

    def __init__(self, k: int, largest: bool) -> None:
        self.k = k
        self.largest = largest
        self.score = np.zeros(0, np.float64)
        self.pos = np.zeros(0, np.int64)
        self.flat = np.zeros(0, np.int64)

    def offer(self, pos: int, offset: int, chunk: torch.Tensor, name: str) -> None:
        """Consider one chunk of tensor number ``pos`` starting at flat index ``offset``."""
        # One reduction pass both detects NaN (max/min propagate it) and, once k candidates
        # are held, lets a chunk with nothing better be skipped without further passes.
        extreme = float(chunk.max() if self.largest else chunk.min())
        if math.isnan(extreme):
            raise UserError(f"scores of {name!r} contain NaN; refusing to rank them "
                            "(a NaN must not silently win or lose a ranking)")
        if len(self.score) < self.k:
            vals, idx = _chunk_topk(chunk, min(self.k, chunk.numel()), self.largest)
        else:
            worst = float(self.score[-1])
            if not (extreme > worst if self.largest else extreme < worst):
                return
            if float(torch.tensor(worst, dtype=chunk.dtype)) != worst:
                chunk = chunk.double()  # compare exactly when the dtypes differ
            idx = torch.nonzero(chunk > worst if self.largest else chunk < worst).reshape(-1)
            if idx.numel() <= self.k:
                # Every element that beats the current k-th is a candidate: no topk needed.
                vals, idx = _sorted_best_first(chunk[idx], idx, self.largest, idx_sorted=True)
            else:
                del idx
                vals, idx = _chunk_topk(chunk, self.k, self.largest)
        s = np.concatenate([self.score, vals.double().cpu().numpy()])
        p = np.concatenate([self.pos, np.full(vals.numel(), pos, np.int64)])
        f = np.concatenate([self.flat, idx.cpu().numpy().astype(np.int64) + offset])
        # Both runs are sorted by (score, tensor position, flat index), and every new
        # candidate comes after every kept one in (position, flat index). So a *stable* sort
        # on the score alone gives the full tie order, and on two sorted runs it is linear.
        keep = np.argsort(-s if self.largest else s, kind="stable")[: self.k]
        self.score, self.pos, self.flat = s[keep], p[keep], f[keep]


def _chunks(flat: torch.Tensor) -> Iterable[tuple[int, torch.Tensor]]:
    """(offset, view) slices of a flat tensor, each at most the device's chunk length."""
    step = _CHUNK_CUDA if flat.device.type == "cuda" else _CHUNK
    for start in range(0, flat.numel(), step):
        yield start, flat[start:start + step]


def _sorted_best_first(vals: torch.Tensor, idx: torch.Tensor, largest: bool,
                       idx_sorted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort candidates by value (best first), equal values by ascending index."""
    if not idx_sorted:
        by_index = torch.argsort(idx)
        vals, idx = vals[by_index], idx[by_index]
    order = torch.argsort(vals, descending=largest, stable=True)
    return vals[order], idx[order]


def _chunk_topk(chunk: torch.Tensor, k: int, largest: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of one chunk, best first; equal scores by ascending index (also at the
    k-th boundary, where torch.topk alone may pick any of the tied elements)."""
    n = chunk.numel()
    if k >= n:
        order = torch.argsort(chunk, descending=largest, stable=True)
        return chunk[order], order
    vals, idx = torch.topk(chunk, k, largest=largest, sorted=False)
    kth = vals.min() if largest else vals.max()
    if int((chunk == kth).sum()) > int((vals == kth).sum()):
        # The k-th value is tied with elements topk left out: its choice among them is
        # arbitrary, so keep everything strictly better and the lowest tied indices.
        idx_better = idx[vals != kth]
        idx_tied = torch.nonzero(chunk == kth).reshape(-1)[: k - idx_better.numel()]
        idx = torch.cat([idx_better, idx_tied])
        vals = chunk[idx]
    return _sorted_best_first(vals, idx, largest)


def tensor_topk(scores: torch.Tensor, k: int, largest: bool = True,
                name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Top-k (or bottom-k) of one tensor with deterministic ties, chunk by chunk.

    Returns numpy ``(scores float64, flat_indices int64)`` ordered best first, equal scores
    by ascending flat index; ``k`` is capped at numel. Raises UserError on NaN.
    """
    best = _RunningBest(max(0, int(k)), largest)
    if best.k:
        for offset, chunk in _chunks(scores.detach().reshape(-1)):
            best.offer(0, offset, chunk, name)
    return best.score, best.flat


def rank_scores(
    scores: Mapping[str, torch.Tensor],
    k: int,
    mode: str = "global",
    largest: bool = True,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> TopK:
    """Rank weights by score.

    mode ``per_layer``: the best ``k`` of each tensor (k capped at its numel; rank within the
    tensor). mode ``global``: the best ``k`` over all tensors by a streaming merge.
    ``largest=False`` gives the bottom-k the same way. include / exclude are name patterns
    (see :func:`esa.spec.weights.matches`). ``weights`` (param name -> tensor) fills ``value``.
    """
    if mode not in MODES:
        raise UserError(f"unknown ranking mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise UserError(f"k must be a positive integer, got {k!r}")
    selected = _select(scores, include, exclude)
    if not selected:
        raise UserError("no scored parameter matches the include/exclude patterns "
                        f"(include={include!r}, exclude={exclude!r})")
    if mode == "per_layer":
        out = _rank_per_tensor(selected, int(k), largest)
    else:
        out = _rank_global(selected, int(k), largest)
    if weights is not None:
        fill_values(out, weights)
    return out


def _select(scores: Mapping[str, torch.Tensor], include: Any, exclude: Any
            ) -> list[tuple[str, torch.Tensor]]:
    """Filtered (name, tensor) pairs in input order; a tensor object seen twice (tied
    parameters under two names) and empty tensors are dropped."""
    seen: set[int] = set()
    out = []
    for name, t in scores.items():
        if not matches(name, include, exclude) or t.numel() == 0 or id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, t))
    return out


def _unravel(flat: np.ndarray, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    if len(shape) == 0:
        return [() for _ in flat]
    cols = np.unravel_index(flat, shape)
    return list(zip(*(c.tolist() for c in cols)))


def _rank_per_tensor(selected: list[tuple[str, torch.Tensor]], k: int, largest: bool) -> TopK:
    params: list[str] = []
    flats, scores_, ranks = [], [], []
    index: list[tuple[int, ...]] = []
    for name, t in selected:
        vals, flat = tensor_topk(t, k, largest, name)
        params.extend([name] * len(flat))
        flats.append(flat)
        scores_.append(vals)
        ranks.append(np.arange(1, len(flat) + 1, dtype=np.int64))
        index.extend(_unravel(flat, tuple(t.shape)))
    n = len(params)
    return TopK(params, np.concatenate(flats), index, np.concatenate(scores_),
                np.concatenate(ranks), np.full(n, np.nan), mode="per_layer",
                largest=largest, k=k)


def _rank_global(selected: list[tuple[str, torch.Tensor]], k: int, largest: bool) -> TopK:
    best = _RunningBest(k, largest)
    for pos, (name, t) in enumerate(selected):
        # reshape(-1) is a view for the contiguous score buffers metrics produce.
        for offset, chunk in _chunks(t.detach().reshape(-1)):
            best.offer(pos, offset, chunk, name)
    params = [selected[p][0] for p in best.pos]
    index: list[tuple[int, ...]] = [()] * len(params)
    for p in np.unique(best.pos):
        rows = np.nonzero(best.pos == p)[0]
        for r, ix in zip(rows, _unravel(best.flat[rows], tuple(selected[p][1].shape))):
            index[r] = ix
    n = len(params)
    return TopK(params, best.flat, index, best.score, np.arange(1, n + 1, dtype=np.int64),
                np.full(n, np.nan), mode="global", largest=largest, k=k)


def fill_values(topk: TopK, weights: Mapping[str, torch.Tensor]) -> TopK:
    """Fill ``topk.value`` in place from ``weights`` (param name -> tensor); returns topk.

    Raises UserError when a ranked parameter is missing from ``weights`` or its shape does
    not contain the ranked index.
    """
    rows_by_param: dict[str, list[int]] = {}
    for i, p in enumerate(topk.param):
        rows_by_param.setdefault(p, []).append(i)
    for p, rows in rows_by_param.items():
        if p not in weights:
            raise UserError(f"no weight tensor named {p!r} to read ranked values from")
        w = weights[p].detach()
        flat = topk.flat_index[rows]
        if flat.size and (flat.min() < 0 or flat.max() >= w.numel()):
            raise UserError(f"ranked index out of range for weight {p!r} of shape "
                            f"{tuple(w.shape)}")
        # Index by coordinates so that a non-contiguous weight is never copied whole.
        coords = np.unravel_index(flat, tuple(w.shape)) if w.dim() else ()
        sel = w[tuple(torch.as_tensor(c, device=w.device) for c in coords)] if w.dim() else \
            w.reshape(1).expand(len(rows))
        topk.value[rows] = sel.double().cpu().numpy()
    return topk


def rank_candidates(table: CandidateScores, k: int, mode: str = "global", largest: bool = True,
                    include: Iterable[str] | str | None = None, exclude: Iterable[str] | str | None = None,
                    tensor_order: Iterable[str] | None = None) -> TopK:
    """Rank sparse candidate scores the way :func:`rank_scores` ranks dense ones.

    ``global``: the best ``k`` candidates; ``per_layer``: the best ``k`` of each tensor (rank within
    it). Ties: by tensor position (``tensor_order``, e.g. the model's parameter order; default:
    first appearance in the table), then flat index. NaN scores raise UserError; +-inf are ranked.
    """
    if mode not in MODES:
        raise UserError(f"unknown ranking mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise UserError(f"k must be a positive integer, got {k!r}")
    rows = [i for i, p in enumerate(table.param) if matches(p, include, exclude)]
    if not rows:
        raise UserError("no candidate matches the include/exclude patterns "
                        f"(include={include!r}, exclude={exclude!r})")
    if np.isnan(table.score[rows]).any():
        bad = table.param[rows[int(np.flatnonzero(np.isnan(table.score[rows]))[0])]]
        raise UserError(f"candidate scores of {bad!r} contain NaN; refusing to rank them")
    position = {name: i for i, name in enumerate(dict.fromkeys([*(tensor_order or []), *table.param]))}
    sign = -1.0 if largest else 1.0
    order = sorted(rows, key=lambda i: (sign * table.score[i], position[table.param[i]], int(table.flat_index[i])))
    if mode == "global":
        chosen = order[:k]
        ranks = list(range(1, len(chosen) + 1))
    else:
        seen: dict[str, int] = {}
        chosen, ranks = [], []
        for i in sorted(order, key=lambda i: position[table.param[i]]):  # stable: score order within a tensor
            seen[table.param[i]] = seen.get(table.param[i], 0) + 1
            if seen[table.param[i]] <= k:
                chosen.append(i)
                ranks.append(seen[table.param[i]])
    return TopK([table.param[i] for i in chosen], table.flat_index[chosen], [table.index[i] for i in chosen],
                table.score[chosen], np.asarray(ranks, dtype=np.int64), table.value[chosen], mode=mode,
                largest=largest, k=int(k))
