"""`make submit PHASE=N`: expand a plan, validate it, and send the unfinished manifests out.

Executors:
  slurm  one submitit `map_array` per chunk of at most MaxArraySize tasks (every array starts
         at index 0, because the cluster's limit is on the index), throttled by the plan's
         array_parallelism; phase 3 can wait for phase 2 (afterok) and the aggregation
         (`python -m analysis RUN`) for phase 3 (afterany); sharded phase-2 plans get a
         reduce job per shard group (afterok).
  local  `python -m esa run` on this machine, one manifest after another.
  debug  submitit's in-process debug executor (pdb-friendly).
Every submission is recorded in RUN/submissions/<UTC time>-phase<N>.json: job ids, manifest
ids per array index, time, git commit, executor; `make status` reads these records.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esa.errors import UserError
from esa.io import atomic_write_json
from jobs.status import is_complete, read_json_file

EXECUTORS = ("slurm", "local", "debug")
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default when scontrol cannot be asked
DEFAULT_RESOURCES: dict[str, Any] = {"cpus": 1, "gpus": 0, "mem": None, "time": "01:00:00",
                                     "array_parallelism": 64}


@dataclass
class Task:
    """One expanded manifest: its id, file, output folder and the manifest itself."""

    manifest_id: str
    path: Path
    out_dir: Path
    manifest: dict[str, Any]

    @property
    def shard(self) -> str | None:
        """"i/n" for a phase-2 data shard, else None."""
        shard = self.manifest.get("shard")
        return str(shard) if shard and str(shard) not in ("0/1",) else None


@dataclass
class ReduceGroup:
    """Phase-2 shards of one job whose accumulators `esa reduce` sums into out_dir."""

    out_dir: Path
    shards: list[Task]


@dataclass
class Plan:
    """An expanded, validated plan: everything submit needs and nothing Slurm-specific."""

    path: Path
    phase: int
    experiment: str
    run_dir: Path
    tasks: list[Task]
    resources: dict[str, Any]
    reduce_groups: list[ReduceGroup] = field(default_factory=list)


@dataclass
class Options:
    """How to submit: executor, dry run, dependencies, the aggregation job."""

    executor: str = "slurm"
    dry_run: bool = False
    after: list[str] = field(default_factory=list)
    chain: bool = True  # phase 3 waits for phase-2 arrays of the same run that are still queued
    analyze: bool = True  # phase 3 is followed by `python -m analysis RUN` (afterany)
    max_array_size: int | None = None  # None: ask scontrol (ESA_MAX_ARRAY_SIZE overrides)
    image: str | None = None  # Apptainer image for the tasks (default: $ESA_IMAGE)
    echo: bool = True
    model_map: dict[str, str] = field(default_factory=dict)  # plan model id -> id/path used instead


# ---------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------
def load_plan(plan_path: str | Path, write: bool = True, model_map: dict[str, str] | None = None) -> Plan:
    """Expand and validate a plan (jobs.plans) and, unless `write` is False, write its manifests.

    Every manifest is validated before anything is written or submitted; any error raises
    one UserError that lists them.
    """
    from jobs import plans

    plan_path = Path(plan_path)
    if not plan_path.exists():
        raise UserError(f"plan '{plan_path}' does not exist (plans live in manifests/phaseN.toml "
                        "and manifests/tiny/phaseN.toml)")
    expanded = plans.expand_plan(plan_path, model_map=model_map or None)
    if write:
        plans.write_expanded(expanded)
    return _as_plan(plan_path, expanded)


def _as_plan(plan_path: Path, expanded: Any) -> Plan:
    """Adapt jobs.plans' expansion to the fields submit uses."""
    run_dir = Path(expanded.run_dir)
    tasks = []
    for m in expanded.manifests:
        mid = str(m["id"])
        tasks.append(Task(mid, run_dir / "manifests" / f"{mid}.json", Path(m["outputs"]["dir"]), m))
    groups = []
    for out_dir, shard_ids in (getattr(expanded, "reduce_groups", None) or {}).items():
        members = [t for t in tasks if t.manifest_id in set(shard_ids)]
        groups.append(ReduceGroup(Path(out_dir), members))
    resources = {**DEFAULT_RESOURCES, **(getattr(expanded, "resources", None) or {})}
    return Plan(plan_path, int(expanded.phase), str(expanded.experiment), run_dir, tasks, resources, groups)


# ---------------------------------------------------------------------------------------
# Slurm facts
# ---------------------------------------------------------------------------------------
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


