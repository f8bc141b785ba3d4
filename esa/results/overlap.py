"""Overlap and rank agreement between ranked top-k weight lists, and multi-seed stability.

Reads ``top_weights.csv`` files (columns ``rank,param,layer,index,flat_index,score,value``)
or in-memory ``(param, index, score)`` items; never imports torch.

Definitions (every number in ``overlap_report.json`` / ``stability_summary.json``):

* **Granularity** ``by``:

  - ``parameter``: the key is the exact weight ``param:i,j``; its score is the weight's score.
  - ``tensor``: the key is the parameter name; its *aggregated score* is the **sum of the
    scores of that tensor's weights in the list** (so a tensor with many or large top-k
    entries ranks high).
  - ``layer``: the key is the transformer block index as a string (``"0"``, ``"1"``, ...);
    weights outside the blocks (embeddings, final norm, lm_head) share the key ``"other"``.
    Aggregated score as for ``tensor`` (sum).

  A list's *set* at a granularity is the set of keys present in it.

* **jaccard** = \\|A∩B\\| / \\|A∪B\\|; undefined (``None``, JSON ``null``) when both sets are
  empty. **overlap_coefficient** = \\|A∩B\\| / min(\\|A\\|, \\|B\\|); undefined when either
  set is empty.

* **spearman** / **kendall** (``scipy.stats.spearmanr`` / ``kendalltau``, tau-b, which
  corrects for ties) are computed over the UNION of the two sets. Each list gives one score
  vector over the union: its (aggregated) score where the key is present, and for an absent
  key a sentinel strictly below every present score of that list, namely
  ``min_present - (1 + |min_present|)`` (a finite stand-in for -inf: absent keys rank last,
  tied with each other). Only the order matters to both statistics, so the sentinel's exact
  value does not. A correlation is undefined (``None`` / ``null``) when the union has fewer
  than two keys or either vector is constant (e.g. an empty list, or all scores equal).

* **Stability** across seeds: the same statistics for every pair of seeds (all pairs, not
  only consecutive ones); ``jaccard_mean`` / ``jaccard_std`` are the mean and the population
  standard deviation (ddof=0) over the pairs whose value is defined.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from esa.core.errors import UserError
from esa.core.io import atomic_write_text
from esa.spec.weights import layer_of

__all__ = [
    "GRANULARITIES",
    "OTHER_LAYER",
    "RankedItem",
    "RankedList",
    "load_ranked_list",
    "ranked_list_from_items",
    "aggregate",
    "jaccard",
    "overlap_coefficient",
    "union_score_vectors",
    "rank_correlations",
    "overlap_stats",
    "pairwise_overlap",
    "overlap_matrix",
    "overlap_report",
    "write_overlap_report",
    "stability_summary",
    "stability_from_sets",
    "write_stability_summary",
]

GRANULARITIES = ("parameter", "tensor", "layer")
OTHER_LAYER = "other"
TOPK_CSV_NAME = "top_weights.csv"
# Columns the statistics need; `layer` is read when present and otherwise derived from the
# parameter name, `rank` is kept for reference only.
_REQUIRED_COLUMNS = ("param", "index", "score")


@dataclass(frozen=True)
class RankedItem:
    """One weight of a ranked list: parameter name, multi-index, score and block index."""

    param: str
    index: tuple[int, ...]
    score: float
    layer: int | None = None
    rank: int | None = None

    @property
    def key(self) -> str:
        """The weight's canonical name ``param:i,j``."""
        return f"{self.param}:{','.join(str(i) for i in self.index)}"


@dataclass(frozen=True)
class RankedList:
    """A named top-k list (``name`` is usually the CSV path it was read from)."""

    name: str
    items: tuple[RankedItem, ...]

    def __len__(self) -> int:
        return len(self.items)


# --------------------------------------------------------------------------- loading


def load_ranked_list(path: str | os.PathLike[str], name: str | None = None) -> RankedList:
    """Read a ``top_weights.csv`` (or a folder holding one) into a :class:`RankedList`.

    Raises UserError for a missing or unreadable file, missing columns (param, index, score),
    a non-numeric score, a malformed index or a weight listed twice.
    """
    p = Path(path)
    if p.is_dir():
        p = p / TOPK_CSV_NAME
    if not p.is_file():
        raise UserError(f"top-k list not found: {p}")
    try:
        # Everything as text first (keep_default_na=False keeps empty cells as ""), so that
        # "3,17" and empty layers survive; numbers are converted with explicit checks below.
        df = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise UserError(f"top-k list {p} is empty (expected a CSV header with "
                        f"{', '.join(_REQUIRED_COLUMNS)})") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"top-k list {p} is not a readable CSV: {str(exc).strip()}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in _REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"top-k list {p} lacks column(s) {', '.join(missing)} "
                        f"(found: {', '.join(df.columns) or 'none'})")
    has_layer = "layer" in df.columns
    has_rank = "rank" in df.columns
    items = []
    for row_no, rec in enumerate(df.to_dict("records"), start=2):  # line 1 is the header
        where = f"{p} line {row_no}"
        param = str(rec["param"]).strip()
        if not param:
            raise UserError(f"{where}: empty param")
        index = _parse_index(rec["index"], where)
        score = _parse_score(rec["score"], where)
        layer = _parse_layer(rec["layer"], where) if has_layer else layer_of(param)
        rank = _parse_rank(rec["rank"], where) if has_rank else None
        items.append(RankedItem(param, index, score, layer, rank))
    return _checked_list(name if name is not None else str(path), items)


