"""What one array task runs: a manifest through `esa.runner`, with checkpoint and requeue.

Two runners share the same contract (`esa run MANIFEST` semantics, exit 75 = pre-empted):

* `EsaTask` — the callable submitit pickles for the Slurm and debug executors. It runs the
  manifest in the task's own Python process, so a USR1/USR2 from Slurm (time limit or
  pre-emption) reaches esa's stop flag; the phase-2 loop then finishes the batch in flight,
  saves a checkpoint and raises `Preempted`, and the task requeues itself.
* `run_local` — EXECUTOR=local: `python -m esa run` as a subprocess, one manifest at a time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

# A task that keeps being pre-empted without finishing is a bug (or a hopeless time limit):
# give up after this many requeues instead of looping forever.
MAX_REQUEUES = 20
# Resume-in-place attempts when no scheduler can requeue (debug executor, local runs).
MAX_LOCAL_RESUMES = 20
STOP_HOOK = "ESA_STOP_AFTER_BATCHES"
SELF_REQUEUE_ENV = "ESA_SELF_REQUEUE"  # "0": leave the requeue to the batch script's teardown
# Lines submitit appends to the sbatch script after `srun ...`: when the task exited with
# EXIT_PREEMPTED (75) without requeueing itself (no scontrol inside the image), the batch
# script, which runs on the host where scontrol exists, requeues it.
REQUEUE_TEARDOWN = [
    'esa_rc=$?',
    'if [ "$esa_rc" -eq 75 ]; then',
    '  esa_task="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"',
    '  echo "esa task pre-empted (exit 75): scontrol requeue ${esa_task:-$SLURM_JOB_ID}" >&2',
    '  scontrol requeue "${esa_task:-$SLURM_JOB_ID}" && sleep 60',
    'fi',
    'exit "$esa_rc"',
]


def slurm_task_id() -> str | None:
    """The id `scontrol requeue` needs: ARRAYJOB_TASK for an array task, else the job id."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        # SLURM_JOB_ID of an array task is its own numeric id; requeueing by that also works,
        # but ARRAYJOB_TASK is what sacct/squeue show and what the logs name.
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def _restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _drop_test_stop_hook_after_first_attempt() -> None:
    """ESA_STOP_AFTER_BATCHES is a test hook meant to fire once per task, not on every attempt.

    Without this a requeued attempt would stop itself again after N batches and, for a job
    of more than N batches per attempt, never finish.
    """
    if _restart_count() > 0:
        os.environ.pop(STOP_HOOK, None)


