"""What one job runs, wherever it runs: a manifest through `esa.runner`, with checkpoint and requeue.

`EsaTask` is the one callable every executor runs (Slurm arrays, submitit's local executor, and
in-process through its debug executor). It runs the manifest in the task's own Python process,
so the scheduler's warning signal (USR1/USR2, TERM) reaches esa's stop flag: the phase-2 loop
finishes the batch in flight, saves a checkpoint and raises `Preempted`. Then the task asks its
scheduler to run it again, where it resumes from the checkpoint:

* Slurm: ``scontrol requeue`` of this array task (or, inside an image without the Slurm client,
  exit 75 and the batch script's teardown requeues it);
* submitit's local executor: exit 144, which makes its controller start the task again;
* in process (debug executor, `esa profile --seeds`, the demo): `Preempted` propagates to the caller.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import submitit

from esa.spec.manifest import Manifest

# A task that keeps being pre-empted without finishing is a bug (or a hopeless time limit):
# give up after this many requeues instead of looping forever.
MAX_REQUEUES = 20
STOP_HOOK = "ESA_STOP_AFTER_BATCHES"
SELF_REQUEUE_ENV = "ESA_SELF_REQUEUE"  # "0": leave the requeue to the batch script's teardown
LOCAL_REQUEUE_EXIT = 144  # submitit's local controller restarts a task that exits with this code


def _restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _scheduler() -> str:
    """slurm, local (submitit's local controller) or none (in process)."""
    from jobs.slurm import slurm_task_id

    if slurm_task_id() is not None and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return "slurm"
    if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
        return "local"
    return "none"


class EsaTask(submitit.helpers.Checkpointable):
    """Run one manifest (a file path, or a typed Manifest); requeue it when it is pre-empted.

    `EsaTask(m)()` runs `m`; `EsaTask()(m)` does the same, which is the form
    `executor.map_array(EsaTask(), manifests)` uses. Returns a small JSON-able record (the
    results themselves are files in the manifest's output folder).
    """

    def __init__(self, manifest: str | os.PathLike | Manifest | None = None) -> None:
        self.manifest = manifest if isinstance(manifest, Manifest) or manifest is None else str(manifest)

    def __call__(self, manifest: str | os.PathLike | Manifest | None = None) -> dict[str, Any]:
        """Run the manifest; on pre-emption requeue it (Slurm, local) or raise `Preempted` (in process)."""
        from esa.core import stop
        from esa.core.logs import setup_logging
        from esa.runner import run, run_file

        target = manifest if manifest is not None else self.manifest
        if target is None:
            from esa.core.errors import UserError

            raise UserError("EsaTask needs a manifest")
        scheduler = _scheduler()
        if scheduler != "none":
            env = _join_ranks()
            setup_logging("INFO", rank=env.rank)  # in process, the caller (the esa command) has set logging up
        else:
            from esa.parallel.launch import detect_env

            env = detect_env()
        # The one place the cluster's warning signals are routed to esa. submitit bound USR2 to
        # "checkpoint the callable and requeue now", which would kill the batch in flight and lose
        # it; esa's handler only sets a flag that the phase-2 loop checks at the next batch
        # boundary, where the accumulators are consistent.
        stop.install_stop_signals()
        stop.clear_stop()
        if scheduler != "none" and _resuming(target):
            # A test hook that stops a job fires on the first attempt a scheduler starts, not on its restarts.
            os.environ.pop(STOP_HOOK, None)
        try:
            summary = run(target) if isinstance(target, Manifest) else run_file(target)
        except stop.Preempted:
            if scheduler == "slurm" and env.rank > 0:
                raise SystemExit(0) from None  # rank 0 requeues the whole job; its checkpoint holds every rank's part
            if scheduler == "slurm":
                self._requeue_on_slurm()
            if scheduler == "local":
                print("[esa-jobs] pre-empted: checkpoint saved; the local controller restarts the task",
                      file=sys.stderr, flush=True)
                raise SystemExit(LOCAL_REQUEUE_EXIT)
            raise
        return {"manifest": str(target.id if isinstance(target, Manifest) else target), "status": "complete",
                "restarts": _restart_count(), "summary": summary}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """What submitit resubmits after a requeue: this same task.

        The state lives on disk (OUT/checkpoint/, written by esa), so the task object itself
        needs no update; the requeued task finds the checkpoint and resumes.
        """
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    @staticmethod
    def _requeue_on_slurm() -> None:
        from esa.core.stop import EXIT_PREEMPTED
        from jobs.slurm import slurm_task_id

        task = slurm_task_id()
        if _restart_count() >= MAX_REQUEUES:
            raise RuntimeError(f"task {task} was requeued {MAX_REQUEUES} times without finishing; "
                               "giving up (its checkpoint is kept; `make resubmit` continues it)")
        # SystemExit passes submitit's `except Exception`, so no result pickle is written and
        # the submitter keeps waiting for the requeued attempt.
        if shutil.which("scontrol") is None or os.environ.get(SELF_REQUEUE_ENV) == "0":
            # Inside an image without the Slurm client: exit 75 and let the batch script,
            # which runs on the host, requeue (the teardown jobs.slurm adds, REQUEUE_TEARDOWN).
            print(f"[esa-jobs] pre-empted: checkpoint saved; exit {EXIT_PREEMPTED} asks the batch script "
                  f"to requeue task {task}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_PREEMPTED)
        subprocess.run(["scontrol", "requeue", str(task)], check=True, timeout=60)
        print(f"[esa-jobs] pre-empted: checkpoint saved, task {task} requeued", file=sys.stderr, flush=True)
        # Exit 0, not 75: the task is already requeued; 75 would make the teardown requeue again.
        raise SystemExit(0)


def _join_ranks() -> Any:
    """This task's place in a job of several tasks (Slurm srun or submitit's local controller): submitit's
    TorchDistributedEnvironment exports RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address, which
    esa.parallel reads. One task: nothing to export."""
    from esa.parallel.launch import detect_env

    job = submitit.JobEnvironment()
    if job.num_tasks > 1:
        # Each task keeps every GPU of its node visible; esa.parallel picks cuda:LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return detect_env()


def _resuming(target: str | Manifest) -> bool:
    """Whether a checkpoint of this job is waiting (this attempt resumes an earlier one)."""
    from esa.core.errors import UserError
    from esa.core.io import read_json

    try:
        out = Path(target.outputs.dir if isinstance(target, Manifest) else read_json(target)["outputs"]["dir"])
    except (UserError, KeyError, TypeError):
        return False
    return (out / "checkpoint").is_dir()