def ranked_list_from_items(name: str, items: Iterable[Sequence[Any]]) -> RankedList:
    """Build a :class:`RankedList` from ``(param, index, score)`` tuples (optionally a 4th
    element, the layer); ``index`` is a tuple of ints or text like ``"3,17"``.

    Without an explicit layer it is derived from the parameter name (esa.spec.weights.layer_of).
    """
    out = []
    for n, item in enumerate(items):
        where = f"list {name!r} item {n}"
        if len(item) not in (3, 4):
            raise UserError(f"{where}: expected (param, index, score[, layer]), got {item!r}")
        param, index, score = item[0], item[1], item[2]
        param = str(param).strip()
        if not param:
            raise UserError(f"{where}: empty param")
        idx = _parse_index(index, where)
        sc = _parse_score(score, where)
        layer = _parse_layer(item[3], where) if len(item) == 4 else layer_of(param)
        out.append(RankedItem(param, idx, sc, layer, n + 1))
    return _checked_list(name, out)


def _checked_list(name: str, items: list[RankedItem]) -> RankedList:
    # A weight listed twice has no single score; refuse rather than guess which one counts.
    seen: dict[str, int] = {}
    for n, it in enumerate(items):
        k = it.key
        if k in seen:
            raise UserError(f"list {name}: weight {k} appears twice (entries {seen[k] + 1} "
                            f"and {n + 1})")
        seen[k] = n
    return RankedList(name=name, items=tuple(items))


def _parse_index(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, (tuple, list, np.ndarray)):
        parts = list(value)
    elif isinstance(value, (int, np.integer)):
        parts = [value]
    else:
        text = str(value).strip().strip("()[]").strip()
        # A 0-d parameter has the empty index.
        parts = [s for s in (t.strip() for t in text.split(",")) if s] if text else []
    try:
        idx = tuple(int(v) for v in parts)
    except (TypeError, ValueError):
        raise UserError(f"{where}: malformed index {value!r} (expected integers like "
                        f"'3,17')") from None
    if any(i < 0 for i in idx):
        raise UserError(f"{where}: negative index {value!r}")
    return idx


