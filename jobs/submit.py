"""`make submit PHASE=N` / `make resubmit`: send a run's unfinished jobs to an executor, and record it.

Executors (jobs.executors): ``slurm`` — one submitit array per chunk of at most MaxArraySize tasks
(every array starts at index 0, because the cluster's limit is on the index), throttled by the
plan's array_parallelism; phase 3 can wait for phase 2 (afterok) and the aggregation
(`python -m analysis RUN`) for phase 3 (afterany); sharded phase-2 plans get a reduce job per shard
group (afterok). ``local`` — submitit's local executor, one job after another. ``debug`` — in this
process. Every submission is recorded in RUN/submissions/<UTC time>-phase<N>.json: job ids,
manifest ids per array index, outcomes of local runs, time, git commit, executor; `make status`
reads these records.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esa.core.errors import UserError
from esa.results.layout import RunLayout
from esa.results.state import job_state
from esa.spec.manifest import Manifest, Parallel, Resources
from esa.spec.plan import Job, ReduceStep
from jobs.plans import RunPlan, load_plan, write_expanded
from jobs.slurm import (active_jobs, have_slurm, max_array_size, slurm_parameters, slurm_python, split_arrays)

EXECUTORS = ("slurm", "local", "debug")


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
# selection and records
# ---------------------------------------------------------------------------------------
def pending_jobs(run: RunPlan) -> tuple[list[Job], list[Job]]:
    """(to run, already done). Shards whose reduced result is done are done too."""
    reduced = {s.id for r in run.reduce if job_state(r.out_dir).done for s in r.shards}
    todo, done = [], []
    for job in run.jobs:
        (done if job.id in reduced or job_state(job.out_dir).done else todo).append(job)
    return todo, done


def queued_phase2_arrays(layout: RunLayout) -> list[str]:
    """Array ids of this run's phase-2 submissions that are still pending or running."""
    ids: list[str] = []
    for _, rec in layout.submission_records():
        if rec.get("phase") == 2 and rec.get("executor") == "slurm" and not rec.get("dry_run"):
            ids += [str(a["job_id"]) for a in rec.get("arrays", [])]
            ids += [str(r["job_id"]) for r in rec.get("reduce", [])]
    return active_jobs(ids)


def analysis_available() -> bool:
    """Whether `python -m analysis` exists in this checkout."""
    try:
        return importlib.util.find_spec("analysis.__main__") is not None
    except (ImportError, ValueError):
        return False


class _Record:
    """One submission's record: written as soon as there is something to remember, then updated."""

    def __init__(self, run: RunPlan, options: Options) -> None:
        from esa.core.provenance import git_commit, now_iso

        self.layout = run.layout
        self.path: Path | None = None
        self.data: dict[str, Any] = {
            "time": now_iso(), "git": git_commit(), "phase": run.phase, "plan": str(run.path),
            "experiment": run.experiment, "run_dir": str(run.layout.root), "executor": options.executor,
            "dry_run": options.dry_run, "resources": dataclasses.asdict(run.resources), "skipped_complete": [],
            "arrays": [], "reduce": []}

    def save(self) -> Path:
        """Write (or rewrite) RUN/submissions/<time>-phase<N>.json."""
        self.path = self.layout.write_submission_record(self.data, self.path)
        return self.path


# ---------------------------------------------------------------------------------------
# submission
# ---------------------------------------------------------------------------------------
def submit(plan_path: str | Path, options: Options | None = None) -> dict[str, Any]:
    """Expand, validate, skip done ids and submit; returns the submission record."""
    options = options or Options()
    if options.executor not in EXECUTORS:
        raise UserError(f"EXECUTOR={options.executor!r} is not one of {', '.join(EXECUTORS)}")
    if options.executor == "slurm" and not options.dry_run and not have_slurm():
        raise UserError("EXECUTOR=slurm but sbatch is not on PATH: run on a Slurm login node, "
                        "start the test cluster (make slurm-up), or use EXECUTOR=local")
    if not Path(plan_path).exists():
        raise UserError(f"plan '{plan_path}' does not exist (plans live in manifests/phaseN.toml "
                        "and manifests/tiny/phaseN.toml)")
    run = load_plan(plan_path, model_map=options.model_map)
    if not options.dry_run:
        write_expanded(run)
    return submit_jobs(run, pending_jobs(run), options)


