"""`make submit PHASE=N` / `make resubmit`: send a run's unfinished jobs to an executor, and record it.

Executors (jobs.executors): ``slurm`` — one submitit array per chunk of at most MaxArraySize tasks
(every array starts at index 0, because the cluster's limit is on the index), throttled by the
plan's array_parallelism; each phase-3 task waits (afterok) only for the phase-2 job whose ranking
it reads, when that job is still queued, and the aggregation (`python -m analysis RUN`) for phase 3
(afterany); sharded phase-2 plans get a reduce job per shard group (afterok). ``local`` —
submitit's local executor, one job after another. ``debug`` — in this process. Every submission
is recorded in RUN/submissions/<UTC time>-phase<N>.json: job ids, manifest ids per array index,
outcomes of local runs (kept up to date while they run), time, git commit, executor; `make
status` reads these records.

Never twice: one submission at a time holds the run folder's lock (RUN/.submit.lock), and a
manifest that is done (verified), or queued or running (its newest Slurm task is in squeue), is
not submitted again. A phase-3 manifest whose phase-2 ranking is neither done nor queued is not
submitted (the command says which phase-2 jobs are missing). A manifest that lets the model's own
code run (model.trust_remote_code) needs --trust-remote-code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
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
from jobs.slurm import (controller_problem, have_slurm, max_array_size, queue_states, sbatch_error_line,
                        slurm_parameters, slurm_python, split_arrays)

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
    trust_remote_code: bool = False  # allow manifests with model.trust_remote_code (the model's own code runs)


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


def queued_tasks(layout: RunLayout) -> dict[str, str]:
    """{manifest id (or reduce-step id): Slurm task id} of this run's jobs that are queued or running
    now: the newest Slurm task of each (submission records) that squeue lists."""
    from jobs.status import submitted_jobs

    tasks, _ = submitted_jobs(layout)
    reduce: dict[str, str] = {}
    for _, rec in layout.submission_records():
        if rec.get("executor") == "slurm" and not rec.get("dry_run"):
            for red in rec.get("reduce", []) or []:
                if red.get("job_id") and red.get("out_dir"):
                    reduce[Path(red["out_dir"]).name] = str(red["job_id"])
    wanted = {**tasks, **reduce}
    queue = queue_states(list(wanted.values())) or {}
    return {mid: job for mid, job in wanted.items() if job in queue}


def drop_queued(todo: list[Job], queued: dict[str, str], say: Any) -> list[Job]:
    """`todo` without the jobs that are queued or running already (saying which)."""
    busy = [j for j in todo if j.id in queued]
    if busy:
        say(f"{len(busy)} manifest(s) already queued or running, not submitted again: "
            + ", ".join(f"{j.id} (job {queued[j.id]})" for j in busy))
    return [j for j in todo if j.id not in queued]


def check_trust_remote_code(todo: list[Job], options: Options) -> None:
    """Refuse manifests that would run the model repository's own code unless --trust-remote-code was given."""
    risky = [j.id for j in todo if j.manifest.model.trust_remote_code]
    if risky and not options.trust_remote_code:
        raise UserError(f"{len(risky)} manifest(s) set model.trust_remote_code ({', '.join(risky[:5])}"
                        f"{', ...' if len(risky) > 5 else ''}): the model repository's own Python code would run; "
                        "submit with --trust-remote-code (make submit TRUST_REMOTE_CODE=1) if you trust it")


def input_ids(job: Job) -> tuple[str, ...]:
    """Ids of the jobs whose results `job` reads: its `needs`, else (a manifest read back from a run
    folder) the folder of its phase-2 ranking, RUN/results/<id>/scores.h5."""
    if job.needs:
        return job.needs
    source = _ranking_file(job)
    return (source.parent.name,) if source else ()


def _ranking_file(job: Job) -> Path | None:
    source = getattr(getattr(job.manifest, "targets", None), "from_scores", None)
    return Path(source) if source else None


def _input_done(run: RunPlan, job: Job, mid: str) -> bool:
    """Whether input `mid` of `job` is done: its results folder in this run, or wherever the job's
    ranking file actually is (a manifest may name one outside the run)."""
    source = _ranking_file(job)
    folders = [run.layout.results_dir(mid)] + ([source.parent] if source and source.parent.name == mid else [])
    return any(job_state(folder).done for folder in folders)


