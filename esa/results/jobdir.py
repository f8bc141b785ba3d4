"""A job's output folder before the job runs: usable, and holding nothing of an earlier run that could mislead.

:func:`prepare_job_dir` is what the runner calls first:

* the folder is created; a path that is a file, lies under a file, or cannot be written is one
  clear line (UserError), before any model is loaded;
* a folder that already holds this job's complete, verified result is left alone and reported
  (the runner skips the job: a requeued or resubmitted task never redoes or un-marks it);
* a folder holding another job's complete result is refused (its exports would otherwise sit
  next to this job's files);
* otherwise what an earlier attempt left is cleared: result files and exports (JOB_OUTPUTS,
  ``plots/``), the old record and error.json, stale temporaries of killed atomic writes, and a
  checkpoint that belongs to another job. This job's own checkpoint (a pre-empted attempt) and
  its esa.log stay. Files esa does not write are never touched. Torch-free.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from esa.core.errors import UserError
from esa.core.io import is_temporary, make_temp_file, read_json
from esa.core.logs import get_logger
from esa.results.state import CHECKPOINT_DIR, JobState, job_state

__all__ = ["JOB_OUTPUTS", "prepare_job_dir", "remove_stale_temporaries", "ensure_writable_dir"]

log = get_logger("results")

# Every file a job of any phase writes into its folder (besides esa.log), and its plot folder.
JOB_OUTPUTS = ("experiment_manifest.json", "error.json", "eval.json", "config.json", "scores.h5", "profile.json",
               "top_weights.csv", "sensitivity_stats.csv", "sensitivity_stats.json", "super_weights.json",
               "perturbation.json")
PLOTS_DIR = "plots"
CHECKPOINT_TMP = f".{CHECKPOINT_DIR}.tmp"


def ensure_writable_dir(folder: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create `folder` (and its parents) and check that files can be written in it; UserError otherwise."""
    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == folder else f"lies under {parent}, which is a file"
            raise UserError(f"{what} {folder} {where}, not a folder")
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = make_temp_file(folder / ".write-test")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        reason = "read-only file system" if exc.errno == errno.EROFS else (exc.strerror or str(exc))
        raise UserError(f"cannot write into {what} {folder}: {reason}") from None
    return folder


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Delete what killed atomic writes left in a job folder (``.<name>.*.tmp``, ``.checkpoint.tmp/``)."""
    removed = []
    for sub in (folder, folder / PLOTS_DIR):
        if not sub.is_dir():
            continue
        for p in sub.iterdir():
            if p.is_file() and is_temporary(p.name):
                p.unlink(missing_ok=True)
                removed.append(p.name)
    if (folder / CHECKPOINT_TMP).is_dir():
        shutil.rmtree(folder / CHECKPOINT_TMP, ignore_errors=True)
        removed.append(CHECKPOINT_TMP)
    return removed


def _checkpoint_owner(folder: Path) -> str | None:
    try:
        state = read_json(folder / CHECKPOINT_DIR / "state.json")
    except UserError:
        return None
    return state.get("manifest_id") if isinstance(state, dict) else None


def _clear_outputs(folder: Path, manifest_id: str) -> list[str]:
    """Remove the files an earlier attempt (of this or another job) wrote; keep this job's checkpoint."""
    removed = [name for name in JOB_OUTPUTS if (folder / name).is_file()]
    for name in removed:
        (folder / name).unlink(missing_ok=True)
    if (folder / PLOTS_DIR).is_dir():
        shutil.rmtree(folder / PLOTS_DIR, ignore_errors=True)
        removed.append(PLOTS_DIR + "/")
    if (folder / CHECKPOINT_DIR).is_dir() and _checkpoint_owner(folder) != manifest_id:
        shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)
        removed.append(CHECKPOINT_DIR + "/ (another job's)")
    return removed


def _owner(state: JobState) -> str | None:
    return (state.manifest or {}).get("id")


def prepare_job_dir(folder: str | os.PathLike[str], manifest_id: str) -> JobState | None:
    """Make `folder` ready for job `manifest_id` (see the module docstring).

    Returns the folder's state when it already holds this job's complete, verified result (the
    caller skips the job), else None once the folder is ready."""
    folder = ensure_writable_dir(folder)
    state = job_state(folder)
    owner = _owner(state)
    if state.done and owner in (manifest_id, None):
        return state
    complete_record = state.record is not None and state.record.complete
    if (state.done or complete_record) and owner != manifest_id:
        what = "complete" if state.done else "complete but corrupt"
        raise UserError(f"output folder {folder} holds the {what} results of another job ({owner}, phase "
                        f"{(state.manifest or {}).get('phase')}); choose another output folder, or delete that one "
                        "to reuse it")
    stale = remove_stale_temporaries(folder)
    removed = _clear_outputs(folder, manifest_id)
    if stale or removed:
        log.info("cleared what an earlier run left in %s: %s", folder, ", ".join(stale + removed))
    return None
