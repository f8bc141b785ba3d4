"""The run folder: one object that owns every path of an experiment's jobs and records.

Layout of a run folder RUN = RUNS/<experiment>::

    RUN/manifests/<id>.json            one manifest per job (id = its content hash)
    RUN/manifests/index-phase<N>.txt   absolute manifest paths, one per line (array task i -> line i+1)
    RUN/plan-phase<N>.json             what expansion knew: resources, jobs' labels and needs, reduce steps
    RUN/results/<id>/                  the job's outputs.dir (absolute path written into the manifest)
    RUN/submissions/<time>-phase<N>.json   one record per submission (job ids, executor, git commit)
    RUN/logs/, RUN/submitit/           logs of local runs; submitit's pickles and Slurm logs
    RUN/report/                        the analysis report
    RUN/.submit.lock                   held by one `make submit` / `make resubmit` at a time

RUNS is, in this order: the caller's choice, $ESA_RUNS, the plan's `runs`, ./runs. Outputs
never leave RUN: experiment names are plain folder names and every path this object hands
out is checked against symlinks that point elsewhere. Torch-free.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esa.core.errors import UserError
from esa.core.io import atomic_write_json
from esa.spec.schema import escape_reason

__all__ = ["RUNS_ENV", "runs_root", "check_experiment_name", "RunLayout", "ensure_inside", "LOCK_TIMEOUT_ENV",
           "manifest_file_problem"]

LOCK_TIMEOUT_ENV = "ESA_SUBMIT_LOCK_TIMEOUT"  # seconds a submission waits for another one (default 600)

RUNS_ENV = "ESA_RUNS"
DEFAULT_RUNS = "runs"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ID = re.compile(r"^[0-9a-f]{12}$")


def runs_root(explicit: str | os.PathLike[str] | None = None, plan_default: str | None = None) -> Path:
    """The runs root, absolute: `explicit`, else $ESA_RUNS, else the plan's `runs`, else ./runs."""
    chosen = explicit or os.environ.get(RUNS_ENV) or plan_default or DEFAULT_RUNS
    return Path(os.path.abspath(os.path.expanduser(str(chosen))))