def slurm_parameters(resources: dict[str, Any], name: str, dependency: str | None = None,
                     parallelism: int | None = None) -> dict[str, Any]:
    """submitit AutoExecutor parameters for the plan's resources."""
    params: dict[str, Any] = {"name": name, "timeout_min": parse_time_minutes(resources.get("time") or 60),
                              "cpus_per_task": int(resources.get("cpus") or 1), "nodes": 1,
                              "tasks_per_node": 1}
    if int(resources.get("gpus") or 0) > 0:
        params["gpus_per_node"] = int(resources["gpus"])
    mem = parse_mem_gb(resources.get("mem"))
    if mem is not None:
        params["mem_gb"] = mem
    for key in ("partition", "account", "qos"):
        if resources.get(key):
            params[f"slurm_{key}"] = str(resources[key])
    if resources.get("constraint"):
        params["slurm_constraint"] = str(resources["constraint"])
    if parallelism is not None:
        params["slurm_array_parallelism"] = int(parallelism)
    if resources.get("signal_delay_s"):
        params["slurm_signal_delay_s"] = int(resources["signal_delay_s"])
    # --requeue: sites may default JobRequeue=0, and the pre-emption path requeues the task.
    extra: dict[str, Any] = {"requeue": True}
    if dependency:
        extra["dependency"] = dependency
        extra["kill-on-invalid-dep"] = "yes"  # a failed upstream cancels instead of hanging forever
    params["slurm_additional_parameters"] = extra
    from jobs.task import REQUEUE_TEARDOWN

    params["slurm_teardown"] = list(REQUEUE_TEARDOWN)
    return params


def slurm_python(image: str | None) -> str | None:
    """The python the tasks run: the image's (apptainer exec --nv) or, if None, this one."""
    if not image:
        return None
    # No --cleanenv: submitit and esa need the SLURM_* / SUBMITIT_* variables inside.
    return f"apptainer exec --nv {shlex.quote(image)} python"


# ---------------------------------------------------------------------------------------
# selection and records
# ---------------------------------------------------------------------------------------
def pending_tasks(plan: Plan) -> tuple[list[Task], list[Task]]:
    """(to run, already complete). Shards whose reduced result is complete are complete too."""
    reduced_done = {t.manifest_id for g in plan.reduce_groups if is_complete(g.out_dir) for t in g.shards}
    todo, done = [], []
    for t in plan.tasks:
        (done if t.manifest_id in reduced_done or is_complete(t.out_dir) else todo).append(t)
    return todo, done


def timestamp() -> str:
    """UTC time for record names; sorts in time order."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def write_record(run_dir: Path, record: dict[str, Any]) -> Path:
    """RUN/submissions/<time>-phase<N>.json."""
    from esa.provenance import git_commit, now_iso

    record = {"time": now_iso(), "git": git_commit(), **record}
    path = run_dir / "submissions" / f"{timestamp()}-phase{record.get('phase', 'x')}.json"
    atomic_write_json(path, record)
    return path


def queued_phase2_arrays(run_dir: Path) -> list[str]:
    """Array ids of this run's phase-2 submissions that are still pending or running."""
    ids: list[str] = []
    folder = run_dir / "submissions"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        rec = read_json_file(path)
        if isinstance(rec, dict) and rec.get("phase") == 2 and rec.get("executor") == "slurm" \
                and not rec.get("dry_run"):
            ids += [str(a["job_id"]) for a in rec.get("arrays", [])]
            ids += [str(r["job_id"]) for r in rec.get("reduce", [])]
    return active_jobs(ids)


def analysis_available() -> bool:
    """Whether `python -m analysis` exists in this checkout (issue #6)."""
    try:
        return importlib.util.find_spec("analysis.__main__") is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------------------
# submission
# ---------------------------------------------------------------------------------------
def submit(plan_path: str | Path, options: Options | None = None) -> dict[str, Any]:
    """Expand, validate, skip complete ids and submit; returns the submission record."""
    options = options or Options()
    if options.executor not in EXECUTORS:
        raise UserError(f"EXECUTOR={options.executor!r} is not one of {', '.join(EXECUTORS)}")
    if options.executor == "slurm" and not options.dry_run and not have_slurm():
        raise UserError("EXECUTOR=slurm but sbatch is not on PATH: run on a Slurm login node, "
                        "start the test cluster (make slurm-up), or use EXECUTOR=local")
    plan = load_plan(plan_path, write=not options.dry_run, model_map=options.model_map)
    return submit_tasks(plan, pending_tasks(plan), options)


