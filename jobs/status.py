"""`make status` / `make resubmit`: what each manifest of a run is doing, from its files and the scheduler.

A manifest's state comes from, in this order of trust:
1. its result folder, read by esa.results.state.job_state (the same answer the analysis gets):
   done only when the record says complete and the result files verify;
2. the scheduler, for the newest Slurm job that ran it (RUN/submissions/*.json; `squeue -r` for
   the tasks queued or running now, with the current pending reason; `sacct` for the rest):
   PENDING / RUNNING / REQUEUED ... -> pending / running, whatever old files say;
3. the result folder's failed / preempted / corrupt / incomplete state, with Slurm's final state
   (TIMEOUT, CANCELLED, OUT_OF_MEMORY, NODE_FAIL ...) as the reason when it killed the job;
4. a local run's outcome in the newest submission record, when the folder says nothing (a run
   still in flight is running while its submitting process lives, failed once it is gone);
5. nothing at all -> missing (never submitted, or its job vanished).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from esa.core.errors import UserError
from esa.core.io import read_json
from esa.results.layout import RunLayout, manifest_file_problem
from esa.results.state import CORRUPT, DONE, FAILED, INCOMPLETE, MISSING, PREEMPTED, job_state
from jobs.slurm import queue_states, sacct_states

RUNNING, PENDING = "running", "pending"
ACTIVE_SLURM = {"PENDING": PENDING, "CONFIGURING": PENDING, "REQUEUED": PENDING, "REQUEUE_HOLD": PENDING,
                "REQUEUE_FED": PENDING, "RESIZING": RUNNING, "RUNNING": RUNNING, "COMPLETING": RUNNING,
                "SUSPENDED": RUNNING, "STAGE_OUT": RUNNING, "SIGNALING": RUNNING}
# Slurm's final states -> the reason status prints when the result files say nothing better.
FINAL_SLURM_REASON = {"TIMEOUT": "timeout", "CANCELLED": "cancelled", "OUT_OF_MEMORY": "out_of_memory",
                      "NODE_FAIL": "node_fail", "PREEMPTED": "preempted", "BOOT_FAIL": "boot_fail",
                      "DEADLINE": "deadline", "FAILED": "exception", "COMPLETED": "no_result"}
ORDER = (DONE, RUNNING, PENDING, PREEMPTED, FAILED, CORRUPT, INCOMPLETE, MISSING)


@dataclass
class Row:
    """One manifest's line in the status table."""

    manifest_id: str
    phase: int | None
    label: str
    state: str
    reason: str = ""
    job: str = ""
    message: str = ""
    manifest: str = ""
    out_dir: str = ""


def label_of(manifest: dict[str, Any]) -> str:
    """A short human description: model, metric / perturbation, seed, shard."""
    parts = [str((manifest.get("model") or {}).get("id", "?")).split("/")[-1]]
    metric = (manifest.get("metric") or {}).get("name")
    if metric:
        parts.append(str(metric))
    pert = manifest.get("perturbation")
    if isinstance(pert, dict) and pert.get("name"):
        parts.append(str(pert["name"]))
        topk = (manifest.get("targets") or {}).get("topk")
        if topk:
            parts.append(f"k={topk}")
    if "seed" in manifest:
        parts.append(f"seed={manifest['seed']}")
    if manifest.get("shard") and manifest["shard"] != "0/1":
        parts.append(f"shard={manifest['shard']}")
    return " ".join(parts)