def submit_jobs(run: RunPlan, selection: tuple[list[Job], list[Job]], options: Options) -> dict[str, Any]:
    """Send `selection[0]` (to run) with the run's resources; `selection[1]` is reported as skipped."""
    todo, done = selection
    say = print if options.echo else (lambda *a, **k: None)
    say(f"plan {run.path}: phase {run.phase}, experiment '{run.experiment}', {len(run.jobs)} manifests "
        f"in {run.layout.manifests_dir}; {len(done)} already complete, {len(todo)} to run")
    record = _Record(run, options)
    record.data["skipped_complete"] = [j.id for j in done]
    reduce = [r for r in run.reduce if not job_state(r.out_dir).done]
    if not todo and not reduce:
        say("nothing to submit: every manifest of this plan is complete")
        return record.data
    if options.executor == "slurm":
        return _submit_slurm(run, todo, reduce, record, options, say)
    return _run_here(run, todo, reduce, record, options, say)


def _run_here(run: RunPlan, todo: list[Job], reduce: list[ReduceStep], record: _Record, options: Options,
              say: Any) -> dict[str, Any]:
    """EXECUTOR=local or debug: one job after another on this machine, then the reduce steps."""
    from jobs.executors import run_in_process, run_local
    from jobs.slurm import parse_time_minutes

    where = "in this process (submitit debug executor)" if options.executor == "debug" else \
        "here, one after another (submitit local executor)"
    if options.dry_run:
        say(f"DRY RUN: would run {len(todo)} manifest(s) {where}:")
        for job in todo:
            ranks = job.manifest.parallel.world_size
            launch = f"torchrun --nproc_per_node {ranks} -m esa run" if ranks > 1 else "python -m esa run"
            say(f"  {launch} {run.manifest_path(job)}  {estimate_line(job)}")
        for step in reduce:
            say(f"  then: esa reduce {len(step.shards)} shards --out-dir {step.out_dir}")
        return record.data
    folder = run.layout.logs_dir(options.executor)
    if options.executor == "debug":
        outcomes = run_in_process(todo, folder=folder, echo=options.echo)
    else:
        outcomes = run_local(todo, folder=folder, manifest_path=run.manifest_path,
                             timeout_min=parse_time_minutes(run.resources.time), echo=options.echo)
    record.data[options.executor] = [o.to_record() for o in outcomes]
    failed = {o.job.id for o in outcomes if not o.ok}
    for step in reduce:
        if failed & {s.id for s in step.shards}:
            say(f"reduce for {step.out_dir} skipped: a shard failed")
            continue
        rc = subprocess.run(_reduce_command(step)).returncode
        record.data["reduce"].append({"out_dir": str(step.out_dir), "returncode": rc,
                                      "shards": [s.id for s in step.shards]})
    path = record.save()
    say(f"{len(todo) - len(failed)} done, {len(failed)} failed; recorded in {path}")
    record.data["failed"] = sorted(failed)
    return record.data


def _dependency_for(run: RunPlan, options: Options, say: Any) -> str | None:
    after = [a.strip() for a in options.after if a.strip()]
    if not after and run.phase == 3 and options.chain:
        after = queued_phase2_arrays(run.layout)
        if after:
            say(f"phase 3 waits for this run's queued phase-2 job(s) {', '.join(after)} (afterok)")
    bad = [a for a in after if not re.fullmatch(r"\d+(_\d+)?", a)]
    if bad:
        raise UserError(f"AFTER must be Slurm job ids (e.g. 1234 or 1234,1240), got {', '.join(bad)}")
    return "afterok:" + ":".join(after) if after else None


def _slurm_executor(folder: Path, image: str | None) -> Any:
    import submitit

    kwargs: dict[str, Any] = {}
    python = slurm_python(image)
    if python:
        kwargs["slurm_python"] = python
    return submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm", **kwargs)


def _groups(run: RunPlan, jobs: list[Job]) -> list[tuple[Resources, Parallel, list[Job]]]:
    """Jobs that need the same resources and layout, in plan order: each group is one set of arrays."""
    groups: dict[tuple[Resources, Parallel], list[Job]] = {}
    for job in jobs:
        groups.setdefault((run.resources_of(job), job.manifest.parallel), []).append(job)
    return [(res, par, members) for (res, par), members in groups.items()]


def slurm_arrays(run: RunPlan, jobs: list[Job], limit: int, dependency: str | None = None
                 ) -> list[tuple[dict[str, Any], Parallel, list[Job]]]:
    """(submitit parameters, layout, jobs) of each array: one per chunk of at most `limit` jobs that
    need the same resources and layout."""
    name = f"esa-p{run.phase}-{run.experiment}"[:64]
    return [(slurm_parameters(res, name, dependency, res.array_parallelism, par), par, chunk)
            for res, par, members in _groups(run, jobs) for chunk in split_arrays(members, limit)]


