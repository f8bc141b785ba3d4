"""Typed records of the JSON result files a job writes, shared by the writer (esa) and the
reader (analysis, the job layer).

| file | record |
| --- | --- |
| eval.json (phase 1) | :class:`EvalRecord` (the figures of :class:`EvalFigures` + model, data, manifest id) |
| profile.json (phase 2) | :class:`ProfileRecord` |
| perturbation.json (phase 3) | :class:`PerturbationRecord` |
| experiment_manifest.json (every job, written last) | :class:`JobRecord` |
| error.json (a failed job) | :class:`ErrorRecord` |

Reading checks that the file parses and holds the record's required keys; anything else
raises :class:`ResultFileError` with a one-line reason, so a reader can list the job as
corrupt instead of failing. Keys beyond the record's fields are kept in ``extra`` and
written back unchanged. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from esa.core.errors import ResultFileError
from esa.core.io import atomic_write_json, read_json

__all__ = ["ResultFileError", "Record", "EvalFigures", "EvalRecord", "ProfileRecord",
           "PerturbationRecord", "JobRecord", "ErrorRecord", "read_record", "write_record"]

R = TypeVar("R", bound="Record")


@dataclass
class Record:
    """Base of the JSON records: fields in file order, unknown keys kept in ``extra``."""

    FILE: ClassVar[str] = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls: type[R], doc: Any, where: str | None = None) -> R:
        """The record of a parsed JSON object; ResultFileError when a required key is missing."""
        where = where or cls.FILE
        if not isinstance(doc, dict):
            raise ResultFileError(f"{where} is not a JSON object")
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = [f.name for f in fields(cls) if f.name in names and f.name not in doc
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ResultFileError(f"{where} lacks the {', '.join(missing)} field{'s' if len(missing) > 1 else ''}")
        record = cls(**{k: v for k, v in doc.items() if k in names})
        record.extra = {k: v for k, v in doc.items() if k not in names}
        return record


def read_record(cls: type[R], folder_or_file: str | Path) -> R:
    """Read record `cls` from its file (or from the folder that holds it)."""
    path = Path(folder_or_file)
    if path.is_dir() or path.name != cls.FILE:
        path = path / cls.FILE
    return cls.from_dict(read_json(path), path.name)


def write_record(folder: str | Path, record: Record) -> Path:
    """Write `record` atomically into `folder` under its file name."""
    return atomic_write_json(Path(folder) / record.FILE, record.to_dict())


@dataclass
class EvalFigures(Record):
    """The figures of one evaluation pass (PPL = exp(mean NLL over every predicted token))."""

    ppl: float
    nll: float
    token_accuracy: float
    n_tokens: int
    n_windows: int
    flags: list[str] = field(default_factory=list)
    per_window_nll: list[float] = field(default_factory=list)
    per_window_accuracy: list[float] = field(default_factory=list)

    @classmethod
    def non_finite(cls, n_windows: int, seq_len: int) -> EvalFigures:
        """The figures of a model whose loss is NaN/Inf: a result (PPL = inf), not an error."""
        inf = float("inf")
        return cls(ppl=inf, nll=inf, token_accuracy=float("nan"), n_tokens=n_windows * (seq_len - 1),
                   n_windows=n_windows, flags=["non-finite loss"], per_window_nll=[inf] * n_windows,
                   per_window_accuracy=[float("nan")] * n_windows)

    @property
    def finite(self) -> bool:
        """Whether the loss was finite."""
        return math.isfinite(self.nll)

    def summary(self) -> dict[str, float]:
        """ppl, nll, token_accuracy."""
        return {"ppl": self.ppl, "nll": self.nll, "token_accuracy": self.token_accuracy}


@dataclass
class EvalRecord(EvalFigures):
    """eval.json: a phase-1 evaluation with the model and data it was computed on."""

    FILE: ClassVar[str] = "eval.json"
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    manifest_id: str | None = None

    def figures(self) -> EvalFigures:
        """The figures without model and data."""
        return EvalFigures(**{f.name: getattr(self, f.name) for f in fields(EvalFigures) if f.name != "extra"})


@dataclass
class ProfileRecord(Record):
    """profile.json: what a phase-2 job ranked and how long it took (scores.h5 is the result)."""

    FILE: ClassVar[str] = "profile.json"
    metric: str
    mode: str
    topk: int
    n_ranked: int
    files: dict[str, Any] = field(default_factory=dict)
    unscored: Any = field(default_factory=list)
    top: list[dict[str, Any]] = field(default_factory=list)
    seconds: float | None = None
    n_windows: int | None = None
    seq_len: int | None = None
    seed: int | None = None
    shard: list[int] | None = None
    metric_extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class PerturbationRecord(Record):
    """perturbation.json: ΔPPL / ΔNLL of the targets, and each control's draws with p and z."""

    FILE: ClassVar[str] = "perturbation.json"
    perturbation: dict[str, Any]
    n_targets: int
    baseline: dict[str, Any]
    perturbed: dict[str, Any]
    delta_ppl: float | None
    delta_nll: float | None
    targets: list[str] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)
    perturbed_finite: bool = True
    delta_token_accuracy: float | None = None
    delta_nll_ci: dict[str, Any] | None = None
    controls: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline_per_window_nll: list[float] = field(default_factory=list)
    perturbed_per_window_nll: list[float] = field(default_factory=list)
    n_windows: int | None = None
    n_tokens: int | None = None
    seconds: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    manifest_id: str | None = None
    # A dose-response sweep (targets.topk a list of k): one entry per k, ascending, each with k and the
    # per-k fields above (n_targets, targets, applied, perturbed, perturbed_finite, delta_ppl,
    # delta_nll, delta_token_accuracy, delta_nll_ci, controls, perturbed_per_window_nll); the
    # fields above then hold the largest k. Absent (not written) for a single k.
    by_k: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object (by_k only for a sweep, so a single k keeps its keys)."""
        out = super().to_dict()
        if out.get("by_k") is None:
            out.pop("by_k", None)
        return out


@dataclass
class JobRecord(Record):
    """experiment_manifest.json: the manifest that ran, its provenance, its status and the checksums
    of its result files (esa.results.checksums), all written last."""

    FILE: ClassVar[str] = "experiment_manifest.json"
    manifest: dict[str, Any]
    status: str
    provenance: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether the job finished."""
        return self.status == "complete"


@dataclass
class ErrorRecord(Record):
    """error.json: why a job failed (kind: exception, user_error, out_of_memory, interrupted, preempted)."""

    FILE: ClassVar[str] = "error.json"
    kind: str = "exception"
    manifest_id: str | None = None
    phase: int | None = None
    type: str = ""
    message: str = ""
    traceback: list[str] = field(default_factory=list)
    start_time: str | None = None
    end_time: str | None = None

    def line(self) -> str:
        """``Type: message`` (either part may be empty)."""
        return ": ".join(x for x in (self.type, self.message) if x)
