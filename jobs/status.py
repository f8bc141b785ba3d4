"""`make status` / `make resubmit`: what each manifest of a run is doing, from files and sacct.

A manifest's state comes from, in this order of trust:
1. its result folder: experiment_manifest.json with status "complete" -> done;
2. the scheduler, for the newest job that ran it (RUN/submissions/*.json + `sacct`):
   PENDING / RUNNING / REQUEUED ... -> pending / running, whatever old files say;
3. its error.json (written by esa when a job fails) -> failed: exception, user_error, OOM...;
4. the scheduler's final state (TIMEOUT, CANCELLED, OUT_OF_MEMORY, NODE_FAIL ...) -> failed;
5. a checkpoint/ folder and nothing else -> preempted (resumes when it runs again);
6. nothing at all -> missing (never submitted, or its job vanished).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from esa.errors import UserError

DONE, RUNNING, PENDING, FAILED, PREEMPTED, MISSING = "done", "running", "pending", "failed", "preempted", "missing"
ACTIVE_SLURM = {"PENDING": PENDING, "CONFIGURING": PENDING, "REQUEUED": PENDING, "REQUEUE_HOLD": PENDING,
                "REQUEUE_FED": PENDING, "RESIZING": RUNNING, "RUNNING": RUNNING, "COMPLETING": RUNNING,
                "SUSPENDED": RUNNING, "STAGE_OUT": RUNNING, "SIGNALING": RUNNING}
# Slurm's final states -> the reason status prints when the result files say nothing better.
FINAL_SLURM_REASON = {"TIMEOUT": "timeout", "CANCELLED": "cancelled", "OUT_OF_MEMORY": "out_of_memory",
                      "NODE_FAIL": "node_fail", "PREEMPTED": "preempted", "BOOT_FAIL": "boot_fail",
                      "DEADLINE": "deadline", "FAILED": "exception", "COMPLETED": "no_result"}
ERROR_KIND_REASON = {"out_of_memory": "out_of_memory", "exception": "exception", "user_error": "user_error",
                     "interrupted": "interrupted", "preempted": "preempted"}


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


def read_json_file(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing or half-written."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(out_dir: str | Path) -> bool:
    """A job is complete when its folder holds experiment_manifest.json with status complete."""
    record = read_json_file(Path(out_dir) / "experiment_manifest.json")
    return isinstance(record, dict) and record.get("status") == "complete"


def manifest_files(run_dir: Path) -> list[Path]:
    """The expanded manifests of a run (RUN/manifests/<id>.json), sorted by name."""
    folder = run_dir / "manifests"
    if not folder.is_dir():
        raise UserError(f"{run_dir} has no manifests/ folder: is it a run folder? "
                        "(expected runs/<experiment>, as written by `make submit`)")
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith(("index", ".")))


def out_dir_of(manifest: dict[str, Any], run_dir: Path) -> Path:
    """Where a manifest writes: outputs.dir, relative paths taken from the run's parent."""
    out = Path(manifest["outputs"]["dir"])
    if out.is_absolute():
        return out
    # plans write paths relative to the directory `make submit` ran in; the run folder is
    # RUNS/<experiment>, so try the working directory first, then the runs root's parent
    for base in (Path.cwd(), run_dir.parent.parent):
        if (base / out).exists():
            return base / out
    return Path.cwd() / out


def label_of(manifest: dict[str, Any]) -> str:
    """A short human description: model, metric / perturbation, seed, shard."""
    parts = [str((manifest.get("model") or {}).get("id", "?")).split("/")[-1]]
    metric = (manifest.get("metric") or {}).get("name")
    if metric:
        parts.append(str(metric))
    pert = manifest.get("perturbation")
    if isinstance(pert, dict) and pert.get("kind", pert.get("name")):
        parts.append(str(pert.get("kind", pert.get("name"))))
        topk = (manifest.get("targets") or {}).get("topk")
        if topk:
            parts.append(f"k={topk}")
    if "seed" in manifest:
        parts.append(f"seed={manifest['seed']}")
    if manifest.get("shard") and manifest["shard"] != "0/1":
        parts.append(f"shard={manifest['shard']}")
    return " ".join(parts)


def submitted_jobs(run_dir: Path) -> dict[str, str]:
    """manifest id -> the Slurm id (ARRAY_TASK or JOB) of the newest submission that ran it."""
    latest: dict[str, str] = {}
    folder = run_dir / "submissions"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:  # names sort by time
        record = read_json_file(path)
        if not isinstance(record, dict) or record.get("executor") != "slurm" or record.get("dry_run"):
            continue
        for array in record.get("arrays", []):
            for task in array.get("tasks", []):
                latest[task["manifest_id"]] = str(task.get("job") or f"{array['job_id']}_{task['index']}")
    return latest