def check_experiment_name(name: str) -> str:
    """Refuse names that are not one plain folder name (they would place the run elsewhere)."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name):
        raise UserError(f"experiment name {name!r} must be a plain folder name "
                        "(letters, digits, '.', '_', '-'; no slashes, not starting with '.')")
    return name


def ensure_inside(run: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """`path` resolved (relative paths count from `run`); UserError if it escapes `run`.

    Escapes are '..' segments, absolute paths elsewhere, and symlinks that resolve outside."""
    reason = escape_reason(run, path)
    if reason:
        raise UserError(f"output path refused: {reason}")
    target = Path(path)
    return (target if target.is_absolute() else Path(run) / target).resolve()


def manifest_file_problem(doc: Any, path: str | os.PathLike[str]) -> str | None:
    """Why a manifest file of a run folder (RUN/manifests/<id>.json) cannot be trusted, or None.

    Expansion writes each manifest with its id, the content hash of what it computes, as its file
    name. A file without an id, whose id is not its name, or whose content no longer hashes to its
    id was edited afterwards: the job layer and `esa run` refuse it (expand the plan again)."""
    from esa.spec.manifest import manifest_id

    name = Path(path).name
    if not isinstance(doc, dict):
        return f"{name} is not a JSON object"
    mid = doc.get("id")
    if not mid:
        return f"{name} has no id (manifests in a run folder carry their content hash; expand the plan again)"
    if mid != Path(path).stem:
        return f"{name} says id {mid}, not its file name"
    actual = manifest_id(doc)
    if actual != mid:
        return f"{name} was edited after expansion (its content hashes to {actual}); expand the plan again"
    return None


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder (nothing is created until a writer asks)."""

    root: Path

    # ------------------------------------------------------------------------- finding a run
    @classmethod
    def experiment(cls, name: str, runs: str | os.PathLike[str] | None = None,
                   plan_default: str | None = None) -> RunLayout:
        """RUNS/<name> for an experiment (absolute; a symlinked run folder elsewhere is refused)."""
        root = runs_root(runs, plan_default)
        path = root / check_experiment_name(name)
        ensure_inside(root, path)
        return cls(path)

    @classmethod
    def of_manifest_file(cls, manifest_file: str | os.PathLike[str]) -> RunLayout | None:
        """The run of a file named RUN/manifests/<12-hex id>.json (what expansion writes), else None."""
        path = Path(manifest_file)
        if path.parent.name == "manifests" and _ID.match(path.stem):
            return cls(path.parent.parent)
        return None

    @classmethod
    def find(cls, run: str | None) -> RunLayout:
        """RUN as given (or a name under the runs root); else the most recently active run."""
        if run:
            path = Path(run)
            if not path.is_dir() and (runs_root() / run).is_dir():
                path = runs_root() / run
            if not path.is_dir():
                raise UserError(f"run folder '{run}' does not exist")
            return cls(path)
        root = runs_root()
        candidates = [cls(p) for p in root.glob("*") if (p / "manifests").is_dir()] if root.is_dir() else []
        if not candidates:
            raise UserError(f"no run folders under {root}/ yet: submit a plan first (make submit PHASE=N)")
        return max(candidates, key=lambda r: r.last_activity())

    def last_activity(self) -> float:
        """Time of the newest submission record (or of the manifests folder)."""
        times = [p.stat().st_mtime for p in self.submissions_dir.glob("*.json")]
        return max(times or [self.manifests_dir.stat().st_mtime])

    # ------------------------------------------------------------------------------- paths
    @property
    def name(self) -> str:
        """The experiment name (the folder's name)."""
        return self.root.name

    @property
    def manifests_dir(self) -> Path:
        """RUN/manifests."""
        return self.root / "manifests"

    def manifest_path(self, job_id: str) -> Path:
        """RUN/manifests/<id>.json."""
        return self.manifests_dir / f"{job_id}.json"

    def results_dir(self, job_id: str) -> Path:
        """RUN/results/<id>: the outputs.dir of job <id>."""
        return self.root / "results" / job_id

    def index_path(self, phase: int) -> Path:
        """RUN/manifests/index-phase<N>.txt."""
        return self.manifests_dir / f"index-phase{phase}.txt"

    def plan_record_path(self, phase: int) -> Path:
        """RUN/plan-phase<N>.json."""
        return self.root / f"plan-phase{phase}.json"

    @property
    def submissions_dir(self) -> Path:
        """RUN/submissions."""
        return self.root / "submissions"

    @property
    def submitit_dir(self) -> Path:
        """RUN/submitit: submitit's pickles and the Slurm logs."""
        return self.root / "submitit"

    def logs_dir(self, executor: str) -> Path:
        """RUN/logs/<executor>."""
        return self.root / "logs" / executor

    @property
    def report_dir(self) -> Path:
        """RUN/report."""
        return self.root / "report"

    def ensure_inside(self, path: str | os.PathLike[str]) -> Path:
        """`path` resolved; UserError if it escapes this run folder."""
        return ensure_inside(self.root, path)

    # ----------------------------------------------------------------------------- contents
    def manifest_files(self) -> list[Path]:
        """The expanded manifests (RUN/manifests/<id>.json), sorted by name."""
        if not self.manifests_dir.is_dir():
            raise UserError(f"{self.root} has no manifests/ folder: is it a run folder? "
                            "(expected runs/<experiment>, as written by `make submit`)")
        return sorted(p for p in self.manifests_dir.glob("*.json") if not p.name.startswith(("index", ".")))

    def submission_records(self) -> list[tuple[Path, dict[str, Any]]]:
        """(path, record) of every readable submission record, oldest first."""
        out = []
        for path in sorted(self.submissions_dir.glob("*.json")) if self.submissions_dir.is_dir() else []:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                out.append((path, record))
        return out

    def write_submission_record(self, record: dict[str, Any], path: Path | None = None) -> Path:
        """Write a submission record: a new RUN/submissions/<UTC time>-phase<N>.json, or `path` again."""
        if path is None:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            path = self.submissions_dir / f"{stamp}-phase{record.get('phase', 'x')}.json"
        atomic_write_json(path, record)
        return path

    # ------------------------------------------------------------------------------ locking
    @property
    def lock_path(self) -> Path:
        """RUN/.submit.lock."""
        return self.root / ".submit.lock"

    @contextlib.contextmanager
    def submission_lock(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the run folder's submission lock (one submit / resubmit at a time).

        A second submission waits (saying so on stderr) up to `timeout` seconds ($ESA_SUBMIT_LOCK_TIMEOUT,
        default 600), then fails with one line naming the holder. The lock is an flock on
        RUN/.submit.lock, released when the holder exits, however it exits."""
        import fcntl

        if timeout is None:
            timeout = float(os.environ.get(LOCK_TIMEOUT_ENV) or 600)
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.lock_path, "a+", encoding="utf-8")
        try:
            deadline, told = time.monotonic() + timeout, False
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = self._lock_holder()
                    if time.monotonic() >= deadline:
                        raise UserError(f"another submission into {self.root} is still running ({holder}); "
                                        "wait for it to finish, then submit again") from None
                    if not told:
                        print(f"waiting for another submission into {self.root} to finish ({holder})",
                              file=sys.stderr, flush=True)
                        told = True
                    time.sleep(0.5)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {_dt.datetime.now():%Y-%m-%d %H:%M:%S}\n")
            fh.flush()
            yield
        finally:
            fh.close()  # releases the flock

    def _lock_holder(self) -> str:
        try:
            return self.lock_path.read_text(encoding="utf-8").strip() or "holder unknown"
        except OSError:
            return "holder unknown"
