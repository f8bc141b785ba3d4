"""Slurm facts and submitit parameters: MaxArraySize, the queue, sacct states, resources -> sbatch.

Everything the job layer asks Slurm, in one place; each answer has a safe default when
Slurm is not there to ask (a login node without scontrol, a test machine).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from esa.core.errors import UserError
from esa.spec.manifest import Parallel, Resources

DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default when scontrol cannot be asked

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


def have_slurm() -> bool:
    """Whether sbatch is on PATH (not whether the cluster answers)."""
    return shutil.which("sbatch") is not None


def max_array_size(override: int | None = None) -> int:
    """The cluster's MaxArraySize (scontrol show config); ESA_MAX_ARRAY_SIZE overrides it."""
    if override:
        return int(override)
    if os.environ.get("ESA_MAX_ARRAY_SIZE"):
        return int(os.environ["ESA_MAX_ARRAY_SIZE"])
    if shutil.which("scontrol") is None:
        return DEFAULT_MAX_ARRAY_SIZE
    try:
        r = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", r.stdout, re.MULTILINE)
    return int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE


def split_arrays(items: Sequence[Any], limit: int) -> list[list[Any]]:
    """Chunks of at most `limit` items: task indices 0..limit-1 stay below MaxArraySize=limit."""
    if limit < 1:
        raise UserError(f"MaxArraySize must be at least 1 (got {limit})")
    return [list(items[i:i + limit]) for i in range(0, len(items), limit)]


def active_jobs(job_ids: Sequence[str]) -> list[str]:
    """Those of `job_ids` (array ids) that squeue still lists (pending or running)."""
    if not job_ids or shutil.which("squeue") is None:
        return []
    try:
        r = subprocess.run(["squeue", "-h", "-o", "%F", "-j", ",".join(job_ids)], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    listed = set(r.stdout.split())
    return [j for j in job_ids if j in listed]


def parse_time_minutes(value: Any) -> int:
    """A Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) or minutes -> whole minutes."""
    if isinstance(value, (int, float)):
        return max(1, int(value))
    text = str(value).strip()
    try:
        if "-" in text:
            days, rest = text.split("-", 1)
            parts = [int(p) for p in rest.split(":")] + [0, 0]
            h, m, sec = parts[0], parts[1], parts[2] if len(parts) > 4 else 0
            total_s = int(days) * 86400 + h * 3600 + m * 60 + sec
        else:
            parts = [int(p) for p in text.split(":")]
            if len(parts) == 1:
                total_s = parts[0] * 60
            elif len(parts) == 2:
                total_s = parts[0] * 60 + parts[1]
            elif len(parts) == 3:
                total_s = parts[0] * 3600 + parts[1] * 60 + parts[2]
            else:
                raise ValueError(text)
    except ValueError:
        raise UserError(f"resources.time: cannot read '{value}' (use e.g. 04:00:00, 90 or 1-12:00:00)") from None
    return max(1, -(-total_s // 60))  # round up: never ask for less than the plan says


def parse_mem_gb(value: Any) -> float | None:
    """"64G", "64GB", "500M", "1T" or a number of GB -> GB (None stays None)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)B?\s*", str(value).upper())
    if not m:
        raise UserError(f"resources.mem: cannot read '{value}' (use e.g. 64G or 500M)")
    scale = {"K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1.0, "T": 1024.0, "": 1 / 1024}[m.group(2)]
    return float(m.group(1)) * scale


def slurm_parameters(resources: Resources, name: str, dependency: str | None = None,
                     parallelism: int | None = None, parallel: Parallel | None = None) -> dict[str, Any]:
    """submitit AutoExecutor parameters for a job's resources and layout: `parallel.nodes` nodes of
    `parallel.gpus_per_node` tasks (ranks) each, every task with `resources.gpus` GPUs (srun starts
    the tasks; esa.parallel finds its rank from Slurm's variables)."""
    parallel = parallel or Parallel()
    if resources.auto:
        raise UserError(f"resources {', '.join(resources.auto)} = \"auto\" must be planned before submission")
    params: dict[str, Any] = {"name": name, "timeout_min": parse_time_minutes(resources.time),
                              "cpus_per_task": resources.cpus, "nodes": parallel.nodes,
                              "tasks_per_node": parallel.gpus_per_node}
    if int(resources.gpus) > 0:
        params["gpus_per_node"] = int(resources.gpus) * parallel.gpus_per_node
    mem = parse_mem_gb(resources.mem)
    if mem is not None:
        params["mem_gb"] = mem
    for key in ("partition", "account", "qos"):
        if getattr(resources, key):
            params[f"slurm_{key}"] = str(getattr(resources, key))
    if parallelism is not None:
        params["slurm_array_parallelism"] = int(parallelism)
    # --requeue: sites may default JobRequeue=0, and the pre-emption path requeues the task.
    extra: dict[str, Any] = {"requeue": True}
    if parallel.world_size > 1:
        # A rank that dies ends its peers at once, instead of leaving them in a collective until its timeout.
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    if dependency:
        extra["dependency"] = dependency
        extra["kill-on-invalid-dep"] = "yes"  # a failed upstream cancels instead of hanging forever
    params["slurm_additional_parameters"] = extra
    params["slurm_teardown"] = list(REQUEUE_TEARDOWN)
    return params


def slurm_python(image: str | None) -> str | None:
    """The python the tasks run: the image's (apptainer exec --nv) or, if None, this one."""
    if not image:
        return None
    # No --cleanenv: submitit and esa need the SLURM_* / SUBMITIT_* variables inside.
    return f"apptainer exec --nv {shlex.quote(image)} python"


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