class EsaTask(submitit.helpers.Checkpointable):
    """Run one manifest file inside a submitit job; requeue it when it is pre-empted.

    `EsaTask(path)()` runs `path`; `EsaTask()(path)` does the same, which is the form
    `executor.map_array(EsaTask(), paths)` uses. Returns a small JSON-able record (the
    results themselves are files in the manifest's output folder).
    """

    def __init__(self, manifest_path: str | os.PathLike | None = None) -> None:
        self.manifest_path = None if manifest_path is None else str(manifest_path)

    def __call__(self, manifest_path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Run the manifest; on pre-emption requeue (Slurm) or resume in place (elsewhere)."""
        from esa import checkpoint
        from esa.logs import setup_logging
        from esa.runner import run_file

        path = str(manifest_path or self.manifest_path or "")
        if not path:
            from esa.errors import UserError

            raise UserError("EsaTask needs a manifest path")
        setup_logging("INFO")
        # submitit bound USR2 to "checkpoint the callable and requeue now", which would kill
        # the batch in flight and lose it; esa's handler only sets a flag that the phase-2
        # loop checks at the next batch boundary, where the accumulators are consistent.
        checkpoint.install_stop_signals()
        checkpoint.clear_stop()
        _drop_test_stop_hook_after_first_attempt()
        on_slurm = slurm_task_id() is not None and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        for attempt in range(MAX_LOCAL_RESUMES + 1):
            try:
                summary = run_file(path)
                return {"manifest": path, "status": "complete", "attempts": attempt + 1,
                        "restarts": _restart_count(), "summary_keys": sorted(summary)}
            except checkpoint.Preempted:
                if on_slurm:
                    self._requeue_and_exit()
                # No scheduler to requeue us: resume from the checkpoint right here. The test
                # hook has done its job once; a second stop would only repeat the same test.
                os.environ.pop(STOP_HOOK, None)
                checkpoint.clear_stop()
        raise RuntimeError(f"{path}: pre-empted {MAX_LOCAL_RESUMES + 1} times in a row")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """What submitit resubmits after a requeue: this same task.

        The state lives on disk (OUT/checkpoint/, written by esa), so the task object itself
        needs no update; the requeued task finds the checkpoint and resumes.
        """
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    @staticmethod
    def _requeue_and_exit() -> None:
        from esa.checkpoint import EXIT_PREEMPTED

        task = slurm_task_id()
        if _restart_count() >= MAX_REQUEUES:
            raise RuntimeError(f"task {task} was requeued {MAX_REQUEUES} times without finishing; "
                               "giving up (its checkpoint is kept; `make resubmit` continues it)")
        # SystemExit passes submitit's `except Exception`, so no result pickle is written and
        # the submitter keeps waiting for the requeued attempt.
        if shutil.which("scontrol") is None or os.environ.get(SELF_REQUEUE_ENV) == "0":
            # Inside an image without the Slurm client: exit 75 and let the batch script,
            # which runs on the host, requeue (the teardown jobs.submit adds, REQUEUE_TEARDOWN).
            print(f"[esa-jobs] pre-empted: checkpoint saved; exit {EXIT_PREEMPTED} asks the batch script "
                  f"to requeue task {task}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_PREEMPTED)
        # submitit's own requeue also runs `scontrol requeue` from inside the job; for an
        # array task the id must be ARRAYJOB_TASK (or the task's own SLURM_JOB_ID).
        subprocess.run(["scontrol", "requeue", str(task)], check=True, timeout=60)
        print(f"[esa-jobs] pre-empted: checkpoint saved, task {task} requeued", file=sys.stderr, flush=True)
        # Exit 0, not 75: the task is already requeued; 75 would make the teardown requeue again.
        raise SystemExit(0)


@dataclass
class LocalResult:
    """Outcome of one manifest run by `run_local`."""

    manifest: str
    returncode: int
    attempts: int
    seconds: float
    log: str


def run_local(manifest_paths: list[str | os.PathLike], log_dir: str | os.PathLike,
              python: str | None = None, echo: bool = True) -> list[LocalResult]:
    """EXECUTOR=local: run each manifest with `python -m esa run`, one after another.

    A run that exits with EXIT_PREEMPTED (75) is started again and resumes from its
    checkpoint. Output goes to LOG_DIR/<manifest stem>.log. Failures do not stop the loop:
    the next manifests still run, and `make status` shows what failed.
    """
    from esa.checkpoint import EXIT_PREEMPTED

    python = python or sys.executable
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, manifest in enumerate(manifest_paths, 1):
        log = log_dir / f"{Path(manifest).stem}.log"
        t0 = time.perf_counter()
        env = dict(os.environ)
        rc, attempts = 0, 0
        while attempts <= MAX_LOCAL_RESUMES:
            attempts += 1
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(f"=== attempt {attempts}: {python} -m esa run {manifest}\n")
                fh.flush()
                rc = subprocess.run([python, "-m", "esa", "run", "--quiet", str(manifest)], env=env,
                                    stdout=fh, stderr=subprocess.STDOUT).returncode
            if rc != EXIT_PREEMPTED:
                break
            env.pop(STOP_HOOK, None)  # the test hook fires once per manifest, as on Slurm
        seconds = time.perf_counter() - t0
        results.append(LocalResult(str(manifest), rc, attempts, seconds, str(log)))
        if echo:
            state = "done" if rc == 0 else f"FAILED (exit {rc}; log {log})"
            print(f"[{i}/{len(manifest_paths)}] {Path(manifest).stem}: {state} in {seconds:.1f} s", flush=True)
    return results