@dataclass
class Inputs:
    """Phase-3 jobs sorted by the state of the phase-2 results they read."""

    ready: list[Job] = field(default_factory=list)  # inputs done
    waiting: dict[tuple[str, ...], list[Job]] = field(default_factory=dict)  # queued Slurm ids -> jobs
    missing: dict[str, list[Job]] = field(default_factory=dict)  # input id -> jobs that need it


def sort_by_inputs(run: RunPlan, todo: list[Job], queued: dict[str, str]) -> Inputs:
    """Which of `todo` can run now, which wait for queued inputs (and on which Slurm jobs), which cannot."""
    out = Inputs()
    for job in todo:
        wait: list[str] = []
        lacking = []
        for mid in input_ids(job):
            if _input_done(run, job, mid):
                continue
            if mid in queued:
                wait.append(queued[mid])
            else:
                lacking.append(mid)
        if lacking:
            for mid in lacking:
                out.missing.setdefault(mid, []).append(job)
        elif wait:
            out.waiting.setdefault(tuple(sorted(set(wait))), []).append(job)
        else:
            out.ready.append(job)
    return out


def _describe_missing(run: RunPlan, missing: dict[str, list[Job]], show: int = 5) -> str:
    """The missing inputs (the first `show`): id, what it is (the needing job's ranking labels) and its state."""
    parts = []
    for mid, jobs in list(missing.items())[:show]:
        state = job_state(run.layout.results_dir(mid))
        labels = jobs[0].labels
        what = " ".join(str(labels[k]) for k in ("model", "metric", "mode") if labels.get(k)) or "phase 2"
        if "seed" in labels:
            what += f" seed={labels['seed']}"
        why = state.state + (f": {state.reason}" if state.reason and state.reason != state.state else "")
        parts.append(f"{mid} ({what}; {why})")
    more = len(missing) - show
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


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
    if options.dry_run:
        return submit_jobs(run, pending_jobs(run), options)
    _check_controller(options)
    with run.layout.submission_lock():  # one submission at a time: the second sees what the first sent
        write_expanded(run)
        return submit_jobs(run, pending_jobs(run), options)


def _check_controller(options: Options) -> None:
    """EXECUTOR=slurm: one line, at once, when the Slurm controller does not answer."""
    if options.executor != "slurm" or options.dry_run:
        return
    problem = controller_problem()
    if problem:
        raise UserError(f"the Slurm controller does not answer ({problem}); nothing was submitted. "
                        "Is slurmctld running? (the test cluster: make slurm-up)")


def submit_jobs(run: RunPlan, selection: tuple[list[Job], list[Job]], options: Options) -> dict[str, Any]:
    """Send `selection[0]` (to run) with the run's resources; `selection[1]` is reported as skipped."""
    todo, done = selection
    say = print if options.echo else (lambda *a, **k: None)
    say(f"plan {run.path}: phase {run.phase}, experiment '{run.experiment}', {len(run.jobs)} manifests "
        f"in {run.layout.manifests_dir}; {len(done)} already complete, {len(todo)} to run")
    record = _Record(run, options)
    record.data["skipped_complete"] = [j.id for j in done]
    queued = queued_tasks(run.layout) if run.layout.submissions_dir.is_dir() else {}
    todo = drop_queued(todo, queued, say)
    record.data["skipped_queued"] = sorted(j.id for j in selection[0] if j.id in queued)
    reduce = [r for r in run.reduce if not job_state(r.out_dir).done and r.id not in queued]
    check_trust_remote_code(todo, options)
    groups = _chain_groups(run, todo, queued, options, record, say)
    if not any(jobs for _, jobs in groups) and not reduce:
        say("nothing to submit: every manifest of this plan is complete" if not record.data["skipped_queued"]
            else "nothing to submit: every other manifest is complete")
        return record.data
    if options.executor == "slurm":
        return _submit_slurm(run, groups, reduce, record, options, say)
    return _run_here(run, [j for _, jobs in groups for j in jobs], reduce, record, options, say)


