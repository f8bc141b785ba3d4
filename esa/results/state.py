"""Is this job done? The one answer, from its result folder alone, for `make status` and the analysis.

States (`STATES`):

* ``done`` — experiment_manifest.json says complete, is not older than an error.json, every
  result file it lists has its recorded size and checksum (esa.results.checksums), and the
  phase's result file verifies (eval.json / perturbation.json parse with their fields and no
  NaN literals; scores.h5 opens, is complete, matches its size/shape record and holds its
  ranked lists). A folder holding only a reduced scores.h5 (what `esa reduce` writes) is done too.
* ``failed`` — the newest record is error.json (reason: its kind, e.g. exception, out_of_memory).
* ``preempted`` — stopped with a checkpoint that the next run resumes from.
* ``corrupt`` — says complete, but a result file is missing, truncated or malformed.
* ``incomplete`` — a folder without a complete record (still running, or killed).
* ``missing`` — no folder at all.

The scheduler's view (pending, running) is added by the job layer on top. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esa.results.checksums import verify_files
from esa.results.records import (ErrorRecord, EvalRecord, JobRecord, PerturbationRecord, ResultFileError,
                                 read_record)

__all__ = ["DONE", "FAILED", "PREEMPTED", "CORRUPT", "INCOMPLETE", "MISSING", "STATES", "JobState", "job_state",
           "verify_results", "RESULT_FILES"]

DONE, FAILED, PREEMPTED, CORRUPT, INCOMPLETE, MISSING = "done", "failed", "preempted", "corrupt", "incomplete", "missing"
STATES = (DONE, FAILED, PREEMPTED, CORRUPT, INCOMPLETE, MISSING)
RESULT_FILES = {1: "eval.json", 2: "scores.h5", 3: "perturbation.json"}
CHECKPOINT_DIR = "checkpoint"


@dataclass
class JobState:
    """A job folder's state, why, and the records it was read from."""

    state: str
    reason: str = ""
    message: str = ""
    manifest: dict[str, Any] | None = None
    record: JobRecord | None = None
    error: ErrorRecord | None = None

    @property
    def done(self) -> bool:
        """Whether the job finished and its results verify."""
        return self.state == DONE


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")


def _check_numbers(record: Any, names: tuple[str, ...], nullable: bool = False) -> None:
    """The record's fields `names` are numbers (or, when `nullable`, null: esa writes non-finite as null)."""
    for name in names:
        value = getattr(record, name)
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ResultFileError(f"{record.FILE}: {name} is {value!r}, not a number")


def verify_results(folder: Path, phase: Any) -> None:
    """Check the phase's result file; ResultFileError with a one-line reason when it is broken."""
    if phase == 1:
        _check_numbers(read_record(EvalRecord, folder), ("ppl", "nll", "n_tokens", "n_windows"))
    elif phase == 2:
        from esa.results.scorefile import check_score_file

        check_score_file(folder / "scores.h5")
    elif phase == 3:
        record = read_record(PerturbationRecord, folder)
        _check_numbers(record, ("delta_ppl", "delta_nll"), nullable=True)
        _check_numbers(record, ("n_targets",))
    else:
        raise ResultFileError(f"unknown phase {phase!r}")


def _reduced(folder: Path) -> JobState:
    """A folder with scores.h5 but no experiment_manifest.json: done if `esa reduce` wrote it."""
    from esa.results.scorefile import check_score_file

    try:
        info = check_score_file(folder / "scores.h5")
    except ResultFileError as exc:
        return JobState(CORRUPT, "corrupt", str(exc))
    if "reduced_from" not in info.attrs:
        # A profiling job writes scores.h5 just before experiment_manifest.json: a folder
        # caught in between (or killed there) is not finished.
        return JobState(INCOMPLETE, "incomplete", "scores.h5 written but no experiment_manifest.json",
                        manifest=info.manifest)
    return JobState(DONE, manifest=info.manifest)


def job_state(folder: str | Path, *, verify: bool = True, deep: bool | None = None) -> JobState:
    """The state of the job whose outputs.dir is `folder` (see the module docstring).

    `deep` hashes every result file (default: ESA_VERIFY=full; otherwise large files whose
    modification time is unchanged are checked by size, see esa.results.checksums)."""
    folder = Path(folder)
    if not folder.is_dir():
        return JobState(MISSING)
    em_path, err_path = folder / JobRecord.FILE, folder / ErrorRecord.FILE
    record: JobRecord | None = None
    em_error: str | None = None
    if em_path.is_file():
        try:
            record = read_record(JobRecord, em_path)
        except ResultFileError as exc:
            em_error = str(exc)
    manifest = record.manifest if record is not None else None
    # error.json newer than experiment_manifest.json wins: the last run failed.
    if err_path.is_file() and (record is None or _mtime(err_path) >= _mtime(em_path)):
        try:
            error = read_record(ErrorRecord, err_path)
        except ResultFileError as exc:
            error = ErrorRecord(kind="exception", message=str(exc))
        if error.kind == "preempted" and (folder / CHECKPOINT_DIR).is_dir():
            return JobState(PREEMPTED, "preempted", "checkpoint kept; resubmit to resume", manifest, record, error)
        return JobState(FAILED, error.kind, error.line(), manifest, record, error)
    if record is None and em_error is None:
        if (folder / "scores.h5").is_file():
            return _reduced(folder)
        if (folder / CHECKPOINT_DIR).is_dir():
            return JobState(PREEMPTED, "preempted", "checkpoint kept; resubmit to resume")
        return JobState(INCOMPLETE, "incomplete", "no experiment_manifest.json (still running, or killed)")
    if em_error is not None:
        return JobState(CORRUPT, "corrupt", em_error)
    assert record is not None
    if not record.complete:
        return JobState(INCOMPLETE, "incomplete", f"experiment_manifest.json status is {record.status!r}",
                        manifest, record)
    if verify:
        try:
            # The specific reason first (truncated, not JSON, no complete flag), then the checksums
            # that catch what still parses (a partial overwrite, an edited number).
            verify_results(folder, (manifest or {}).get("phase"))
            verify_files(folder, record.files, deep)
        except ResultFileError as exc:
            return JobState(CORRUPT, "corrupt", str(exc), manifest, record)
    return JobState(DONE, manifest=manifest, record=record)
