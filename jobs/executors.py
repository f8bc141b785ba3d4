"""Where jobs run, through submitit: one after another on this machine, or as Slurm arrays.

* ``debug`` — in this process (submitit's DebugExecutor), one job after another: what `esa profile
  --seeds`, `make demo` and `make submit EXECUTOR=debug` use. A pre-empted job stops the run
  (`Preempted` reaches the caller, who exits 75 so a wrapper can requeue).
* ``local`` — submitit's LocalExecutor, one subprocess per job, one job after another: a job
  pre-empted by the controller's warning signal (``signal_delay_s`` before ``timeout_min``)
  checkpoints, exits 144 and is started again, resuming from its checkpoint.
* ``slurm`` — submitit's AutoExecutor: one array per chunk of MaxArraySize (see jobs.submit).

A job whose `needs` failed is skipped, not run. Every executor runs the same callable,
jobs.task.EsaTask.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esa.spec.plan import Job

__all__ = ["Outcome", "run_in_process", "run_local", "LOCAL_DEFAULT_TIMEOUT_MIN", "LOCAL_SIGNAL_DELAY_S"]

# The local executor kills a job after timeout_min; a plan's resources.time sets it. Locally a
# "time limit" only protects against hangs, so the default is long.
LOCAL_DEFAULT_TIMEOUT_MIN = 24 * 60
LOCAL_SIGNAL_DELAY_S = 30


@dataclass
class Outcome:
    """What happened to one job."""

    job: Job
    state: str  # done, failed, preempted, skipped
    message: str = ""
    seconds: float = 0.0
    attempts: int = 1
    log: str = ""
    exception: BaseException | None = field(default=None, repr=False)  # in process only

    @property
    def ok(self) -> bool:
        """Whether the job finished."""
        return self.state == "done"

    def to_record(self) -> dict[str, Any]:
        """The JSON entry of a submission record."""
        return {"manifest_id": self.job.id, "state": self.state, "ok": self.ok, "message": self.message,
                "seconds": round(self.seconds, 2), "attempts": self.attempts, "log": self.log}


Runner = Callable[[Job], Outcome]


def _serial(jobs: Sequence[Job], run_one: Runner, echo: bool) -> list[Outcome]:
    """Run jobs in order; skip those whose needs failed; stop after a pre-emption."""
    outcomes: list[Outcome] = []
    failed: set[str] = set()
    for i, job in enumerate(jobs, 1):
        missing = [n for n in job.needs if n in failed]
        if missing:
            outcome = Outcome(job, "skipped", f"needs {', '.join(missing)}, which did not finish")
        else:
            outcome = run_one(job)
        outcomes.append(outcome)
        if not outcome.ok:
            failed.add(job.id)
        if echo:
            state = "done" if outcome.ok else f"{outcome.state.upper()}" + (f": {outcome.message}" if outcome.message
                                                                              else "")
            print(f"[{i}/{len(jobs)}] {job.id} {_label(job)}: {state} in {outcome.seconds:.1f} s", flush=True)
        if outcome.state == "preempted":
            break
    return outcomes


def _label(job: Job) -> str:
    return " ".join(f"{k}={v}" for k, v in job.labels.items() if k not in ("params", "ranking", "controls"))


def run_in_process(jobs: Sequence[Job], *, folder: Path, echo: bool = True) -> list[Outcome]:
    """Run the jobs here, one after another, through submitit's debug executor."""
    import submitit

    from esa.core.stop import Preempted
    from jobs.task import EsaTask

    executor = submitit.AutoExecutor(folder=str(folder), cluster="debug")

    def one(job: Job) -> Outcome:
        t0 = time.perf_counter()
        # exception() runs the job in this process and hands back what it raised (result() would
        # open a debugger on a failure).
        error = executor.submit(EsaTask(), job.manifest).exception()
        seconds = time.perf_counter() - t0
        if error is None:
            return Outcome(job, "done", seconds=seconds)
        state = "preempted" if isinstance(error, Preempted) else "failed"
        return Outcome(job, state, f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}",
                       seconds, exception=error)

    return _serial(jobs, one, echo)


def run_local(jobs: Sequence[Job], *, folder: Path, manifest_path: Callable[[Job], Path] | None = None,
              timeout_min: float = LOCAL_DEFAULT_TIMEOUT_MIN, signal_delay_s: int = LOCAL_SIGNAL_DELAY_S,
              echo: bool = True) -> list[Outcome]:
    """Run the jobs one after another, each in its own process (a sharded job: one process per rank,
    `parallel.gpus_per_node` tasks on this one machine), through submitit's local executor.

    `manifest_path(job)` names the job's manifest file when it has one (plans); otherwise the
    typed manifest itself is handed over."""
    import submitit
    from submitit.core.utils import UncompletedJobError

    from jobs.task import MAX_REQUEUES, EsaTask

    executor = submitit.LocalExecutor(folder=str(folder / "%j"), max_num_timeout=MAX_REQUEUES)

    def one(job: Job) -> Outcome:
        t0 = time.perf_counter()
        parallel, resources = job.manifest.parallel, job.manifest.resources
        if parallel.nodes > 1:
            return Outcome(job, "failed", f"the local executor runs on one machine; this job asks for "
                                          f"{parallel.nodes} nodes (submit it to Slurm)")
        gpus = int(resources.gpus) if resources is not None and resources.gpus != "auto" else 0
        executor.update_parameters(timeout_min=timeout_min, signal_delay_s=signal_delay_s,
                                   tasks_per_node=parallel.gpus_per_node, gpus_per_node=gpus * parallel.gpus_per_node)
        target: Any = str(manifest_path(job)) if manifest_path is not None else job.manifest
        sub = executor.submit(EsaTask(), target)
        try:
            sub.results()  # one result per task (rank)
            state, message = "done", ""
        except UncompletedJobError as exc:  # FailedJobError too: the task raised, or was killed
            state, message = "failed", _last_error_line(str(exc))
        log = sub.paths.stderr
        return Outcome(job, state, message, time.perf_counter() - t0, _attempts(log, job.id), str(log))

    return _serial(jobs, one, echo)


def _attempts(log: Path, job_id: str) -> int:
    """How many times the task was started (esa.runner logs "phase N job <id> -> OUT" at each start)."""
    try:
        return max(1, log.read_text(errors="replace").count(f" job {job_id} -> "))
    except OSError:
        return 1


def _last_error_line(text: str) -> str:
    """The exception line of a traceback submitit returns as text (one line for a table)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "~")) and ":" in line:
            return line[:300]
    return lines[-1][:300] if lines else "failed"
