"""The tables a ranking job produces, as plain columns: ranked lists and per-tensor statistics.

:class:`TopK` is a ranked list (top-k or bottom-k) of individual weights; :class:`TensorStats`
summarises one score tensor (definitions in esa.profile.stats, which computes them). Both are
what scores.h5 stores and what exports and the analysis read. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from esa.spec.weights import format_weight, layer_of, module_type_of

__all__ = ["TopK", "CandidateScores", "TensorStats", "STAT_FIELDS", "stats_columns", "stats_from_columns"]


def _weight_columns(table: Any, ints: tuple[str, ...]) -> None:
    """Coerce a table's weight columns in place (param list, index tuples, flat_index / ``ints`` int64,
    score / value float64, all 1-D) and check that each has one row per param."""
    table.param = list(table.param)
    table.index = [tuple(int(i) for i in ix) for ix in table.index]
    for name in ("flat_index", *ints):
        setattr(table, name, np.asarray(getattr(table, name), dtype=np.int64).reshape(-1))
    for name in ("score", "value"):
        setattr(table, name, np.asarray(getattr(table, name), dtype=np.float64).reshape(-1))
    n = len(table.param)
    for name in ("flat_index", "index", "score", "value", *ints):
        if len(getattr(table, name)) != n:
            raise ValueError(f"{type(table).__name__} column {name!r} has {len(getattr(table, name))} rows, "
                             f"param has {n}")


@dataclass
class TopK:
    """A ranked list of weights as parallel columns (row i describes one weight).

    rank is 1-based: within its tensor for ``per_layer``, over all tensors for ``global``.
    value holds the weight's value when known and NaN otherwise.
    """

    param: list[str]
    flat_index: np.ndarray  # int64
    index: list[tuple[int, ...]]
    score: np.ndarray  # float64
    rank: np.ndarray  # int64, 1-based
    value: np.ndarray  # float64, NaN until filled
    mode: str = "global"
    largest: bool = True
    k: int = 0  # the k that was asked for (rows may be fewer when tensors are small)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _weight_columns(self, ints=("rank",))

    def __len__(self) -> int:
        return len(self.param)

    @classmethod
    def empty(cls, mode: str = "global", largest: bool = True, k: int = 0) -> TopK:
        """A TopK with no rows."""
        return cls([], np.zeros(0, np.int64), [], np.zeros(0), np.zeros(0, np.int64),
                   np.zeros(0), mode=mode, largest=largest, k=k)

    def names(self) -> list[str]:
        """Weight names ``param:i,j`` in row order."""
        return [format_weight(p, ix) for p, ix in zip(self.param, self.index)]

    def to_records(self) -> list[dict[str, Any]]:
        """One plain-Python dict per row (rank, param, index, flat_index, score, value)."""
        return [
            {
                "rank": int(self.rank[i]),
                "param": self.param[i],
                "index": list(self.index[i]),
                "flat_index": int(self.flat_index[i]),
                "score": float(self.score[i]),
                "value": float(self.value[i]),
            }
            for i in range(len(self))
        ]

    def items(self) -> list[tuple[str, tuple[int, ...], float]]:
        """``(param, index, score)`` rows that can be ranked (NaN and -inf scores dropped)."""
        return [(p, ix, float(s)) for p, ix, s in zip(self.param, self.index, self.score)
                if not (math.isnan(s) or s == -math.inf)]

    def counts_by_param(self) -> dict[str, int]:
        """How many rows each parameter holds (used for matched random-k controls)."""
        out: dict[str, int] = {}
        for p in self.param:
            out[p] = out.get(p, 0) + 1
        return out



@dataclass
class CandidateScores:
    """Scores of a candidate set only (a metric that scores some weights, not whole tensors).

    One row per candidate in candidate order: ``order`` is its position in the job's whole
    candidate list (shards of one job hold disjoint slices, merged by ``order``). ``columns``
    holds extra per-row numbers (ablation: delta_nll, delta_ppl, the per-window summary), ``attrs``
    job-level facts (ablation: the baseline NLL, the perturbation), ``csv_name`` the CSV export
    written next to scores.h5 (None: none).
    """

    param: list[str]
    flat_index: np.ndarray  # int64
    index: list[tuple[int, ...]]
    score: np.ndarray  # float64
    value: np.ndarray  # float64: the weight's value, NaN when unknown
    order: np.ndarray  # int64
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    csv_name: str | None = None

    def __post_init__(self) -> None:
        _weight_columns(self, ints=("order",))
        self.columns = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self.columns.items()}
        for name, col in self.columns.items():
            if len(col) != len(self.param):
                raise ValueError(f"CandidateScores column {name!r} has {len(col)} rows, param has {len(self.param)}")

    def __len__(self) -> int:
        return len(self.param)

    def names(self) -> list[str]:
        """Weight names ``param:i,j`` in row order."""
        return [format_weight(p, ix) for p, ix in zip(self.param, self.index)]

    def take(self, rows: Any) -> CandidateScores:
        """The rows ``rows`` (indices or a boolean mask), in that order."""
        rows = np.arange(len(self))[rows] if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        return CandidateScores([self.param[i] for i in rows], self.flat_index[rows], [self.index[i] for i in rows],
                               self.score[rows], self.value[rows], self.order[rows],
                               {k: v[rows] for k, v in self.columns.items()}, dict(self.attrs), self.csv_name)

    @classmethod
    def concat(cls, parts: list[CandidateScores]) -> CandidateScores:
        """Rows of all parts sorted by ``order`` (columns: those every part has; attrs and csv_name of the first)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        keys = [k for k in parts[0].columns if all(k in p.columns for p in parts)]
        joined = cls([p for part in parts for p in part.param],
                     np.concatenate([p.flat_index for p in parts]), [ix for p in parts for ix in p.index],
                     np.concatenate([p.score for p in parts]), np.concatenate([p.value for p in parts]),
                     np.concatenate([p.order for p in parts]),
                     {k: np.concatenate([p.columns[k] for p in parts]) for k in keys},
                     dict(parts[0].attrs), parts[0].csv_name)
        return joined.take(np.argsort(joined.order, kind="stable"))


