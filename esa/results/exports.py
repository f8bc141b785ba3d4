"""Plain-text exports of a profile: ``top_weights.csv`` and the per-tensor statistics.

CSV columns of the top-k export: rank, param, layer, index, flat_index, score, value.
``index`` is the weight's multi-index written ``i,j`` (quoted by the CSV writer), ``layer``
is empty for parameters outside the transformer blocks and ``value`` is empty when unknown.
Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np

from esa.core.errors import UserError
from esa.core.io import atomic_write_json, atomic_write_text
from esa.results.tables import CandidateScores, TensorStats, TopK
from esa.spec.weights import layer_of, parse_weight

__all__ = ["TOPK_COLUMNS", "STATS_COLUMNS", "CANDIDATE_COLUMNS", "write_topk_csv", "read_topk_csv", "write_stats",
           "write_candidates_csv"]

TOPK_COLUMNS: tuple[str, ...] = ("rank", "param", "layer", "index", "flat_index", "score",
                                 "value")
STATS_COLUMNS: tuple[str, ...] = ("name", "layer", "module_type", "numel", "mean", "std", "min",
                                  "max", "p99", "p99_9", "kurtosis", "topk_k", "topk_share",
                                  "gini", "sampled")
CANDIDATE_COLUMNS: tuple[str, ...] = ("rank", "candidate", "param", "layer", "index", "flat_index", "value",
                                      "score")
STATS_CSV = "sensitivity_stats.csv"
_EXTRA = "__extra__"  # DictReader key for fields beyond the header
STATS_JSON = "sensitivity_stats.json"


def _num(x: float) -> str:
    """Full-precision text for a float; empty for NaN (a spreadsheet reads it as missing)."""
    return "" if math.isnan(x) else repr(float(x))


def write_topk_csv(path: str | os.PathLike, topk: TopK) -> Path:
    """Write a ranked list as CSV (columns TOPK_COLUMNS) and return the path."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(TOPK_COLUMNS)
    for i in range(len(topk)):
        layer = layer_of(topk.param[i])
        w.writerow([
            int(topk.rank[i]), topk.param[i], "" if layer is None else layer,
            ",".join(str(v) for v in topk.index[i]), int(topk.flat_index[i]),
            _num(topk.score[i]), _num(topk.value[i]),
        ])
    return atomic_write_text(path, buf.getvalue())


def write_candidates_csv(path: str | os.PathLike, table: CandidateScores) -> Path:
    """Write sparse candidate scores as CSV, highest score first: CANDIDATE_COLUMNS (rank 1 = highest
    score, ties by candidate order; candidate = position in the job's candidate list), then one
    column per extra column of the table (ablation: delta_nll, delta_ppl, the per-window summary)."""
    order = sorted(range(len(table)), key=lambda i: (-table.score[i] if not math.isnan(table.score[i])
                                                     else math.inf, int(table.order[i])))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*CANDIDATE_COLUMNS, *table.columns])
    for rank, i in enumerate(order, start=1):
        layer = layer_of(table.param[i])
        w.writerow([rank, int(table.order[i]), table.param[i], "" if layer is None else layer,
                    ",".join(str(v) for v in table.index[i]), int(table.flat_index[i]), _num(table.value[i]),
                    _num(table.score[i]), *(_num(col[i]) for col in table.columns.values())])
    return atomic_write_text(path, buf.getvalue())


def read_topk_csv(path: str | os.PathLike, mode: str = "global",
                  largest: bool = True) -> TopK:
    """Read a top-k CSV written by :func:`write_topk_csv`, or a hand-made list of weights.

    The minimal form has columns ``param`` and ``index`` (``i,j``), or a single ``weight``
    column (``param:i,j``, quoted or not). Missing columns default to: rank = row order,
    flat_index = -1 (unknown without the tensor's shape), score and value = NaN. ``mode`` / ``largest``
    label the list (the CSV does not record them).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weight list {path} does not exist")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, restkey=_EXTRA))
    params: list[str] = []
    index: list[tuple[int, ...]] = []
    flat, score, value, rank = [], [], [], []
    for n, row in enumerate(rows, start=1):
        where = f"{path}, row {n}"
        if row.get("weight"):
            # An unquoted `param:i,j` in a one-column file is split at its commas: rejoin.
            p, ix = parse_weight(",".join([row["weight"], *row.get(_EXTRA, [])]))
        elif row.get("param") is not None and row.get("index") is not None:
            p, ix = parse_weight(f"{row['param']}:{row['index']}")
        else:
            raise UserError(f"{where}: needs columns 'param' and 'index' (or 'weight')")
        params.append(p)
        index.append(ix)
        flat.append(_int(row.get("flat_index"), -1, where))
        rank.append(_int(row.get("rank"), n, where))
        score.append(_float(row.get("score"), where))
        value.append(_float(row.get("value"), where))
    k = len(params)
    return TopK(params, np.array(flat, np.int64), index, np.array(score, np.float64),
                np.array(rank, np.int64), np.array(value, np.float64), mode=mode,
                largest=largest, k=k)


def _int(text: str | None, default: int, where: str) -> int:
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not an integer") from None


def _float(text: str | None, where: str) -> float:
    if text is None or text.strip() == "":
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number") from None


def write_stats(out_dir: str | os.PathLike, stats: list[TensorStats]) -> tuple[Path, Path]:
    """Write ``sensitivity_stats.csv`` and ``sensitivity_stats.json`` into ``out_dir``.

    The JSON is ``{"tensors": [{column: value, ...}, ...]}`` with NaN written as null.
    """
    out = Path(out_dir)
    records = [s.to_dict() for s in stats]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(STATS_COLUMNS)
    for r in records:
        w.writerow([_cell(r[c]) for c in STATS_COLUMNS])
    csv_path = atomic_write_text(out / STATS_CSV, buf.getvalue())
    json_path = atomic_write_json(out / STATS_JSON,
                                  {"tensors": [{c: r[c] for c in STATS_COLUMNS} for r in records]})
    return csv_path, json_path


def _cell(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, float):
        return _num(v)
    return v
