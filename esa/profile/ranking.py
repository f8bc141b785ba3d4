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

import numpy as np
import torch

from esa.core.errors import UserError
from esa.results.tables import CandidateScores, TopK
from esa.spec.manifest import MODES
from esa.spec.weights import matches

__all__ = ["Ranker", "rank_scores", "rank_candidates", "tensor_topk"]

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


class Ranker:
    """The best (or, ``largest=False``, worst) ``k`` weights of tensors offered one at a time.

    mode ``per_layer``: the best ``k`` of each tensor (k capped at its numel; rank within the
    tensor). mode ``global``: the best ``k`` over all tensors by a streaming merge (see the
    module docstring), so a sharded job can offer each tensor as it gathers it and drop it.
    include / exclude are name patterns (see :func:`esa.spec.weights.matches`); a tensor offered
    with its weight fills the ``value`` column of the rows it contributes.
    """

    def __init__(self, k: int, mode: str = "global", largest: bool = True,
                 include: Iterable[str] | str | None = None, exclude: Iterable[str] | str | None = None) -> None:
        if mode not in MODES:
            raise UserError(f"unknown ranking mode {mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise UserError(f"k must be a positive integer, got {k!r}")
        self.k, self.mode, self.largest = int(k), mode, largest
        self.include, self.exclude = include, exclude
        self._names: list[str] = []
        self._shapes: list[tuple[int, ...]] = []
        self._weighted: list[bool] = []
        self._best = _RunningBest(self.k, largest)  # global mode
        self._values: dict[tuple[int, int], float] = {}  # (tensor position, flat index) -> weight value
        self._rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []  # per_layer: name, flat, score, value

    def add(self, name: str, scores: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Offer one tensor's scores (and the weight tensor they score, for the values)."""
        if not matches(name, self.include, self.exclude) or scores.numel() == 0:
            return
        pos = len(self._names)
        self._names.append(name)
        self._shapes.append(tuple(scores.shape))
        self._weighted.append(weight is not None)
        if self.mode == "per_layer":
            vals, flat = tensor_topk(scores, self.k, self.largest, name)
            self._rows.append((name, flat, vals, _values_at(weight, flat, name)))
            return
        for offset, chunk in _chunks(scores.detach().reshape(-1)):
            self._best.offer(pos, offset, chunk, name)
        if weight is not None:  # the candidates this tensor holds now; later evictions are harmless
            mine = self._best.flat[self._best.pos == pos]
            self._values.update({(pos, int(f)): float(v) for f, v in zip(mine, _values_at(weight, mine, name))})

    def result(self, weights_required: bool = False) -> TopK:
        """The ranked list; `weights_required`: every ranked tensor must have been given its weight."""
        if not self._names:
            raise UserError("no scored parameter matches the include/exclude patterns "
                            f"(include={self.include!r}, exclude={self.exclude!r})")
        if self.mode == "per_layer":
            params = [name for name, flat, _, _ in self._rows for _ in flat]
            flat = np.concatenate([r[1] for r in self._rows])
            index = [ix for (name, f, _, _), shape in zip(self._rows, self._shapes) for ix in _unravel(f, shape)]
            out = TopK(params, flat, index, np.concatenate([r[2] for r in self._rows]),
                       np.concatenate([np.arange(1, len(r[1]) + 1, dtype=np.int64) for r in self._rows]),
                       np.concatenate([r[3] for r in self._rows]), mode="per_layer", largest=self.largest, k=self.k)
        else:
            best = self._best
            params = [self._names[p] for p in best.pos]
            index: list[tuple[int, ...]] = [()] * len(params)
            for p in np.unique(best.pos):
                rows = np.nonzero(best.pos == p)[0]
                for r, ix in zip(rows, _unravel(best.flat[rows], self._shapes[p])):
                    index[r] = ix
            values = np.array([self._values.get((int(p), int(f)), np.nan) for p, f in zip(best.pos, best.flat)])
            out = TopK(params, best.flat, index, best.score, np.arange(1, len(params) + 1, dtype=np.int64), values,
                       mode="global", largest=self.largest, k=self.k)
        if weights_required:
            missing = sorted({p for p in out.param if not self._weighted[self._names.index(p)]})
            if missing:
                raise UserError(f"no weight tensor named {missing[0]!r} to read ranked values from")
        return out


def _values_at(weight: torch.Tensor | None, flat: np.ndarray, name: str) -> np.ndarray:
    """The weight's values at flat indices (NaN without a weight)."""
    if weight is None:
        return np.full(len(flat), np.nan)
    w = weight.detach()
    if flat.size and (flat.min() < 0 or flat.max() >= w.numel()):
        raise UserError(f"ranked index out of range for weight {name!r} of shape {tuple(w.shape)}")
    if not w.dim():
        return w.reshape(1).expand(len(flat)).double().cpu().numpy()
    # Index by coordinates so that a non-contiguous weight is never copied whole.
    coords = np.unravel_index(flat, tuple(w.shape))
    return w[tuple(torch.as_tensor(c, device=w.device) for c in coords)].double().cpu().numpy()


def rank_scores(
    scores: Mapping[str, torch.Tensor],
    k: int,
    mode: str = "global",
    largest: bool = True,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> TopK:
    """Rank the weights of a mapping of score tensors (see :class:`Ranker`); ``weights`` (param name
    -> tensor) fills ``value``. A tensor object present under two names (tied parameters) counts once."""
    ranker = Ranker(k, mode, largest, include, exclude)
    seen: set[int] = set()
    for name, t in scores.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        ranker.add(name, t, None if weights is None else weights.get(name))
    return ranker.result(weights_required=weights is not None)


def _unravel(flat: np.ndarray, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    if len(shape) == 0:
        return [() for _ in flat]
    cols = np.unravel_index(flat, shape)
    return list(zip(*(c.tolist() for c in cols)))


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