def submitted_jobs(layout: RunLayout) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(manifest id -> Slurm id of the newest Slurm submission that ran it,
    manifest id -> the newest local/debug outcome)."""
    slurm: dict[str, str] = {}
    local: dict[str, dict[str, Any]] = {}
    for _, record in layout.submission_records():  # oldest first: later records win
        if record.get("dry_run"):
            continue
        if record.get("executor") == "slurm":
            for array in record.get("arrays", []):
                for task in array.get("tasks", []):
                    slurm[task["manifest_id"]] = str(task.get("job") or f"{array['job_id']}_{task['index']}")
        for outcome in record.get(str(record.get("executor")), []) if record.get("executor") != "slurm" else []:
            local[outcome["manifest_id"]] = outcome
            slurm.pop(outcome["manifest_id"], None)
    return slurm, local


def slurm_view(job_ids: list[str], use_sacct: bool = True) -> dict[str, tuple[str, str, str]] | None:
    """{task id: (state, exit code, reason)}: sacct's answer, overridden by squeue for the tasks queued
    or running now (sacct lags behind a fresh submission and keeps stale pending reasons).
    None when Slurm is not asked or cannot answer."""
    if not use_sacct or not job_ids:
        return None
    states = sacct_states(job_ids)
    queue = queue_states(job_ids)
    if states is None and queue is None:
        return None
    merged = dict(states or {})
    for task, (state, reason) in (queue or {}).items():
        merged[task] = (state, (merged.get(task) or ("", "", ""))[1], reason)
    if queue is not None:
        # Not in the queue any more: an active state sacct still reports is stale.
        for task, (state, code, reason) in list(merged.items()):
            if task not in queue and state in ACTIVE_SLURM and not _queued_array(task, queue):
                merged[task] = ("UNKNOWN", code, "left the queue; sacct has not caught up")
    return merged


def _queued_array(task: str, queue: dict[str, Any]) -> bool:
    return "_" not in task and any(t.split("_")[0] == task for t in queue)


def _local_in_flight(local: dict[str, Any]) -> tuple[str, str, str] | None:
    """A local run recorded as in flight: running while its submitting process lives, else failed."""
    if local.get("state") != "running":
        return None
    pid, host = local.get("pid"), local.get("host")
    import socket

    if host == socket.gethostname() and isinstance(pid, int) and _alive(pid):
        return RUNNING, "", f"local run (pid {pid})"
    return FAILED, "killed", f"the submitting process (pid {pid} on {host}) ended before the job finished"


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def classify(out_dir: Path, slurm: tuple[str, str, str] | None, local: dict[str, Any] | None = None,
             deep: bool | None = None) -> tuple[str, str, str]:
    """(state, reason, message) of one manifest from its result folder and its scheduler's record
    (`deep`: hash every result file, see esa.results.checksums)."""
    files = job_state(out_dir, deep=deep)
    if files.done:
        return DONE, "", ""
    if slurm and slurm[0] in ACTIVE_SLURM:
        state = ACTIVE_SLURM[slurm[0]]
        reason = "requeued" if slurm[0].startswith("REQUEUE") else ""
        if state == PENDING and files.state == PREEMPTED:
            reason = "preempted, will resume"
        # Only a pending task has a reason to wait; a running one's reason column is stale.
        return state, reason, slurm[2] if state == PENDING and slurm[2] not in ("", "None") else ""
    in_flight = _local_in_flight(local or {})
    if in_flight is not None and (in_flight[0] == RUNNING or files.state in (MISSING, INCOMPLETE)):
        return in_flight
    killed = slurm[0] if slurm and slurm[0] in ("TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL") else None
    if files.state in (FAILED, PREEMPTED, CORRUPT):
        reason = files.reason
        if killed and reason != "out_of_memory" and files.state == FAILED:
            reason = FINAL_SLURM_REASON[killed]  # killed by Slurm while esa was reporting something else
        return files.state, reason, files.message
    if slurm and slurm[0] in FINAL_SLURM_REASON:
        reason = FINAL_SLURM_REASON[slurm[0]]
        return (PREEMPTED if reason == "preempted" else FAILED), reason, f"slurm {slurm[0]} exit {slurm[1]}"
    if local and not local.get("ok", True):
        return FAILED, str(local.get("reason") or local.get("state") or "failed"), str(local.get("message", ""))
    return files.state, files.reason if files.state != MISSING else "", files.message


def collect(run: RunLayout | str | Path, use_sacct: bool = True, deep: bool | None = None) -> list[Row]:
    """One Row per manifest of the run (`use_sacct`: ask Slurm; `deep`: hash every result file)."""
    layout = run if isinstance(run, RunLayout) else RunLayout(Path(run))
    slurm_ids, local = submitted_jobs(layout)
    states = slurm_view(list(slurm_ids.values()), use_sacct)
    rows = []
    for path in layout.manifest_files():
        try:
            manifest = read_json(path)
        except UserError:
            manifest = None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("outputs"), dict):
            rows.append(Row(path.stem, None, "?", CORRUPT, "invalid_manifest", manifest=str(path)))
            continue
        problem = manifest_file_problem(manifest, path)
        if problem:
            rows.append(Row(path.stem, manifest.get("phase"), label_of(manifest), CORRUPT, "invalid_manifest",
                            message=problem, manifest=str(path)))
            continue
        mid = str(manifest["id"])
        out = Path(manifest["outputs"]["dir"])
        job = slurm_ids.get(mid, "")
        slurm = (states or {}).get(job) if job else None
        state, reason, message = classify(out, slurm, local.get(mid), deep)
        rows.append(Row(mid, manifest.get("phase"), label_of(manifest), state, reason, job, message,
                        str(path), str(out)))
    return rows


def needs_resubmit(row: Row) -> bool:
    """Failed, pre-empted, corrupt, stopped half way, or never run: the rows `make resubmit` sends again."""
    return row.state in (FAILED, PREEMPTED, CORRUPT, INCOMPLETE, MISSING)


def format_table(rows: list[Row]) -> str:
    """The status table plus a one-line count per state."""
    header = ("id", "phase", "job", "state", "reason", "what", "message")
    lines = [header] + [(r.manifest_id, str(r.phase or ""), r.job, r.state, r.reason, r.label,
                         r.message[:80]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = ["  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    text.append("")
    text.append(f"{len(rows)} manifests: " + ", ".join(f"{counts[s]} {s}" for s in ORDER if s in counts))
    return "\n".join(line.rstrip() for line in text)


def rows_as_json(rows: list[Row]) -> list[dict[str, Any]]:
    """The rows as plain dicts (for `--json`)."""
    return [asdict(r) for r in rows]