def submit_tasks(plan: Plan, selection: tuple[list[Task], list[Task]], options: Options) -> dict[str, Any]:
    """Send `selection[0]` (to run) with the plan's resources; `selection[1]` is reported as skipped."""
    todo, done = selection
    say = print if options.echo else (lambda *a, **k: None)
    say(f"plan {plan.path}: phase {plan.phase}, experiment '{plan.experiment}', {len(plan.tasks)} manifests "
        f"in {plan.run_dir}/manifests; {len(done)} already complete, {len(todo)} to run")
    record: dict[str, Any] = {"phase": plan.phase, "plan": str(plan.path), "experiment": plan.experiment,
                              "run_dir": str(plan.run_dir), "executor": options.executor,
                              "dry_run": options.dry_run, "resources": plan.resources,
                              "skipped_complete": [t.manifest_id for t in done], "arrays": [], "reduce": []}
    reduce_groups = [g for g in plan.reduce_groups if not is_complete(g.out_dir)]
    if not todo and not reduce_groups:
        say("nothing to submit: every manifest of this plan is complete")
        return record
    if options.executor == "local":
        return _run_local(plan, todo, reduce_groups, record, options, say)
    if options.executor == "debug":
        return _run_debug(plan, todo, reduce_groups, record, options, say)
    return _submit_slurm(plan, todo, reduce_groups, record, options, say)


def _dependency_for(plan: Plan, options: Options, say: Any) -> str | None:
    after = [a.strip() for a in options.after if a.strip()]
    if not after and plan.phase == 3 and options.chain and options.executor == "slurm":
        after = queued_phase2_arrays(plan.run_dir)
        if after:
            say(f"phase 3 waits for this run's queued phase-2 job(s) {', '.join(after)} (afterok)")
    bad = [a for a in after if not re.fullmatch(r"\d+(_\d+)?", a)]
    if bad:
        raise UserError(f"AFTER must be Slurm job ids (e.g. 1234 or 1234,1240), got {', '.join(bad)}")
    return "afterok:" + ":".join(after) if after else None


def _make_executor(folder: Path, cluster: str, image: str | None) -> Any:
    import submitit

    kwargs: dict[str, Any] = {}
    python = slurm_python(image)
    if cluster == "slurm" and python:
        kwargs["slurm_python"] = python
    return submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster, **kwargs)


def _submit_slurm(plan: Plan, todo: list[Task], groups: list[ReduceGroup], record: dict[str, Any],
                  options: Options, say: Any) -> dict[str, Any]:
    from jobs.task import EsaTask

    limit = max_array_size(options.max_array_size)
    dependency = _dependency_for(plan, options, say)
    image = options.image if options.image is not None else os.environ.get("ESA_IMAGE") or None
    chunks = split_arrays(todo, limit)
    parallelism = int(plan.resources.get("array_parallelism") or DEFAULT_RESOURCES["array_parallelism"])
    name = f"esa-p{plan.phase}-{plan.experiment}"[:64]
    params = slurm_parameters(plan.resources, name, dependency, parallelism)
    record.update(dependency=dependency, max_array_size=limit, image=image,
                  python=slurm_python(image) or sys.executable, slurm_parameters=params)
    if options.dry_run:
        say(f"DRY RUN: would submit {len(chunks)} array(s) (MaxArraySize {limit}) with {_describe(params)}"
            + (f" in {image}" if image else ""))
        for i, chunk in enumerate(chunks):
            say(f"  array {i}: --array=0-{len(chunk) - 1}%{min(parallelism, len(chunk))} "
                f"({len(chunk)} tasks)")
            for j, t in enumerate(chunk):
                say(f"    [{j}] {t.manifest_id} {t.path}")
        for g in groups:
            say(f"  reduce job (afterok on the shard arrays): esa reduce {len(g.shards)} shards --out-dir {g.out_dir}")
        if plan.phase == 3 and options.analyze:
            say(f"  aggregation job (afterany): python -m analysis {plan.run_dir}"
                + ("" if analysis_available() else " [skipped: analysis package not present]"))
        record["arrays"] = [{"job_id": None, "tasks": [{"index": j, "manifest_id": t.manifest_id}
                                                       for j, t in enumerate(c)]} for c in chunks]
        return record

    executor = _make_executor(plan.run_dir / "submitit", "slurm", image)
    executor.update_parameters(**params)
    array_ids: list[str] = []
    for chunk in chunks:
        jobs = executor.map_array(EsaTask(), [str(t.path.resolve()) for t in chunk])
        array_id = jobs[0].job_id.split("_")[0]
        array_ids.append(array_id)
        # submitit sends a one-item map as a plain job (id "123"), longer ones as an array ("123_4")
        record["arrays"].append({"job_id": array_id, "tasks": [
            {"index": j, "job": str(job.job_id), "manifest_id": t.manifest_id, "manifest": str(t.path)}
            for j, (t, job) in enumerate(zip(chunk, jobs))]})
        say(f"submitted array {array_id}: {len(chunk)} tasks (throttle {min(parallelism, len(chunk))})"
            + (f", {dependency}" if dependency else ""))
    _write_submitted_record(plan, record)  # ids are on disk before anything else can fail
    shard_arrays = array_ids
    for g in groups:
        job_id = _submit_command(plan, f"esa-reduce-{plan.experiment}", _reduce_command(g),
                                 "afterok:" + ":".join(shard_arrays) if shard_arrays else dependency, image)
        record["reduce"].append({"job_id": job_id, "out_dir": str(g.out_dir),
                                 "shards": [t.manifest_id for t in g.shards]})
        say(f"submitted reduce job {job_id} -> {g.out_dir}")
    if plan.phase == 3 and options.analyze and array_ids:
        if analysis_available():
            job_id = _submit_command(plan, f"esa-analyze-{plan.experiment}",
                                     [sys.executable, "-m", "analysis", str(plan.run_dir)],
                                     "afterany:" + ":".join(array_ids), image, use_image_python=False)
            record["analysis"] = {"job_id": job_id, "dependency": "afterany:" + ":".join(array_ids)}
            say(f"submitted aggregation job {job_id} (python -m analysis {plan.run_dir}, afterany)")
        else:
            say("no aggregation job: the analysis package (python -m analysis) is not in this checkout")
    path = _write_submitted_record(plan, record)
    say(f"recorded in {path}; follow with: make status RUN={plan.run_dir}")
    return record