def _chain_groups(run: RunPlan, todo: list[Job], queued: dict[str, str], options: Options, record: _Record,
                  say: Any) -> list[tuple[str | None, list[Job]]]:
    """(dependency, jobs) groups to submit: one group, or for phase 3 one per set of queued phase-2
    tasks the jobs wait for (so a failed phase-2 task holds back only its own dependants).
    Phase-3 jobs whose inputs are neither done nor queued are left out, saying which inputs."""
    after = [a.strip() for a in options.after if a.strip()]
    bad = [a for a in after if not re.fullmatch(r"\d+(_\d+)?", a)]
    if bad:
        raise UserError(f"AFTER must be Slurm job ids (e.g. 1234 or 1234,1240), got {', '.join(bad)}")
    if after or run.phase != 3:
        return [("afterok:" + ":".join(after) if after else None, todo)]
    inputs = sort_by_inputs(run, todo, queued if options.chain else {})
    if inputs.missing:
        lacking = sorted({j.id for jobs in inputs.missing.values() for j in jobs})
        record.data["skipped_missing_inputs"] = lacking
        text = (f"{len(lacking)} phase-3 manifest(s) need phase-2 results that are neither done nor queued: "
                + _describe_missing(run, inputs.missing))
        if not inputs.ready and not inputs.waiting:
            raise UserError(text + "; submit phase 2 first (make submit PHASE=2, or make resubmit)")
        say(f"not submitted: {text}")
    groups: list[tuple[str | None, list[Job]]] = [(None, inputs.ready)] if inputs.ready else []
    for wait, jobs in inputs.waiting.items():
        say(f"{len(jobs)} phase-3 manifest(s) wait for phase-2 job(s) {', '.join(wait)} (afterok)")
        groups.append(("afterok:" + ":".join(wait), jobs))
    return groups


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
    watch = _LocalWatch(record, options.executor)
    if options.executor == "debug":
        outcomes = run_in_process(todo, folder=folder, echo=options.echo, watch=watch)
    else:
        outcomes = run_local(todo, folder=folder, manifest_path=run.manifest_path,
                             timeout_min=parse_time_minutes(run.resources.time), echo=options.echo, watch=watch)
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


class _LocalWatch:
    """Keeps a local run's submission record current: a job in flight is recorded with this
    process's pid (status shows it running, or failed if the process dies), each outcome as it comes."""

    def __init__(self, record: _Record, executor: str) -> None:
        import socket

        self.record, self.executor, self.host = record, executor, socket.gethostname()
        self.entries: list[dict[str, Any]] = []

    def __call__(self, job: Job, outcome: Any) -> None:
        self.entries = [e for e in self.entries if e["manifest_id"] != job.id]
        if outcome is None:
            self.entries.append({"manifest_id": job.id, "state": "running", "ok": None, "pid": os.getpid(),
                                 "host": self.host})
        else:
            self.entries.append(outcome.to_record())
        self.record.data[self.executor] = list(self.entries)
        self.record.save()


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


