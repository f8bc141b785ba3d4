"""Torch-free readers of the result files a job leaves behind (JSON and ``scores.h5``).

Every reader raises :class:`ResultFileError` with a one-line reason when a file is missing,
truncated or malformed, so that the collector can list the job as corrupt instead of failing.
``scores.h5`` is read with h5py directly (``esa.scorefile`` imports torch); only the small
``topk/``, ``bottomk/`` and ``stats/`` groups are read unless a caller asks for one tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = ["ResultFileError", "read_json_file", "ScoreFileInfo", "check_score_file",
           "TopKTable", "read_topk_group", "read_stats_group", "read_score_tensor",
           "SCORE_FORMAT", "SCORE_FORMAT_VERSION"]

SCORE_FORMAT = "esa-scores"
SCORE_FORMAT_VERSION = 1


class ResultFileError(Exception):
    """A result file that exists in name only: missing, truncated, unreadable or malformed."""


def read_json_file(path: Path) -> Any:
    """Parse a JSON result file; ResultFileError when it is missing or not valid JSON."""
    if not path.is_file():
        raise ResultFileError(f"{path.name} is missing")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{path.name} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ResultFileError(f"{path.name} cannot be read ({exc.strerror})") from None


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    return v


@dataclass(frozen=True)
class ScoreFileInfo:
    """Root attributes of a complete ``scores.h5`` plus which groups it holds."""

    attrs: dict[str, Any]
    manifest: dict[str, Any] | None
    has_topk: bool
    has_bottomk: bool
    has_scores: bool


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise ResultFileError("scores.h5 is missing")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise ResultFileError("scores.h5 is not a readable HDF5 file (truncated or corrupt)") from None


def _validate(f: h5py.File) -> None:
    # The same acceptance rule as esa.scorefile: format, version, and `complete` set last.
    if _text(f.attrs.get("format", "")) != SCORE_FORMAT:
        raise ResultFileError("scores.h5 is not an ESA score file (format attribute missing)")
    version = int(f.attrs.get("format_version", 0))
    if version > SCORE_FORMAT_VERSION:
        raise ResultFileError(f"scores.h5 has format version {version}; this analysis reads "
                              f"up to {SCORE_FORMAT_VERSION}")
    if not bool(f.attrs.get("complete", False)):
        raise ResultFileError("scores.h5 is incomplete (no complete=True: the job did not finish)")
    if "topk" not in f:
        raise ResultFileError("scores.h5 has no topk/ group")


def check_score_file(path: Path) -> ScoreFileInfo:
    """Open and validate ``scores.h5``; returns its attributes (never reads score tensors)."""
    with _open(path) as f:
        try:
            _validate(f)
            attrs = {k: _plain(v) for k, v in f.attrs.items() if k != "manifest_json"}
            text = _text(f.attrs.get("manifest_json", ""))
            manifest = json.loads(text) if text else None
            return ScoreFileInfo(attrs, manifest if isinstance(manifest, dict) else None,
                                 "topk" in f, "bottomk" in f, "scores" in f)
        except (OSError, KeyError, ValueError) as exc:  # damaged metadata inside a valid header
            raise ResultFileError(f"scores.h5 metadata is unreadable ({exc})") from None


@dataclass(frozen=True)
class TopKTable:
    """A ranked group (``topk/`` or ``bottomk/``) as plain arrays."""

    param: list[str]
    index: list[tuple[int, ...]]
    score: np.ndarray
    rank: np.ndarray
    mode: str
    k: int

    def __len__(self) -> int:
        return len(self.param)

    def items(self) -> list[tuple[str, tuple[int, ...], float]]:
        """``(param, index, score)`` tuples for ``esa.overlap.ranked_list_from_items``.

        Scores that esa.overlap refuses (NaN, -inf) cannot be ranked; they are dropped here.
        """
        return [(p, ix, float(s)) for p, ix, s in zip(self.param, self.index, self.score)
                if not (math.isnan(s) or s == -math.inf)]


def read_topk_group(path: Path, group: str = "topk") -> TopKTable:
    """Read ``topk/`` (or ``bottomk/``) of a complete ``scores.h5``."""
    with _open(path) as f:
        _validate(f)
        if group not in f:
            raise ResultFileError(f"scores.h5 has no {group}/ group")
        g = f[group]
        try:
            ndim = g["ndim"][()]
            idx = g["index"][()]
            params = [_text(p) for p in g["param"][()]]
            index = [tuple(int(v) for v in idx[i, : int(ndim[i])]) for i in range(len(ndim))]
            return TopKTable(params, index, np.asarray(g["score"][()], dtype=np.float64),
                             np.asarray(g["rank"][()], dtype=np.int64),
                             _text(g.attrs.get("mode", "")), int(g.attrs.get("k", 0)))
        except (OSError, KeyError, ValueError) as exc:
            raise ResultFileError(f"scores.h5 {group}/ is unreadable ({exc})") from None


def read_stats_group(path: Path) -> dict[str, dict[str, float]]:
    """Per-tensor statistics of ``stats/``: name -> {column: value}; empty when absent."""
    with _open(path) as f:
        _validate(f)
        if "stats" not in f:
            return {}
        g = f["stats"]
        names = [_text(n) for n in g["name"][()]]
        cols = {c: g[c][()] for c in g.keys() if c != "name"}
        return {n: {c: float(v[i]) for c, v in cols.items()} for i, n in enumerate(names)}


def read_score_tensor(path: Path, param: str) -> np.ndarray | None:
    """The full score tensor of one parameter, or None when the file holds only the top-k."""
    with _open(path) as f:
        _validate(f)
        if "scores" not in f or param not in f["scores"]:
            return None
        return np.asarray(f["scores"][param][()])