def _write_submitted_record(plan: Plan, record: dict[str, Any]) -> Path:
    # One file per submission: the first write names it, later writes update the same file.
    if "_record_path" not in record:
        path = write_record(plan.run_dir, {k: v for k, v in record.items() if not k.startswith("_")})
        record["_record_path"] = str(path)
        return path
    path = Path(record["_record_path"])
    old = read_json_file(path) or {}
    atomic_write_json(path, {**old, **{k: v for k, v in record.items() if not k.startswith("_")}})
    return path


def _reduce_command(group: ReduceGroup) -> list[str]:
    return [sys.executable, "-m", "esa", "reduce", *[str(t.out_dir) for t in group.shards],
            "--out-dir", str(group.out_dir)]


def _submit_command(plan: Plan, name: str, command: list[str], dependency: str | None, image: str | None,
                    use_image_python: bool = True) -> str:
    """Submit one shell command as a single Slurm job through submitit's CommandFunction."""
    import submitit

    if image and use_image_python:
        command = ["apptainer", "exec", "--nv", image, "python", *command[1:]]
    executor = _make_executor(plan.run_dir / "submitit", "slurm", None)
    params = slurm_parameters({**plan.resources, "gpus": 0, "cpus": 1}, name, dependency)
    executor.update_parameters(**params)
    job = executor.submit(submitit.helpers.CommandFunction(command, verbose=True))
    return str(job.job_id)


def _describe(params: dict[str, Any]) -> str:
    keep = {k: v for k, v in params.items() if k not in ("name", "nodes", "tasks_per_node", "slurm_teardown")}
    return ", ".join(f"{k}={v}" for k, v in keep.items())


def _run_local(plan: Plan, todo: list[Task], groups: list[ReduceGroup], record: dict[str, Any],
               options: Options, say: Any) -> dict[str, Any]:
    from jobs.task import run_local

    if options.dry_run:
        say(f"DRY RUN: would run {len(todo)} manifest(s) here, one after another:")
        for t in todo:
            say(f"  python -m esa run {t.path}")
        for g in groups:
            say(f"  then: esa reduce {len(g.shards)} shards --out-dir {g.out_dir}")
        return record
    results = run_local([t.path for t in todo], plan.run_dir / "logs" / "local", echo=options.echo)
    record["local"] = [{"manifest_id": t.manifest_id, "returncode": r.returncode, "attempts": r.attempts,
                        "seconds": round(r.seconds, 2), "log": r.log} for t, r in zip(todo, results)]
    failed = [t for t, r in zip(todo, results) if r.returncode != 0]
    for g in groups:
        if any(t in failed for t in g.shards):
            say(f"reduce for {g.out_dir} skipped: a shard failed")
            continue
        rc = subprocess.run(_reduce_command(g)).returncode
        record["reduce"].append({"out_dir": str(g.out_dir), "returncode": rc,
                                 "shards": [t.manifest_id for t in g.shards]})
    path = write_record(plan.run_dir, record)
    say(f"{len(todo) - len(failed)} done, {len(failed)} failed; recorded in {path}")
    record["failed"] = [t.manifest_id for t in failed]
    return record