def estimate_line(job: Job) -> str:
    """The planner's one-line estimate for a job ("planner: n/a (...)" when it cannot size it)."""
    from esa.planner.manifests import plan_manifest
    from esa.planner.render import duration, gib

    try:
        plan = plan_manifest(job.manifest)
    except UserError as exc:
        return f"planner: n/a ({str(exc).splitlines()[0][:80]})"
    fits = "" if plan.fits is None else (", fits" if plan.fits else ", DOES NOT FIT")
    memory = f" of {gib(plan.gpu_memory_bytes)} GiB" if plan.gpu_memory_bytes else ""
    time = f", ~{duration(plan.time.seconds)} at MFU {plan.time.mfu:g}" if plan.time else ""
    return f"planner: {gib(plan.total_bytes)} GiB per {'GPU' if plan.settings['device'] == 'cuda' else 'rank'}" \
           f"{memory}{fits}{time}"


def _layout_text(parallel: Parallel) -> str:
    return "1 rank" if parallel.world_size == 1 else \
        f"{parallel.world_size} ranks ({parallel.nodes} node(s) x {parallel.gpus_per_node})"


def _submit_slurm(run: RunPlan, todo: list[Job], reduce: list[ReduceStep], record: _Record, options: Options,
                  say: Any) -> dict[str, Any]:
    from jobs.task import EsaTask

    limit = max_array_size(options.max_array_size)
    dependency = _dependency_for(run, options, say)
    image = options.image if options.image is not None else os.environ.get("ESA_IMAGE") or None
    data = record.data
    data.update(dependency=dependency, max_array_size=limit, image=image,
                python=slurm_python(image) or sys.executable)
    arrays = slurm_arrays(run, todo, limit, dependency)
    if options.dry_run:
        say(f"DRY RUN: would submit {len(arrays)} array(s) (MaxArraySize {limit})" + (f" in {image}" if image else ""))
        for i, (params, parallel, chunk) in enumerate(arrays):
            throttle = min(params.get("slurm_array_parallelism", len(chunk)), len(chunk))
            say(f"  array {i}: --array=0-{len(chunk) - 1}%{throttle} ({len(chunk)} tasks, {_layout_text(parallel)}) "
                f"with {_describe(params)}")
            for j, job in enumerate(chunk):
                say(f"    [{j}] {job.id} {run.manifest_path(job)}  {estimate_line(job)}")
        for step in reduce:
            say(f"  reduce job (afterok on the shard arrays): esa reduce {len(step.shards)} shards "
                f"--out-dir {step.out_dir}")
        if run.phase == 3 and options.analyze:
            say(f"  aggregation job (afterany): python -m analysis {run.layout.root}"
                + ("" if analysis_available() else " [skipped: analysis package not present]"))
        data["arrays"] = [{"job_id": None, "slurm_parameters": params, "tasks": [
            {"index": j, "manifest_id": job.id} for j, job in enumerate(chunk)]} for params, _, chunk in arrays]
        return data

    array_ids: list[str] = []
    for params, parallel, chunk in arrays:
        executor = _slurm_executor(run.layout.submitit_dir, image)
        executor.update_parameters(**params)
        submitted = executor.map_array(EsaTask(), [str(run.manifest_path(job).resolve()) for job in chunk])
        array_id = submitted[0].job_id.split("_")[0]
        array_ids.append(array_id)
        # submitit sends a one-item map as a plain job (id "123"), longer ones as an array ("123_4")
        data["arrays"].append({"job_id": array_id, "slurm_parameters": params, "tasks": [
            {"index": j, "job": str(s.job_id), "manifest_id": job.id, "manifest": str(run.manifest_path(job))}
            for j, (job, s) in enumerate(zip(chunk, submitted))]})
        throttle = min(params.get("slurm_array_parallelism", len(chunk)), len(chunk))
        say(f"submitted array {array_id}: {len(chunk)} tasks of {_layout_text(parallel)} (throttle {throttle})"
            + (f", {dependency}" if dependency else ""))
        record.save()  # ids are on disk before anything else can fail
    for step in reduce:
        job_id = _submit_command(run, f"esa-reduce-{run.experiment}", _reduce_command(step),
                                 "afterok:" + ":".join(array_ids) if array_ids else dependency, image)
        data["reduce"].append({"job_id": job_id, "out_dir": str(step.out_dir), "shards": [s.id for s in step.shards]})
        say(f"submitted reduce job {job_id} -> {step.out_dir}")
    if run.phase == 3 and options.analyze and array_ids:
        if analysis_available():
            dep = "afterany:" + ":".join(array_ids)
            job_id = _submit_command(run, f"esa-analyze-{run.experiment}",
                                     [sys.executable, "-m", "analysis", str(run.layout.root)], dep, image,
                                     use_image_python=False)
            data["analysis"] = {"job_id": job_id, "dependency": dep}
            say(f"submitted aggregation job {job_id} (python -m analysis {run.layout.root}, afterany)")
        else:
            say("no aggregation job: the analysis package (python -m analysis) is not in this checkout")
    path = record.save()
    say(f"recorded in {path}; follow with: make status RUN={run.layout.root}")
    return data


