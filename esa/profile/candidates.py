"""The candidate weights of a metric that scores a chosen set (hessian_diag, obd, ablation).

Candidates are the explicit weights of ``metric.candidates`` followed by the first
``metric.n_candidates`` weights of each file of ``metric.candidates_from``:

| file | its weights, best first |
| --- | --- |
| ``scores.h5`` (or a folder holding one) | the ``topk/`` ranking by score, highest first (a per_layer ranking's tensors interleave by score) |
| ``super_weights.json`` | the detector's candidates by ``rank`` (largest output spike first) |
| ``*.csv`` | the rows in file order: the columns of top_weights.csv, ``param,index`` or one ``weight`` column |

Several sources give their union; a weight named twice is kept at its first place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from esa.core.errors import UserError
from esa.core.logs import get_logger
from esa.results.exports import read_topk_csv
from esa.results.scorefile import read_topk
from esa.spec.manifest import MetricSpec
from esa.spec.weights import format_weight, parse_weight

__all__ = ["read_candidates", "resolve_candidates"]

log = get_logger("profile")


def _from_scores(path: Path) -> list[str]:
    ranking = read_topk(path)
    order = np.argsort(-ranking.score, kind="stable")  # a per_layer list: tensors interleaved by score
    names = ranking.names()
    return [names[i] for i in order]


def _from_super_weights(path: Path) -> list[str]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"candidates file {path}: not readable JSON ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"candidates file {path}: expected a list of candidates as super_weights.json holds")
    rows = sorted(rows, key=lambda r: r.get("rank", 0))
    out = []
    for r in rows:
        if "weight" in r:
            out.append(str(r["weight"]))
        elif "param" in r and "index" in r:
            out.append(format_weight(str(r["param"]), r["index"]))
        else:
            raise UserError(f"candidates file {path}: a row without 'weight' (or 'param' and 'index'): {r}")
    return out


def read_candidates(path: str | Path, n: int | None = None) -> list[str]:
    """The first `n` weights (all with None) of one candidates file, best first, as 'param:i,j'."""
    p = Path(path)
    if p.is_dir():
        found = [p / f for f in ("scores.h5", "super_weights.json") if (p / f).is_file()]
        if not found:
            raise UserError(f"candidates folder {p} holds neither scores.h5 nor super_weights.json")
        p = found[0]
    if not p.is_file():
        raise UserError(f"candidates file {p} does not exist")
    if p.suffix in (".h5", ".hdf5"):
        names = _from_scores(p)
    elif p.suffix == ".json":
        names = _from_super_weights(p)
    elif p.suffix == ".csv":
        names = read_topk_csv(p).names()
    else:
        raise UserError(f"candidates file {p}: expected a scores.h5, a super_weights.json or a .csv list")
    if n is not None and n > len(names):
        log.warning("%s lists %d weights; all of them are candidates (asked for %d)", p, len(names), n)
    return names if n is None else names[:n]


def _unique(names: Iterable[str]) -> list[str]:
    seen: dict[tuple[str, tuple[int, ...]], str] = {}
    for name in names:
        seen.setdefault(parse_weight(name), name)
    return [format_weight(*key) for key in seen]


def resolve_candidates(spec: MetricSpec) -> list[str]:
    """Every candidate of a metric section (explicit weights, then each file's first n), without repeats."""
    names = list(spec.candidates)
    for path in spec.candidates_from:
        names += read_candidates(path, spec.n_candidates)
    if spec.n_candidates is not None and not spec.candidates_from:
        raise UserError("--candidates N (n_candidates) takes the first N weights of --candidates-from files; "
                        "give --candidates-from SCORES.h5|super_weights.json|targets.csv")
    return _unique(names)