def _run_debug(plan: Plan, todo: list[Task], groups: list[ReduceGroup], record: dict[str, Any],
               options: Options, say: Any) -> dict[str, Any]:
    from jobs.task import EsaTask

    if options.dry_run:
        say(f"DRY RUN: would run {len(todo)} manifest(s) in this process (submitit debug executor)")
        return record
    executor = _make_executor(plan.run_dir / "submitit", "debug", None)
    jobs = executor.map_array(EsaTask(), [str(t.path) for t in todo])
    outcomes = []
    for t, job in zip(todo, jobs):
        try:
            job.result()  # the debug executor runs the task here, in this process
            outcomes.append({"manifest_id": t.manifest_id, "ok": True})
        except Exception as exc:  # one failed manifest must not hide the others' results
            outcomes.append({"manifest_id": t.manifest_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            say(f"{t.manifest_id}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    record["debug"] = outcomes
    for g in groups:
        rc = subprocess.run(_reduce_command(g)).returncode
        record["reduce"].append({"out_dir": str(g.out_dir), "returncode": rc,
                                 "shards": [t.manifest_id for t in g.shards]})
    path = write_record(plan.run_dir, record)
    record["failed"] = [o["manifest_id"] for o in outcomes if not o["ok"]]
    say(f"{len(todo) - len(record['failed'])} done, {len(record['failed'])} failed; recorded in {path}")
    return record


# ---------------------------------------------------------------------------------------
# resubmission
# ---------------------------------------------------------------------------------------
def _latest_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """phase -> the newest real (not dry-run) submission record of that phase."""
    latest: dict[int, dict[str, Any]] = {}
    folder = run_dir / "submissions"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        rec = read_json_file(path)
        if isinstance(rec, dict) and not rec.get("dry_run") and isinstance(rec.get("phase"), int):
            latest[rec["phase"]] = rec
    return latest


def resubmit(run_dir: str | Path, options: Options | None = None) -> list[dict[str, Any]]:
    """Send again only the failed, pre-empted or missing manifests of a run (per phase).

    Resources, plan name and experiment come from the phase's newest submission record; the
    manifests are the ones already in RUN/manifests (nothing is re-expanded). Reduce jobs of
    sharded phase-2 runs whose result is missing are submitted again too.
    """
    from jobs.status import collect, needs_resubmit

    options = options or Options()
    run_dir = Path(run_dir)
    rows = collect(run_dir, use_sacct=options.executor == "slurm")
    records = _latest_records(run_dir)
    by_phase: dict[int, list[Task]] = {}
    all_tasks: dict[str, Task] = {}
    for row in rows:
        manifest = read_json_file(Path(row.manifest))
        if not isinstance(manifest, dict) or row.phase is None:
            continue
        task = Task(row.manifest_id, Path(row.manifest), Path(row.out_dir), manifest)
        all_tasks[row.manifest_id] = task
        if needs_resubmit(row):
            by_phase.setdefault(int(row.phase), []).append(task)
    say = print if options.echo else (lambda *a, **k: None)
    out = []
    phases = sorted(set(by_phase) | {p for p, r in records.items() if _open_reduce_groups(r, all_tasks)})
    if not phases:
        say(f"nothing to resubmit in {run_dir}: no failed, pre-empted or missing manifest")
    for phase in phases:
        rec = records.get(phase, {})
        todo = by_phase.get(phase, [])
        groups = _open_reduce_groups(rec, all_tasks)
        plan = Plan(Path(rec.get("plan", "(resubmit)")), phase, str(rec.get("experiment") or run_dir.name), run_dir,
                    todo, {**DEFAULT_RESOURCES, **(rec.get("resources") or {})}, groups)
        say(f"resubmitting phase {phase}: {', '.join(t.manifest_id for t in todo) or 'no tasks'}"
            + (f" + {len(groups)} reduce job(s)" if groups else ""))
        phase_options = Options(**{**options.__dict__, "after": list(options.after)})
        out.append(submit_tasks(plan, (todo, []), phase_options))
    return out


def _open_reduce_groups(record: dict[str, Any], tasks: dict[str, Task]) -> list[ReduceGroup]:
    groups = []
    for red in record.get("reduce", []) or []:
        if red.get("out_dir") and not is_complete(red["out_dir"]):
            members = [tasks[s] for s in red.get("shards", []) if s in tasks]
            if members:
                groups.append(ReduceGroup(Path(red["out_dir"]), members))
    return groups
