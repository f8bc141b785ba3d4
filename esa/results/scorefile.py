"""The HDF5 score file ``scores.h5`` of one profiling job: writer and readers.

Layout (format ``esa-scores``, version 1)::

    /                 attrs: format, format_version, metric, manifest_id, manifest_json,
                             model_name, model_revision, model_dtype, esa_version, save,
                             score_dtype, layout_json (every dataset's shape and dtype),
                             complete (=True, written last)
    /scores/<param>   one dataset per scored parameter, exact parameter name, the
                      parameter's shape, float32 or float16, chunked (absent for save='topk')
    /topk/            param (UTF-8 strings), flat_index int64, index int64 [k, max_ndim]
                      padded with -1, ndim int8, score float64, value float64, rank int64;
                      attrs mode, k, largest
    /bottomk/         optional, same layout as /topk
    /stats/           per-tensor statistics as columns (see esa.profile.stats), name strings
    /accumulators/<acc>/<param>   optional additive sums for data shards; attrs of
                      /accumulators hold the counts (e.g. tokens, batches)
    /unscored         UTF-8 strings: parameters the metric does not define a score for
    /candidates/      optional, sparse scores: the weights a metric scored when it scores a candidate set
                      (ablation; hessian_diag / obd with candidates), one row each in candidate order:
                      param, flat_index, index, ndim as in /topk, score float64, value float64 (the weight),
                      order int64 (position in the job's whole candidate list); columns/<name> float64
                      (per-row extras, e.g. ablation's delta_nll); attrs: n plus job-level facts (JSON
                      for non-scalars). A file with save='candidates' has no /scores/ group: its
                      scores ARE these rows, every other coordinate is unscored (not zero).

The writer builds the file under a temporary name in the destination folder and renames it
only after ``complete`` is set and the file is closed and synced, so a killed job never
leaves a file that readers would accept.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from esa import __version__
from esa.core.errors import UserError
from esa.core.io import make_temp_file
from esa.results.records import ResultFileError
from esa.results.tables import CandidateScores, TensorStats, TopK, stats_columns, stats_from_columns

__all__ = ["FORMAT", "FORMAT_VERSION", "REQUIRED_ATTRS", "ScoreFileWriter", "write_score_file", "ScoreFile",
           "ScoreFileInfo",
           "open_score_file", "check_score_file", "read_topk", "read_scores", "read_stats", "read_accumulators",
           "read_attrs", "read_candidates"]

log = logging.getLogger("esa.results.scorefile")

FORMAT = "esa-scores"
FORMAT_VERSION = 1
REQUIRED_ATTRS: tuple[str, ...] = ("metric", "manifest_id", "manifest_json", "model_name",
                                   "model_revision", "model_dtype")
SCORE_DTYPES = {"float32": np.float32, "float16": np.float16}
SAVE_MODES = ("full", "topk", "candidates")
COMPRESSIONS = (None, "lzf", "gzip")
# Tensors above this many elements are converted and written slice by slice along their
# first dimension, so that no second full-size copy is made on the host.
_SLICE_ELEMS = 1 << 22
_STR = h5py.string_dtype("utf-8")
LAYOUT_ATTR = "layout_json"


# ----------------------------------------------------------------------------- writing


class ScoreFileWriter:
    """``scores.h5`` written one tensor at a time, so that no caller needs every score tensor at
    once (a sharded job gathers and hands over one at a time); the ranked lists, statistics and
    ``complete`` come last, in :meth:`finish`. Use as a context manager: a writer left without
    finish() (an exception) removes its temporary file.

    ``attrs`` must hold REQUIRED_ATTRS (None is stored as ""; a dict manifest_json is
    serialised); extra scalar/string attributes are kept, anything else is stored as JSON.
    ``save='topk'`` stores no ``scores/`` group; ``save='candidates'`` neither: the file's scores are
    the sparse rows of ``candidates/`` given to :meth:`finish`."""

    def __init__(self, path: str | os.PathLike, *, attrs: Mapping[str, Any], score_dtype: str = "float32",
                 save: str = "full", compression: str | None = None) -> None:
        if score_dtype not in SCORE_DTYPES:
            raise UserError(f"unknown score dtype {score_dtype!r}; choose float32 or float16")
        if save not in SAVE_MODES:
            raise UserError(f"unknown save mode {save!r}; choose one of {', '.join(SAVE_MODES)}")
        if compression not in COMPRESSIONS:
            raise UserError(f"unknown compression {compression!r}; choose none, lzf or gzip")
        missing = [a for a in REQUIRED_ATTRS if a not in attrs]
        if missing:
            raise ValueError(f"score file attrs missing: {', '.join(missing)}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = make_temp_file(self.path)  # the umask's mode, not mkstemp's 0600
        os.close(fd)
        self._tmp = Path(tmp_name)
        self._dtype, self._save, self._compression = SCORE_DTYPES[score_dtype], save, compression
        # track_order keeps parameters in model order (ranking ties depend on it) and records
        # attribute order, so `complete` is provably the last one written.
        self._f = h5py.File(self._tmp, "w", track_order=True)
        _write_root_attrs(self._f, attrs, score_dtype=score_dtype, save=save)
        self._scores = self._f.create_group("scores", track_order=True) if save == "full" else None
        self._acc: h5py.Group | None = None

    def __enter__(self) -> ScoreFileWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

    def add_scores(self, name: str, tensor: Any) -> None:
        """One parameter's score tensor (ignored for save='topk')."""
        if self._scores is not None:
            _write_tensor(self._scores, name, tensor, self._dtype, self._compression)

    def add_accumulator(self, acc_name: str, name: str, tensor: Any) -> None:
        """One parameter's additive sum (kept as float32, float64 for float64 sums)."""
        if self._acc is None:
            self._acc = self._f.create_group("accumulators", track_order=True)
        _check_name(acc_name)
        group = self._acc[acc_name] if acc_name in self._acc else self._acc.create_group(acc_name, track_order=True)
        # Accumulators are exact sums to be added up later: always float32 or wider.
        dtype = np.float64 if str(tensor.dtype).endswith("float64") else np.float32
        _write_tensor(group, name, tensor, dtype, self._compression)

    def finish(self, *, topk: TopK, bottomk: TopK | None = None, stats: list[TensorStats] | None = None,
               counts: Mapping[str, int | float] | None = None, unscored: Iterable[str] = (),
               candidates: CandidateScores | None = None) -> Path:
        """Write the ranked lists, statistics, candidate scores and `complete`, then move the file into place."""
        if self._save == "candidates" and candidates is None:
            self.abort()
            raise ValueError("save='candidates' needs the candidate scores")
        try:
            _write_topk(self._f.create_group("topk"), topk)
            if bottomk is not None:
                _write_topk(self._f.create_group("bottomk"), bottomk)
            if stats is not None:
                _write_stats(self._f.create_group("stats"), stats)
            if candidates is not None:
                _write_candidates(self._f.create_group("candidates"), candidates)
            if self._acc is not None:
                for key, val in (counts or {}).items():
                    self._acc.attrs[key] = val
            self._f.create_dataset("unscored", data=np.array(list(unscored), dtype=object), dtype=_STR)
            # The size/shape record: a reader checks every dataset against it without reading data.
            self._f.attrs[LAYOUT_ATTR] = json.dumps(_layout(self._f), sort_keys=True)
            self._f.flush()
            # Last: only a file that got this far can ever be accepted by a reader.
            self._f.attrs["complete"] = True
            self._f.close()
            _fsync(self._tmp)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Close and remove the temporary file (nothing is left that a reader could mistake)."""
        try:
            self._f.close()
        except Exception:  # already closed
            pass
        self._tmp.unlink(missing_ok=True)


def write_score_file(
    path: str | os.PathLike,
    *,
    scores: Mapping[str, Any] | None,
    topk: TopK,
    bottomk: TopK | None = None,
    stats: list[TensorStats] | None = None,
    attrs: Mapping[str, Any],
    accumulators: Mapping[str, Mapping[str, Any]] | None = None,
    counts: Mapping[str, int | float] | None = None,
    unscored: Iterable[str] = (),
    score_dtype: str = "float32",
    save: str = "full",
    compression: str | None = None,
    candidates: CandidateScores | None = None,
) -> Path:
    """Write ``scores.h5`` atomically from tensors already at hand (see :class:`ScoreFileWriter`);
    ``candidates`` (sparse scores) go to ``candidates/``, and with ``save='candidates'`` they are the
    only scores."""
    if save == "full" and scores is None:
        raise ValueError("save='full' needs the scores")
    with ScoreFileWriter(path, attrs=attrs, score_dtype=score_dtype, save=save, compression=compression) as w:
        for name, tensor in (scores or {}).items():
            w.add_scores(name, tensor)
        for acc_name, tensors in (accumulators or {}).items():
            for name, tensor in tensors.items():
                w.add_accumulator(acc_name, name, tensor)
        return w.finish(topk=topk, bottomk=bottomk, stats=stats, counts=counts if accumulators else None,
                        unscored=unscored, candidates=candidates)


def _layout(f: h5py.File) -> dict[str, list[Any]]:
    """{dataset path: [shape, dtype]} of every dataset in the file."""
    out: dict[str, list[Any]] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            out[name] = [list(obj.shape), str(obj.dtype)]

    f.visititems(visit)
    return out


def _check_layout(sf: ScoreFile) -> None:
    """Every dataset the size/shape record names exists with its recorded shape and dtype."""
    text = _s(sf.h5.attrs.get(LAYOUT_ATTR, ""))
    if not text:
        return  # written before the record existed
    recorded = json.loads(text)
    found = _layout(sf.h5)
    for name, (shape, dtype) in recorded.items():
        if name not in found:
            raise ResultFileError(f"{sf.path} lacks dataset {name} of its size/shape record")
        if found[name] != [shape, dtype]:
            raise ResultFileError(f"{sf.path}: dataset {name} is {found[name]}, its size/shape record says "
                                  f"{[shape, dtype]}")
    extra = sorted(set(found) - set(recorded))
    if extra:
        raise ResultFileError(f"{sf.path} holds dataset {extra[0]} that its size/shape record does not name")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_root_attrs(f: h5py.File, attrs: Mapping[str, Any], *, score_dtype: str,
                      save: str) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["esa_version"] = __version__
    for key, val in attrs.items():
        if key in ("format", "format_version", "complete"):
            continue  # owned by this module
        f.attrs[key] = _attr_value(key, val)
    f.attrs["score_dtype"] = score_dtype
    f.attrs["save"] = save


def _attr_value(key: str, val: Any) -> Any:
    if val is None:
        return ""
    if key == "manifest_json" and not isinstance(val, str):
        return json.dumps(val, sort_keys=True)
    if isinstance(val, (str, bool, int, float, np.integer, np.floating, np.bool_)):
        return val
    return json.dumps(val, sort_keys=True, default=str)


def _check_name(name: str) -> None:
    # A '/' would silently create nested HDF5 groups and break the name round trip.
    if "/" in name or name in ("", ".", ".."):
        raise UserError(f"cannot store a tensor named {name!r} in the score file")


def _write_tensor(group: h5py.Group, name: str, tensor: Any, dtype: type,
                  compression: str | None) -> None:
    """One chunked dataset from a torch tensor (or a numpy array); large tensors go slice by slice
    along their first dimension, so no second full-size copy is made on the host."""
    _check_name(name)
    shape = tuple(tensor.shape)
    numel = int(np.prod(shape)) if shape else 1
    chunked = len(shape) > 0 and numel > 0
    ds = group.create_dataset(name, shape=shape, dtype=dtype, chunks=True if chunked else None,
                              compression=compression if chunked else None)
    if numel == 0:
        return
    if not shape or numel <= _SLICE_ELEMS:
        ds[...] = _to_numpy(tensor, dtype, name)
        return
    rows = max(1, _SLICE_ELEMS // max(1, numel // shape[0]))
    for start in range(0, shape[0], rows):
        ds[start:start + rows] = _to_numpy(tensor[start:start + rows], dtype, name)


def _to_numpy(t: Any, dtype: type, name: str) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.astype(dtype)
    import torch  # the writer runs in phase-2 jobs; readers stay torch-free

    # Convert on the tensor's device first (half the transfer for float16).
    out = t.detach().to({np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}[dtype])
    out = out.cpu().numpy()
    if out.dtype == np.float16 and not np.isfinite(out).all() and bool(t.isfinite().all()):
        log.warning("scores of %s exceed the float16 range and were stored as inf; "
                    "use --score-dtype float32", name)
    return out


def _write_topk(group: h5py.Group, topk: TopK) -> None:
    n = len(topk)
    ndims = np.array([len(ix) for ix in topk.index], dtype=np.int8)
    max_ndim = max(1, int(ndims.max()) if n else 1)
    index = np.full((n, max_ndim), -1, dtype=np.int64)
    for i, ix in enumerate(topk.index):
        index[i, : len(ix)] = ix
    group.create_dataset("param", data=np.array(topk.param, dtype=object), dtype=_STR)
    group.create_dataset("flat_index", data=topk.flat_index.astype(np.int64))
    group.create_dataset("index", data=index)
    group.create_dataset("ndim", data=ndims)
    group.create_dataset("score", data=topk.score.astype(np.float64))
    group.create_dataset("value", data=topk.value.astype(np.float64))
    group.create_dataset("rank", data=topk.rank.astype(np.int64))
    group.attrs["mode"] = topk.mode
    group.attrs["k"] = int(topk.k)
    group.attrs["largest"] = bool(topk.largest)


def _write_index_columns(group: h5py.Group, param: list[str], index: list[tuple[int, ...]]) -> None:
    n = len(param)
    ndims = np.array([len(ix) for ix in index], dtype=np.int8)
    max_ndim = max(1, int(ndims.max()) if n else 1)
    padded = np.full((n, max_ndim), -1, dtype=np.int64)
    for i, ix in enumerate(index):
        padded[i, : len(ix)] = ix
    group.create_dataset("param", data=np.array(param, dtype=object), dtype=_STR)
    group.create_dataset("index", data=padded)
    group.create_dataset("ndim", data=ndims)


def _read_index(group: h5py.Group) -> list[tuple[int, ...]]:
    ndim = group["ndim"][()]
    index_arr = group["index"][()]
    return [tuple(int(v) for v in index_arr[i, : ndim[i]]) for i in range(len(ndim))]


def _write_candidates(group: h5py.Group, table: CandidateScores) -> None:
    _write_index_columns(group, table.param, table.index)
    group.create_dataset("flat_index", data=table.flat_index.astype(np.int64))
    group.create_dataset("score", data=table.score.astype(np.float64))
    group.create_dataset("value", data=table.value.astype(np.float64))
    group.create_dataset("order", data=table.order.astype(np.int64))
    cols = group.create_group("columns", track_order=True)
    for name, col in table.columns.items():
        _check_name(name)
        cols.create_dataset(name, data=col.astype(np.float64))
    group.attrs["n"] = len(table)
    group.attrs["csv_name"] = table.csv_name or ""
    for key, val in table.attrs.items():
        group.attrs[key] = _attr_value(key, val)


def _write_stats(group: h5py.Group, stats: list[TensorStats]) -> None:
    for col, vals in stats_columns(stats).items():
        if col == "name":
            group.create_dataset(col, data=np.array(vals, dtype=object), dtype=_STR)
        else:
            group.create_dataset(col, data=vals)


# ----------------------------------------------------------------------------- reading


class ScoreFile:
    """A validated, read-only ``scores.h5`` (use as a context manager, or call close())."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ResultFileError(f"score file {self.path} does not exist")
        if not self.path.is_file():
            raise ResultFileError(f"score file {self.path} is not a file")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError:
            raise ResultFileError(f"score file {self.path} is not a readable HDF5 file "
                            "(truncated or corrupt)") from None
        try:
            self._validate()
        except BaseException:
            self._f.close()
            raise

    def _validate(self) -> None:
        a = self._f.attrs
        if _s(a.get("format", "")) != FORMAT:
            raise ResultFileError(f"{self.path} is not an ESA score file (format attribute missing)")
        version = int(a.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise ResultFileError(f"{self.path} has score-file format version {version}; this esa "
                            f"reads up to {FORMAT_VERSION} (upgrade esa)")
        if not bool(a.get("complete", False)):
            raise ResultFileError(f"{self.path} is incomplete (no complete=True: the job that wrote it did not finish)")

    def __enter__(self) -> ScoreFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        self._f.close()

    @property
    def h5(self) -> h5py.File:
        """The open h5py.File, for callers that need slices of large datasets."""
        return self._f

    def attrs(self) -> dict[str, Any]:
        """Root attributes as plain Python values (strings decoded)."""
        return {k: _plain(v) for k, v in self._f.attrs.items()}

    def manifest(self) -> Any:
        """The job manifest parsed from ``manifest_json`` (None when empty)."""
        text = _s(self._f.attrs.get("manifest_json", ""))
        return json.loads(text) if text else None

    def score_names(self) -> list[str]:
        """Names of the stored score tensors (empty for a top-k-only file)."""
        if "scores" not in self._f:
            return []
        return list(self._f["scores"].keys())

    def scores(self, names: Iterable[str] | None = None,
               as_torch: bool = False) -> dict[str, Any]:
        """Score tensors in their stored dtype (all, or ``names``), as numpy or torch."""
        if "scores" not in self._f and "candidates" in self._f:
            raise ResultFileError(f"{self.path} holds the scores of its candidate weights only (candidates/); "
                                  "read them with candidates()")
        if "scores" not in self._f:
            raise ResultFileError(f"{self.path} holds only the top-k (it was written with "
                            "save-scores=topk); re-run with save-scores=full for all scores")
        group = self._f["scores"]
        wanted = list(group.keys()) if names is None else list(names)
        out: dict[str, Any] = {}
        for name in wanted:
            if name not in group:
                raise ResultFileError(f"{self.path} has no scores for parameter {name!r}")
            arr = group[name][()]
            out[name] = _torch_from_numpy(np.asarray(arr)) if as_torch else np.asarray(arr)
        return out

    def topk(self, group: str = "topk") -> TopK:
        """The ranked list stored in ``group`` ('topk' or 'bottomk')."""
        if group not in self._f:
            raise ResultFileError(f"{self.path} has no {group!r} group")
        g = self._f[group]
        ndim = g["ndim"][()]
        index_arr = g["index"][()]
        index = [tuple(int(v) for v in index_arr[i, : ndim[i]]) for i in range(len(ndim))]
        return TopK(
            param=[_s(p) for p in g["param"][()]], flat_index=g["flat_index"][()],
            index=index, score=g["score"][()], rank=g["rank"][()], value=g["value"][()],
            mode=_s(g.attrs["mode"]), largest=bool(g.attrs["largest"]), k=int(g.attrs["k"]),
        )

    def has_candidates(self) -> bool:
        """Whether the file holds sparse candidate scores (``candidates/``)."""
        return "candidates" in self._f

    def candidates(self) -> CandidateScores:
        """The sparse candidate scores (``candidates/``), in candidate order; attrs as stored
        (strings that were JSON come back as written: decode them with json.loads)."""
        if "candidates" not in self._f:
            raise ResultFileError(f"{self.path} holds no candidate scores (candidates/)")
        g = self._f["candidates"]
        attrs = {k: _plain(v) for k, v in g.attrs.items() if k not in ("n", "csv_name")}
        return CandidateScores([_s(p) for p in g["param"][()]], g["flat_index"][()], _read_index(g),
                               g["score"][()], g["value"][()], g["order"][()],
                               {k: g["columns"][k][()] for k in g["columns"].keys()}, attrs,
                               _s(g.attrs.get("csv_name", "")) or None)

    def stats(self) -> list[TensorStats]:
        """Per-tensor statistics (empty list when the file has none)."""
        if "stats" not in self._f:
            return []
        g = self._f["stats"]
        cols: dict[str, Any] = {k: g[k][()] for k in g.keys()}
        cols["name"] = [_s(n) for n in cols["name"]]
        return stats_from_columns(cols)

    def accumulators(self) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
        """``(accumulators, counts)``: acc name -> param -> array, and the count attrs."""
        if "accumulators" not in self._f:
            return {}, {}
        g = self._f["accumulators"]
        accs = {acc: {name: g[acc][name][()] for name in g[acc].keys()} for acc in g.keys()}
        return accs, {k: _plain(v) for k, v in g.attrs.items()}

    def unscored(self) -> list[str]:
        """Parameters the metric did not score."""
        if "unscored" not in self._f:
            return []
        return [_s(n) for n in self._f["unscored"][()]]


def _torch_from_numpy(arr: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(arr)


def _s(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def open_score_file(path: str | os.PathLike) -> ScoreFile:
    """Open and validate a score file (UserError if missing, unreadable or incomplete)."""
    return ScoreFile(path)


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Root attributes of a complete score file."""
    with ScoreFile(path) as sf:
        return sf.attrs()


def read_topk(path: str | os.PathLike, group: str = "topk") -> TopK:
    """The top-k (or, with group='bottomk', bottom-k) list of a score file."""
    with ScoreFile(path) as sf:
        return sf.topk(group)


def read_scores(path: str | os.PathLike, names: Iterable[str] | None = None,
                as_torch: bool = False) -> dict[str, Any]:
    """Score tensors of a score file (all, or the parameters in ``names``)."""
    with ScoreFile(path) as sf:
        return sf.scores(names, as_torch=as_torch)


def read_candidates(path: str | os.PathLike) -> CandidateScores:
    """The sparse candidate scores of a score file."""
    with ScoreFile(path) as sf:
        return sf.candidates()


def read_stats(path: str | os.PathLike) -> list[TensorStats]:
    """Per-tensor statistics of a score file."""
    with ScoreFile(path) as sf:
        return sf.stats()


def read_accumulators(path: str | os.PathLike
                      ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """``(accumulators, counts)`` of a data-shard score file."""
    with ScoreFile(path) as sf:
        return sf.accumulators()


@dataclass(frozen=True)
class ScoreFileInfo:
    """Root attributes of a complete ``scores.h5`` plus which groups it holds."""

    attrs: dict[str, Any]
    manifest: dict[str, Any] | None
    has_topk: bool
    has_bottomk: bool
    has_scores: bool
    has_candidates: bool = False


def check_score_file(path: str | os.PathLike) -> ScoreFileInfo:
    """Open and validate ``scores.h5`` (complete, with its top-k); never reads score tensors."""
    with ScoreFile(path) as sf:
        try:
            if "topk" not in sf.h5:
                raise ResultFileError(f"{sf.path} has no topk/ group")
            _check_layout(sf)
            attrs = {k: v for k, v in sf.attrs().items() if k not in ("manifest_json", LAYOUT_ATTR)}
            manifest = sf.manifest()
        # damaged metadata inside a valid header (h5py raises RuntimeError for bad object headers)
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise ResultFileError(f"{sf.path} metadata is unreadable ({exc})") from None
        return ScoreFileInfo(attrs, manifest if isinstance(manifest, dict) else None,
                             "topk" in sf.h5, "bottomk" in sf.h5, "scores" in sf.h5, "candidates" in sf.h5)
