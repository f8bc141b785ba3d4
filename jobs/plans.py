"""A plan placed into its run folder: expansion (esa.spec.plan) bound to a RunLayout, and the files it writes.

Every manifest gets ``outputs.dir = RUN/results/<id>`` (absolute, resolved from the runs root at
expansion time, so `esa run` works from any directory) and is checked to stay inside RUN before
anything is written. Files (see esa.results.layout): ``RUN/manifests/<id>.json``, the index
``RUN/manifests/index-phase<N>.txt`` (array task i runs line i+1) and ``RUN/plan-phase<N>.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esa.core.io import atomic_write_text
from esa.results.layout import RunLayout
from esa.spec.manifest import Resources
from esa.spec.plan import Job, Plan, ReduceStep, expand, parse_plan, read_plan

__all__ = ["RunPlan", "load_plan", "plan_from_dict", "write_expanded"]


@dataclass
class RunPlan:
    """Jobs of one phase placed in one run folder: everything submission needs, nothing Slurm-specific.

    Built by expanding a plan (load_plan) or, for resubmission, from the manifests and records
    already in the run folder."""

    path: Path  # the plan file, or a description ("(in memory)", "(resubmit)")
    phase: int
    experiment: str
    layout: RunLayout
    resources: Resources
    jobs: list[Job]
    reduce: list[ReduceStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def manifest_path(self, job: Job) -> Path:
        """RUN/manifests/<id>.json of a job."""
        return self.layout.manifest_path(job.id)

    def resources_of(self, job: Job) -> Resources:
        """The job's own resources (per model, planned), else the phase's."""
        return job.manifest.resources or self.resources


def _bind(plan: Plan, runs: str | Path | None, model_map: Mapping[str, str] | None,
          phase2: Plan | None = None) -> RunPlan:
    layout = RunLayout.experiment(plan.name, runs, plan.experiment.runs)
    expansion = expand(plan, layout.results_dir, model_map, phase2)
    for job in expansion.jobs:
        layout.ensure_inside(job.out_dir)
    jobs = [_with_planned_resources(job) for job in expansion.jobs]
    by_id = {j.id: j for j in jobs}
    reduce = [dataclasses.replace(r, shards=tuple(by_id.get(s.id, s) for s in r.shards)) for r in expansion.reduce]
    return RunPlan(plan.path, plan.phase, plan.name, layout, plan.resources, jobs, reduce, expansion.notes)


def _with_planned_resources(job: Job) -> Job:
    """The job with its "auto" resources (and layout) filled by the planner (the id does not change:
    where and how a job runs is not part of it)."""
    from esa.planner.manifests import fill_auto_resources

    manifest, _ = fill_auto_resources(job.manifest)
    return job if manifest is job.manifest else dataclasses.replace(job, manifest=manifest)


def load_plan(path: str | Path, *, runs: str | Path | None = None,
              model_map: Mapping[str, str] | None = None) -> RunPlan:
    """Read, validate and expand a plan file into its run folder (nothing is written)."""
    return _bind(read_plan(Path(path).resolve()), runs, model_map)


def plan_from_dict(doc: dict[str, Any], *, path: str | Path = "(in memory)", runs: str | Path | None = None,
                   model_map: Mapping[str, str] | None = None, phase2: dict[str, Any] | None = None) -> RunPlan:
    """An in-memory plan (the TOML's dict form) expanded into its run folder; a phase-3 plan may
    bring its phase-2 plan along (`phase2`) instead of naming a file."""
    return _bind(parse_plan(doc, path), runs, model_map, None if phase2 is None else parse_plan(phase2, path))


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write, skipped when the file already holds exactly `text` (re-expansion touches nothing)."""
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)


def _json_text(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write_expanded(run: RunPlan) -> list[Path]:
    """Write RUN/manifests/<id>.json, the index file and RUN/plan-phase<N>.json; returns manifest paths.

    Idempotent: the same plan writes the same files with the same contents (unchanged files are
    not rewritten). Manifests of earlier, different expansions are left alone; the index lists
    exactly this expansion's manifests, in grid order."""
    layout = run.layout
    layout.manifests_dir.mkdir(parents=True, exist_ok=True)
    layout.ensure_inside(layout.manifests_dir)  # a manifests/ symlinked elsewhere is refused
    written = []
    for job in run.jobs:
        target = layout.ensure_inside(run.manifest_path(job))
        _write_if_changed(target, _json_text(job.manifest.to_dict()))
        written.append(target)
    index = layout.index_path(run.phase)
    _write_if_changed(index, "".join(f"{p}\n" for p in written))
    record = {"plan": str(run.path), "phase": run.phase, "experiment": run.experiment,
              "run_dir": str(layout.root), "resources": asdict(run.resources), "index": str(index),
              "notes": run.notes,
              "jobs": [{"id": j.id, "labels": j.labels, "needs": list(j.needs)} for j in run.jobs],
              "reduce": [{"id": r.id, "out_dir": str(r.out_dir), "shards": [s.id for s in r.shards],
                          "command": r.command()} for r in run.reduce]}
    _write_if_changed(layout.plan_record_path(run.phase), _json_text(record))
    return written