def _submit_slurm(run: RunPlan, groups: list[tuple[str | None, list[Job]]], reduce: list[ReduceStep],
                  record: _Record, options: Options, say: Any) -> dict[str, Any]:
    from jobs.task import EsaTask

    limit = max_array_size(options.max_array_size)
    image = options.image if options.image is not None else os.environ.get("ESA_IMAGE") or None
    # One set of arrays per dependency group (phase 3: the phase-2 tasks its jobs wait for), split
    # by resources and layout (slurm_arrays) and at MaxArraySize.
    arrays = [(dep, params, parallel, chunk) for dep, jobs in groups
              for params, parallel, chunk in slurm_arrays(run, jobs, limit, dep)]
    # One dependency shared by every array (or none) is recorded once; otherwise each array records its own.
    shared = {dep for dep, *_ in arrays}
    dependency = shared.pop() if len(shared) == 1 else None
    data = record.data
    data.update(dependency=dependency, max_array_size=limit, image=image,
                python=slurm_python(image) or sys.executable)
    if options.dry_run:
        say(f"DRY RUN: would submit {len(arrays)} array(s) (MaxArraySize {limit})" + (f" in {image}" if image else ""))
        for i, (dep, params, parallel, chunk) in enumerate(arrays):
            throttle = min(params.get("slurm_array_parallelism", len(chunk)), len(chunk))
            say(f"  array {i}: --array=0-{len(chunk) - 1}%{throttle} ({len(chunk)} tasks, {_layout_text(parallel)}) "
                f"with {_describe(params)}" + (f", {dep}" if dep else ""))
            for j, job in enumerate(chunk):
                say(f"    [{j}] {job.id} {run.manifest_path(job)}  {estimate_line(job)}")
        for step in reduce:
            say(f"  reduce job (afterok on the shard arrays): esa reduce {len(step.shards)} shards "
                f"--out-dir {step.out_dir}")
        if run.phase == 3 and options.analyze:
            say(f"  aggregation job (afterany): python -m analysis {run.layout.root}"
                + ("" if analysis_available() else " [skipped: analysis package not present]"))
        data["arrays"] = [{"job_id": None, "dependency": dep, "slurm_parameters": params, "tasks": [
            {"index": j, "manifest_id": job.id} for j, job in enumerate(chunk)]} for dep, params, _, chunk in arrays]
        return data

    array_ids: list[str] = []
    try:
        for dep, params, parallel, chunk in arrays:
            executor = _slurm_executor(run.layout.submitit_dir, image)
            executor.update_parameters(**params)
            with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes a failed sbatch's stderr
                submitted = executor.map_array(EsaTask(), [str(run.manifest_path(job).resolve()) for job in chunk])
            array_id = submitted[0].job_id.split("_")[0]
            array_ids.append(array_id)
            # submitit sends a one-item map as a plain job (id "123"), longer ones as an array ("123_4")
            data["arrays"].append({"job_id": array_id, "dependency": dep, "slurm_parameters": params, "tasks": [
                {"index": j, "job": str(s.job_id), "manifest_id": job.id, "manifest": str(run.manifest_path(job))}
                for j, (job, s) in enumerate(zip(chunk, submitted))]})
            record.save()  # ids are on disk before anything else can fail
            throttle = min(params.get("slurm_array_parallelism", len(chunk)), len(chunk))
            say(f"submitted array {array_id}: {len(chunk)} tasks of {_layout_text(parallel)} (throttle {throttle})"
                + (f", {dep}" if dep else ""))
    except _submission_errors() as exc:
        if array_ids:
            record.save()
        raise UserError(f"sbatch refused the submission: {sbatch_error_line(str(exc))}"
                        + (f" (arrays {', '.join(array_ids)} were submitted and recorded)" if array_ids else
                           "; nothing was submitted")) from None
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


def _submission_errors() -> tuple[type[BaseException], ...]:
    """What submitit raises when sbatch refuses a submission (the controller is down, a bad option)."""
    from submitit.core.utils import FailedJobError

    return (FailedJobError, subprocess.CalledProcessError)


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
    options = options or Options()
    layout = RunLayout(Path(run_dir))
    if options.dry_run:
        return _resubmit(layout, options)
    _check_controller(options)
    with layout.submission_lock():
        return _resubmit(layout, options)


def _resubmit(layout: RunLayout, options: Options) -> list[dict[str, Any]]:
    from jobs.status import collect, needs_resubmit

    say = print if options.echo else (lambda *a, **k: None)
    # Slurm is asked whatever the executor: a task still queued there must not run twice.
    rows = collect(layout, use_sacct=True)
    records = _latest_records(layout)
    by_phase: dict[int, list[Job]] = {}
    jobs: dict[str, Job] = {}
    for row in rows:
        if row.reason == "invalid_manifest":
            say(f"not resubmitted: {row.manifest}: {row.message or 'not a valid manifest'}")
            continue
        if row.phase is None:
            continue
        try:
            manifest = Manifest.from_dict(_read(row.manifest), source=row.manifest)
        except UserError as exc:
            say(f"not resubmitted: {exc}")
            continue
        job = Job(manifest, {})
        jobs[row.manifest_id] = job
        if needs_resubmit(row):
            by_phase.setdefault(int(row.phase), []).append(job)
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