def _reduce_command(step: ReduceStep) -> list[str]:
    return [sys.executable, "-m", "esa", *step.command()]


def _submit_command(run: RunPlan, name: str, command: list[str], dependency: str | None, image: str | None,
                    use_image_python: bool = True) -> str:
    """Submit one shell command as a single Slurm job through submitit's CommandFunction."""
    import submitit

    if image and use_image_python:
        command = ["apptainer", "exec", "--nv", image, "python", *command[1:]]
    executor = _slurm_executor(run.layout.submitit_dir, None)
    # A CPU job: no GPU, one CPU; what the plan leaves to the planner gets the cluster's default memory
    # and four hours.
    plain = dataclasses.replace(run.resources, gpus=0, cpus=1, mem=None if run.resources.mem == "auto" else
                                run.resources.mem, time="04:00:00" if run.resources.time == "auto" else
                                run.resources.time)
    params = slurm_parameters(plain, name, dependency)
    executor.update_parameters(**params)
    job = executor.submit(submitit.helpers.CommandFunction(command, verbose=True))
    return str(job.job_id)


def _describe(params: dict[str, Any]) -> str:
    keep = {k: v for k, v in params.items() if k not in ("name", "nodes", "tasks_per_node", "slurm_teardown",
                                                         "slurm_array_parallelism", "slurm_srun_args")}
    return ", ".join(f"{k}={v}" for k, v in keep.items())


# ---------------------------------------------------------------------------------------
# resubmission
# ---------------------------------------------------------------------------------------
def _latest_records(layout: RunLayout) -> dict[int, dict[str, Any]]:
    """phase -> the newest real (not dry-run) submission record of that phase."""
    latest: dict[int, dict[str, Any]] = {}
    for _, rec in layout.submission_records():
        if not rec.get("dry_run") and isinstance(rec.get("phase"), int):
            latest[rec["phase"]] = rec
    return latest


def resubmit(run_dir: str | Path, options: Options | None = None) -> list[dict[str, Any]]:
    """Send again only the failed, pre-empted, incomplete, corrupt or missing manifests of a run (per phase).

    Resources, plan name and experiment come from the phase's newest submission record; the
    manifests are the ones already in RUN/manifests (nothing is re-expanded). Reduce jobs of
    sharded phase-2 runs whose result is missing are submitted again too.
    """
    from jobs.status import collect, needs_resubmit

    options = options or Options()
    layout = RunLayout(Path(run_dir))
    rows = collect(layout, use_sacct=options.executor == "slurm")
    records = _latest_records(layout)
    by_phase: dict[int, list[Job]] = {}
    jobs: dict[str, Job] = {}
    for row in rows:
        if row.phase is None:
            continue
        try:
            manifest = Manifest.from_dict(_read(row.manifest), source=row.manifest)
        except UserError:
            continue
        job = Job(manifest, {})
        jobs[row.manifest_id] = job
        if needs_resubmit(row):
            by_phase.setdefault(int(row.phase), []).append(job)
    say = print if options.echo else (lambda *a, **k: None)
    out = []
    phases = sorted(set(by_phase) | {p for p, r in records.items() if _open_reduce(r, jobs)})
    if not phases:
        say(f"nothing to resubmit in {layout.root}: no failed, pre-empted or missing manifest")
    for phase in phases:
        rec = records.get(phase, {})
        todo = by_phase.get(phase, [])
        reduce = _open_reduce(rec, jobs)
        run = RunPlan(Path(rec.get("plan", "(resubmit)")), phase, str(rec.get("experiment") or layout.name), layout,
                      Resources(**(rec.get("resources") or {})), todo, reduce)
        say(f"resubmitting phase {phase}: {', '.join(j.id for j in todo) or 'no tasks'}"
            + (f" + {len(reduce)} reduce job(s)" if reduce else ""))
        out.append(submit_jobs(run, (todo, []), dataclasses.replace(options, after=list(options.after))))
    return out


def _read(path: str) -> Any:
    from esa.core.io import read_json

    try:
        return read_json(path)
    except UserError:
        return None


def _open_reduce(record: dict[str, Any], jobs: dict[str, Job]) -> list[ReduceStep]:
    steps = []
    for red in record.get("reduce", []) or []:
        if red.get("out_dir") and not job_state(red["out_dir"]).done:
            shards = tuple(jobs[s] for s in red.get("shards", []) if s in jobs)
            if shards:
                steps.append(ReduceStep(Path(red["out_dir"]).name, Path(red["out_dir"]), shards))
    return steps
