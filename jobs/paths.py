"""Where runs live: the runs root, one folder per experiment, and the rule that outputs stay inside it.

Layout of a run folder RUN = RUNS/<experiment>:

    RUN/manifests/<id>.json          one manifest per job (id = esa.manifest.manifest_id)
    RUN/manifests/index-phase<N>.txt  absolute manifest paths, one per line (array task i -> line i+1)
    RUN/plan-phase<N>.json           what expansion knew: resources, jobs' labels and needs, reduce steps
    RUN/results/<id>/                the job's outputs.dir (absolute path written into the manifest)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from esa.errors import UserError
from esa.schema import escape_reason

RUNS_ENV = "ESA_RUNS"
DEFAULT_RUNS = "runs"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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


def run_dir(experiment: str, root: str | os.PathLike[str] | None = None) -> Path:
    """RUNS/<experiment> (absolute; not created)."""
    root_path = runs_root(root)
    path = root_path / check_experiment_name(experiment)
    ensure_inside(root_path, path)  # a symlinked run folder pointing elsewhere is refused
    return path


def ensure_inside(run: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """`path` resolved (relative paths count from `run`); UserError if it escapes `run`.

    Escapes are '..' segments, absolute paths elsewhere, and symlinks that resolve outside."""
    reason = escape_reason(run, path)
    if reason:
        raise UserError(f"output path refused: {reason}")
    target = Path(path)
    return (target if target.is_absolute() else Path(run) / target).resolve()


def manifests_dir(run: Path) -> Path:
    """RUN/manifests."""
    return run / "manifests"


def manifest_path(run: Path, job_id: str) -> Path:
    """RUN/manifests/<id>.json."""
    return manifests_dir(run) / f"{job_id}.json"


def results_dir(run: Path, job_id: str) -> Path:
    """RUN/results/<id>: the outputs.dir of job <id>."""
    return run / "results" / job_id


def index_path(run: Path, phase: int) -> Path:
    """RUN/manifests/index-phase<N>.txt."""
    return manifests_dir(run) / f"index-phase{phase}.txt"


def plan_record_path(run: Path, phase: int) -> Path:
    """RUN/plan-phase<N>.json."""
    return run / f"plan-phase{phase}.json"