def sacct_states(job_ids: list[str], timeout: float = 60) -> dict[str, tuple[str, str, str]] | None:
    """{job id: (state, exit code, reason)} from sacct, or None when sacct is unavailable.

    Asks for the array ids (the part before "_"), so one call covers whole arrays.
    """
    if not job_ids or shutil.which("sacct") is None:
        return None
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        r = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(arrays),
                            "--format=JobID,State,ExitCode,Reason"],
                           capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return parse_sacct(r.stdout)


def parse_sacct(text: str) -> dict[str, tuple[str, str, str]]:
    """Parse `sacct -P --format=JobID,State,ExitCode,Reason` lines (the last line of an id wins).

    A pending array shows as one line "123_[0-5%2]"; it is expanded to its task ids.
    """
    out: dict[str, tuple[str, str, str]] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 4:
            continue
        jid, state, exit_code, reason = fields[:4]
        state = state.split()[0] if state else ""  # "CANCELLED by 0" -> CANCELLED
        for one in _expand_array_id(jid):
            out[one] = (state, exit_code, reason)
    return out


def _expand_array_id(jid: str) -> list[str]:
    if "_[" not in jid:
        return [jid]
    base, rest = jid.split("_[", 1)
    ids = []
    for part in rest.rstrip("]").split("%")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            ids += [f"{base}_{i}" for i in range(int(lo), int(hi) + 1)]
        elif part.isdigit():
            ids.append(f"{base}_{part}")
    return ids


def classify(out_dir: Path, slurm: tuple[str, str, str] | None) -> tuple[str, str, str]:
    """(state, reason, message) of one manifest from its result folder and its Slurm record."""
    if is_complete(out_dir):
        return DONE, "", ""
    if slurm and slurm[0] in ACTIVE_SLURM:
        state = ACTIVE_SLURM[slurm[0]]
        reason = "requeued" if slurm[0].startswith("REQUEUE") else ""
        if state == PENDING and (out_dir / "checkpoint").is_dir():
            reason = "preempted, will resume"
        return state, reason, slurm[2] if slurm[2] not in ("", "None") else ""
    error = read_json_file(out_dir / "error.json")
    if isinstance(error, dict):
        kind = str(error.get("kind", "exception"))
        reason = ERROR_KIND_REASON.get(kind, kind)
        if slurm and slurm[0] in ("TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL") and kind != "out_of_memory":
            reason = FINAL_SLURM_REASON[slurm[0]]  # killed by Slurm while esa was reporting something else
        message = f"{error.get('type', '')}: {error.get('message', '')}".strip(": ")
        if kind == "preempted" and (out_dir / "checkpoint").is_dir():
            return PREEMPTED, "preempted", "checkpoint kept; resubmit to resume"
        return FAILED, reason, message
    if slurm and slurm[0] in FINAL_SLURM_REASON:
        reason = FINAL_SLURM_REASON[slurm[0]]
        return (PREEMPTED if reason == "preempted" else FAILED), reason, f"slurm {slurm[0]} exit {slurm[1]}"
    if (out_dir / "checkpoint").is_dir():
        return PREEMPTED, "preempted", "checkpoint kept; resubmit to resume"
    return MISSING, "", ""


def collect(run_dir: str | Path, use_sacct: bool = True) -> list[Row]:
    """One Row per manifest of the run."""
    run_dir = Path(run_dir)
    jobs = submitted_jobs(run_dir)
    states = sacct_states(list(jobs.values())) if use_sacct else None
    rows = []
    for path in manifest_files(run_dir):
        manifest = read_json_file(path)
        if not isinstance(manifest, dict) or "outputs" not in manifest:
            rows.append(Row(path.stem, None, "?", FAILED, "invalid_manifest", manifest=str(path)))
            continue
        mid = str(manifest.get("id") or path.stem)
        out = out_dir_of(manifest, run_dir)
        job = jobs.get(mid, "")
        slurm = (states or {}).get(job) if job else None
        state, reason, message = classify(out, slurm)
        rows.append(Row(mid, manifest.get("phase"), label_of(manifest), state, reason, job, message,
                        str(path), str(out)))
    return rows


def needs_resubmit(row: Row) -> bool:
    """Failed, pre-empted and stopped, or never run: the rows `make resubmit` sends again."""
    return row.state in (FAILED, MISSING, PREEMPTED)


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
    order = (DONE, RUNNING, PENDING, PREEMPTED, FAILED, MISSING)
    text.append("")
    text.append(f"{len(rows)} manifests: " + ", ".join(f"{counts[s]} {s}" for s in order if s in counts))
    return "\n".join(line.rstrip() for line in text)


def rows_as_json(rows: list[Row]) -> list[dict[str, Any]]:
    """The rows as plain dicts (for `--json`)."""
    return [asdict(r) for r in rows]