@dataclass
class TensorStats:
    """Summary of one score tensor (see the module docstring for the definitions)."""

    name: str
    numel: int
    mean: float
    std: float
    min: float
    max: float
    p99: float
    p99_9: float
    kurtosis: float
    topk_k: int
    topk_share: float
    gini: float
    sampled: bool

    @property
    def layer(self) -> int | None:
        """Block index of the parameter, None outside the blocks."""
        return layer_of(self.name)

    @property
    def module_type(self) -> str:
        """Module kind of the parameter (q_proj, c_attn, embed_tokens, ...)."""
        return module_type_of(self.name)

    def to_dict(self) -> dict[str, object]:
        """Plain dict with layer and module_type added (NaN kept as float NaN)."""
        d = asdict(self)
        d["layer"] = self.layer
        d["module_type"] = self.module_type
        return d


STAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TensorStats))


def stats_columns(stats: list[TensorStats]) -> dict[str, np.ndarray | list[str]]:
    """Column form of a stats list (``name`` as list[str], the rest as numpy arrays)."""
    cols: dict[str, np.ndarray | list[str]] = {"name": [s.name for s in stats]}
    for f in fields(TensorStats):
        if f.name == "name":
            continue
        vals = [getattr(s, f.name) for s in stats]
        if f.name in ("numel", "topk_k"):
            cols[f.name] = np.asarray(vals, dtype=np.int64)
        elif f.name == "sampled":
            cols[f.name] = np.asarray(vals, dtype=bool)
        else:
            cols[f.name] = np.asarray(vals, dtype=np.float64)
    return cols


def stats_from_columns(cols: Mapping[str, object]) -> list[TensorStats]:
    """Inverse of :func:`stats_columns`; columns missing from ``cols`` become NaN / 0."""
    names = [str(n) for n in cols["name"]]  # type: ignore[union-attr]
    out = []
    for i, name in enumerate(names):
        kw: dict[str, object] = {"name": name}
        for f in fields(TensorStats):
            if f.name == "name":
                continue
            col = cols.get(f.name)
            if col is None:
                kw[f.name] = 0 if f.name in ("numel", "topk_k") else (
                    False if f.name == "sampled" else float("nan"))
                continue
            v = col[i]  # type: ignore[index]
            if f.name in ("numel", "topk_k"):
                kw[f.name] = int(v)
            elif f.name == "sampled":
                kw[f.name] = bool(v)
            else:
                kw[f.name] = float(v)
        out.append(TensorStats(**kw))  # type: ignore[arg-type]
    return out