def _parse_score(value: Any, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: score {value!r} is not a number") from None
    # +inf (an overflowed score) still ranks first; NaN and -inf have no place in a top-k.
    if math.isnan(x) or x == -math.inf:
        raise UserError(f"{where}: score {value!r} is not a usable number")
    return x


def _parse_layer(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if text == "" or text.lower() in ("none", "nan", OTHER_LAYER):
        return None
    try:
        f = float(text)  # "3.0" appears when a writer stored the column as float
    except ValueError:
        raise UserError(f"{where}: layer {value!r} is not a block index") from None
    if not f.is_integer() or f < 0:
        raise UserError(f"{where}: layer {value!r} is not a block index")
    return int(f)


def _parse_rank(value: Any, where: str) -> int | None:
    text = str(value).strip()
    if text == "":
        return None
    try:
        f = float(text)
    except ValueError:
        raise UserError(f"{where}: rank {value!r} is not an integer") from None
    if not f.is_integer():
        raise UserError(f"{where}: rank {value!r} is not an integer")
    return int(f)


# ------------------------------------------------------------------------- statistics


def _check_by(by: str) -> str:
    if by not in GRANULARITIES:
        raise UserError(f"unknown granularity {by!r}; choose one of {', '.join(GRANULARITIES)}")
    return by


def aggregate(ranked: RankedList, by: str) -> dict[str, float]:
    """Map each key of the list at granularity ``by`` to its score.

    ``parameter``: key ``param:i,j`` -> the weight's score. ``tensor``: parameter name ->
    sum of its weights' scores. ``layer``: block index as text (or ``"other"``) -> sum.
    """
    _check_by(by)
    out: dict[str, float] = {}
    for it in ranked.items:
        if by == "parameter":
            key = it.key
        elif by == "tensor":
            key = it.param
        else:
            key = OTHER_LAYER if it.layer is None else str(it.layer)
        out[key] = out.get(key, 0.0) + it.score
    return out


def jaccard(a: Iterable[Hashable], b: Iterable[Hashable]) -> float | None:
    """\\|A∩B\\| / \\|A∪B\\|; None when both sets are empty (0/0)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return None if union == 0 else len(sa & sb) / union


def overlap_coefficient(a: Iterable[Hashable], b: Iterable[Hashable]) -> float | None:
    """\\|A∩B\\| / min(\\|A\\|, \\|B\\|); None when either set is empty."""
    sa, sb = set(a), set(b)
    smaller = min(len(sa), len(sb))
    return None if smaller == 0 else len(sa & sb) / smaller


def _absent_value(scores: Sequence[float]) -> float:
    """A finite value strictly below every given score (a stand-in for -inf).

    ``min - 1`` alone fails for large magnitudes (1e20 - 1 == 1e20 in float64), so the gap
    scales with the minimum. Scores are never NaN or -inf (refused on input).
    """
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:  # empty list, or only +inf scores: any finite value is below them
        return 0.0
    lo = min(finite)
    return lo - (1.0 + abs(lo))


def union_score_vectors(scores_a: Mapping[str, float], scores_b: Mapping[str, float]
                        ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return the sorted union of keys and each list's score vector over it.

    Keys absent from a list get a value below every present score of that list (ranked
    last, tied); see the module docstring.
    """
    keys = sorted(set(scores_a) | set(scores_b))
    fill_a = _absent_value(list(scores_a.values()))
    fill_b = _absent_value(list(scores_b.values()))
    va = np.array([scores_a.get(k, fill_a) for k in keys], dtype=np.float64)
    vb = np.array([scores_b.get(k, fill_b) for k in keys], dtype=np.float64)
    return keys, va, vb


def _finite_or_none(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def rank_correlations(scores_a: Mapping[str, float], scores_b: Mapping[str, float]
                      ) -> tuple[float | None, float | None]:
    """Spearman rho and Kendall tau-b of two keyed score maps over the union of their keys.

    Returns ``(None, None)`` when undefined: fewer than two keys in the union, or a constant
    vector (an empty list, or all of a list's values equal over the union).
    """
    _, va, vb = union_score_vectors(scores_a, scores_b)
    # Checked here, not left to scipy: scipy warns and returns NaN for constant input.
    if va.size < 2 or np.all(va == va[0]) or np.all(vb == vb[0]):
        return None, None
    rho = stats.spearmanr(va, vb).statistic
    tau = stats.kendalltau(va, vb, variant="b").statistic
    return _finite_or_none(rho), _finite_or_none(tau)


def overlap_stats(a: RankedList, b: RankedList, by: str) -> dict[str, Any]:
    """All overlap statistics of one pair of lists at granularity ``by`` (JSON-ready)."""
    _check_by(by)
    sa, sb = aggregate(a, by), aggregate(b, by)
    rho, tau = rank_correlations(sa, sb)
    inter = len(sa.keys() & sb.keys())
    return {
        "a": a.name,
        "b": b.name,
        "jaccard": jaccard(sa, sb),
        "overlap_coefficient": overlap_coefficient(sa, sb),
        "spearman": rho,
        "kendall": tau,
        "n_a": len(sa),
        "n_b": len(sb),
        "n_intersection": inter,
        "n_union": len(sa) + len(sb) - inter,
    }


# ---------------------------------------------------------------------------- reports


_PAIR_KEYS = ("a", "b", "jaccard", "overlap_coefficient", "spearman", "kendall",
              "n_a", "n_b", "n_intersection", "n_union")


def pairwise_overlap(lists: Sequence[RankedList], by: str) -> dict[str, Any]:
    """Overlap statistics for every pair of lists (in input order), JSON-ready.

    Returns ``{"by", "lists": [names], "pairs": [overlap_stats...]}``; with exactly two lists
    the pair's keys are also copied to the top level (old scripts read ``report["jaccard"]``).
    """
    _check_by(by)
    if len(lists) < 2:
        raise UserError(f"overlap needs at least two lists, got {len(lists)}")
    pairs = [overlap_stats(x, y, by) for x, y in itertools.combinations(lists, 2)]
    report: dict[str, Any] = {"by": by, "lists": [lst.name for lst in lists], "pairs": pairs}
    if len(lists) == 2:
        report.update({k: pairs[0][k] for k in _PAIR_KEYS})
    return report


def overlap_matrix(lists: Sequence[RankedList], by: str, stat: str = "jaccard"
                   ) -> pd.DataFrame:
    """Square DataFrame (index and columns = list names) of one pair statistic, for heatmaps.

    The diagonal compares each list with itself.
    """
    allowed = ("jaccard", "overlap_coefficient", "spearman", "kendall")
    if stat not in allowed:
        raise UserError(f"unknown statistic {stat!r}; choose one of {', '.join(allowed)}")
    names = [lst.name for lst in lists]
    if len(set(names)) != len(names):
        raise UserError("overlap matrix needs distinct list names")
    mat = pd.DataFrame(np.nan, index=names, columns=names, dtype=float)
    for i, x in enumerate(lists):
        for j in range(i, len(lists)):
            v = overlap_stats(x, lists[j], by)[stat]
            mat.iat[i, j] = mat.iat[j, i] = np.nan if v is None else v
    return mat


def overlap_report(paths: Sequence[str | os.PathLike[str]], by: str) -> dict[str, Any]:
    """Load each ``top_weights.csv`` and return :func:`pairwise_overlap` of them."""
    _check_by(by)
    return pairwise_overlap([load_ranked_list(p) for p in paths], by)


def write_overlap_report(paths: Sequence[str | os.PathLike[str]], by: str,
                         out: str | os.PathLike[str]) -> dict[str, Any]:
    """Compute :func:`overlap_report` and write it to ``out`` as JSON, atomically."""
    report = overlap_report(paths, by)
    _write_json_atomic(report, out)
    return report


def _write_json_atomic(obj: Any, out: str | os.PathLike[str]) -> None:
    # allow_nan=False: undefined statistics must already be None (JSON null); esa.core.io does the
    # same-folder temporary file + rename, so a reader never sees a half-written report.
    atomic_write_text(out, json.dumps(obj, indent=2, allow_nan=False) + "\n")


# -------------------------------------------------------------------------- stability


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals))  # population std (ddof=0)


def stability_summary(lists_by_seed: Mapping[Any, RankedList], by: str = "parameter"
                      ) -> dict[str, Any]:
    """Agreement of the top-k sets of several seeds, over ALL pairs of seeds (JSON-ready).

    Keys: ``by``, ``seeds``, ``num_seeds``, ``topk_size`` (largest set size at ``by``),
    ``topk_sizes`` (per seed, in seed order), ``jaccard_mean``, ``jaccard_std`` (ddof=0),
    ``jaccard_all`` (pair order), ``pairs`` [{seed_a, seed_b, jaccard, overlap_coefficient,
    spearman, kendall, n_intersection, n_union}], ``spearman_mean``, ``kendall_mean``.
    Means skip undefined (None) pair values; they are None when no pair is defined.
    """
    _check_by(by)
    seeds = list(lists_by_seed)
    if len(seeds) < 2:
        raise UserError(f"a stability check needs at least two seeds, got {len(seeds)}")
    sizes = [len(aggregate(lists_by_seed[s], by)) for s in seeds]
    pairs = []
    for sa, sb in itertools.combinations(seeds, 2):
        st = overlap_stats(lists_by_seed[sa], lists_by_seed[sb], by)
        pairs.append({"seed_a": _json_seed(sa), "seed_b": _json_seed(sb),
                      "jaccard": st["jaccard"],
                      "overlap_coefficient": st["overlap_coefficient"],
                      "spearman": st["spearman"], "kendall": st["kendall"],
                      "n_intersection": st["n_intersection"], "n_union": st["n_union"]})
    jac = [p["jaccard"] for p in pairs]
    j_mean, j_std = _mean_std(jac)
    return {
        "by": by,
        "seeds": [_json_seed(s) for s in seeds],
        "num_seeds": len(seeds),
        "topk_size": max(sizes),
        "topk_sizes": sizes,
        "jaccard_mean": j_mean,
        "jaccard_std": j_std,
        "jaccard_all": jac,
        "pairs": pairs,
        "spearman_mean": _mean_std([p["spearman"] for p in pairs])[0],
        "kendall_mean": _mean_std([p["kendall"] for p in pairs])[0],
    }


def stability_from_sets(sets_by_seed: Mapping[Any, Iterable[Sequence[Any]]],
                        by: str = "parameter") -> dict[str, Any]:
    """:func:`stability_summary` from in-memory ``(param, index, score)`` items per seed.

    For ``esa profile --seeds ... --stability-check``: no CSV needs to be written first.
    """
    lists = {seed: ranked_list_from_items(f"seed {seed}", items)
             for seed, items in sets_by_seed.items()}
    return stability_summary(lists, by)


def write_stability_summary(lists_by_seed: Mapping[Any, RankedList],
                            out: str | os.PathLike[str], by: str = "parameter"
                            ) -> dict[str, Any]:
    """Compute :func:`stability_summary` and write it to ``out`` as JSON, atomically."""
    summary = stability_summary(lists_by_seed, by)
    _write_json_atomic(summary, out)
    return summary


def _json_seed(seed: Any) -> Any:
    # numpy integers are not JSON-serialisable; keep ints as ints, anything else as text.
    if isinstance(seed, (bool, np.bool_)):
        return str(seed)
    if isinstance(seed, (int, np.integer)):
        return int(seed)
    return str(seed)
