"""Phase plans (TOML) -> one validated manifest per job, written into the run folder.

A plan (manifests/phaseN.toml, schema manifests/schema/plan.schema.json) names the experiment,
the shared model/data/output settings, the Slurm resources and a grid. Expansion crosses the
grid, fills every default explicitly (so equal jobs get equal ids however the plan spells
them), canonicalises metric and perturbation aliases, and gives each manifest
``id = esa.manifest.manifest_id(manifest)`` and ``outputs.dir = RUN/results/<id>`` (absolute,
resolved from the runs root at expansion time, so `esa run` works from any directory).

Phase 3 reads phase-2 rankings of the same experiment: ``[from_phase2] plan = "phase2.toml"``
is expanded too (ids are content hashes, so they are known without running anything) and each
selected phase-2 job gives ``targets.from_scores = RUN/results/<phase-2 id>/scores.h5``.
A sharded phase-2 job (``grid.shards = N``) becomes N manifests with ``shard = "i/N"`` plus a
reduce step writing into RUN/results/<id of the unsharded manifest>, the folder phase 3 reads.
"""

from __future__ import annotations

import itertools
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esa.errors import UserError
from esa.io import atomic_write_text
from esa.schema import check_manifest, schema_errors
from jobs import paths

# Defaults written into every manifest (the CLI's defaults; phase 2 batches 1 window, as `esa profile`).
MODEL_DEFAULTS = {"revision": None, "dtype": "auto", "device": "auto", "attention": "auto",
                  "trust_remote_code": False}
DATA_DEFAULTS = {"dataset": "builtin", "config": None, "split": None, "text_field": "text",
                 "seq_len": None, "max_samples": None, "batch_size": 4}
METRIC_DEFAULTS = {"probes": 1, "include": [], "exclude": [], "candidates": [], "max_exact_coords": 4096}
OUTPUT_DEFAULTS = {2: {"save_scores": "full", "score_dtype": "float32", "compression": None,
                       "export_topk_csv": True, "export_stats": True, "save_plots": False},
                   3: {"save_plots": False}, 1: {}}
_DATA_KEYS = set(DATA_DEFAULTS) | {"pool_size"}


@dataclass(frozen=True)
class Job:
    """One expanded manifest, with the grid values that made it and the results it reads."""

    id: str
    manifest: dict[str, Any]
    labels: dict[str, Any]
    needs: tuple[str, ...] = ()  # ids whose RUN/results/<id>/ this job reads (phase 3: its ranking)


@dataclass(frozen=True)
class ReduceStep:
    """Phase-2 shards whose accumulators `esa reduce` sums into RUN/results/<id>."""

    id: str  # the id of the same job unsharded: its results folder is what phase 3 reads
    out_dir: Path
    shard_ids: tuple[str, ...]
    shard_dirs: tuple[Path, ...]

    def command(self) -> list[str]:
        """argv after `python -m esa`: reduce SHARD_DIR... --out-dir OUT."""
        return ["reduce", *map(str, self.shard_dirs), "--out-dir", str(self.out_dir)]


@dataclass
class ExpandedPlan:
    """A plan expanded into jobs (nothing written yet; see write_expanded)."""

    plan_path: Path
    phase: int
    experiment: str
    run_dir: Path
    resources: dict[str, Any]  # as the plan wrote them (gpus, cpus, mem, time, ..., array_parallelism)
    jobs: list[Job]
    reduce: list[ReduceStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def manifests(self) -> list[dict[str, Any]]:
        """The manifests, in index order."""
        return [j.manifest for j in self.jobs]

    @property
    def ids(self) -> list[str]:
        """The job ids, in index order."""
        return [j.id for j in self.jobs]

    @property
    def reduce_groups(self) -> dict[str, list[str]]:
        """out_dir -> shard ids of each reduce step (what jobs.submit reads)."""
        return {str(r.out_dir): list(r.shard_ids) for r in self.reduce}

    @property
    def index_path(self) -> Path:
        """RUN/manifests/index-phase<N>.txt."""
        return paths.index_path(self.run_dir, self.phase)

    def manifest_path(self, job_id: str) -> Path:
        """RUN/manifests/<id>.json."""
        return paths.manifest_path(self.run_dir, job_id)


def read_plan(path: str | Path) -> dict[str, Any]:
    """The plan's TOML, checked against plan.schema.json (UserError naming every bad key)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plan '{path}' does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"plan '{path}' is not valid TOML: {exc}") from None
    errors = schema_errors(doc, "plan")
    if errors:
        raise UserError(f"plan '{path}' is invalid: {'; '.join(errors)}")
    return doc


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _model_sections(plan: dict[str, Any], model_map: Mapping[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(name as written in the plan, full model section) per grid model."""
    shared = {**MODEL_DEFAULTS, **plan.get("model", {})}
    out = []
    for entry in plan["grid"]["models"]:
        entry = {"id": entry} if isinstance(entry, str) else dict(entry)
        name = entry["id"]
        section = {"id": model_map.get(name, name), **shared}
        section.update({k: v for k, v in entry.items() if k != "id"})
        out.append((name, section))
    return out


def _data(plan: dict[str, Any], phase: int, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    data = {**DATA_DEFAULTS, "batch_size": 1 if phase == 2 else 4}
    if phase == 2:
        data["pool_size"] = None
    data.update(plan.get("data", {}))
    data.update({k: v for k, v in (overrides or {}).items() if k in _DATA_KEYS})
    return data


def _base(plan: dict[str, Any], phase: int, model: dict[str, Any], data: dict[str, Any],
          seed: int) -> dict[str, Any]:
    from esa.manifest import SCHEMA_VERSION

    return {"schema_version": SCHEMA_VERSION, "phase": phase, "experiment": plan["experiment"]["name"],
            "model": dict(model), "data": data, "seed": int(seed)}


def _profile_entries(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """Phase 2: [[grid.profile]] blocks or metrics x modes x topk, each crossed into single entries."""
    if "profile" in grid and any(k in grid for k in ("metrics", "modes", "topk")):
        raise UserError("a phase-2 grid takes either metrics/modes/topk or [[grid.profile]] entries, not both")
    if "profile" in grid:
        blocks = grid["profile"]
    elif "metrics" in grid:
        blocks = [{"metric": grid["metrics"], "mode": grid.get("modes", ["per_layer"]),
                   "topk": grid.get("topk", [100])}]
    else:
        raise UserError("a phase-2 plan needs grid.metrics or [[grid.profile]] entries")
    entries = []
    for block in blocks:
        axes = [_as_list(block["metric"]), _as_list(block.get("mode", "per_layer")), _as_list(block.get("topk", 100))]
        rest = {k: v for k, v in block.items() if k not in ("metric", "mode", "topk")}
        entries += [{"metric": m, "mode": mode, "topk": k, **rest} for m, mode, k in itertools.product(*axes)]
    return entries


def _finish(manifest: dict[str, Any], run: Path, outputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Give the manifest its id and its results folder inside the run folder."""
    from esa.manifest import manifest_id

    job_id = manifest_id(manifest)
    out_dir = paths.results_dir(run, job_id)
    return job_id, {**manifest, "id": job_id, "outputs": {"dir": str(out_dir), **outputs}}


def _outputs(plan: dict[str, Any], phase: int) -> dict[str, Any]:
    return {**OUTPUT_DEFAULTS[phase], **plan.get("outputs", {})}


def _expand_phase1(plan: dict[str, Any], run: Path, model_map: Mapping[str, str]) -> list[Job]:
    jobs = []
    for name, model in _model_sections(plan, model_map):
        for seed in plan["grid"].get("seeds", [0]):
            job_id, m = _finish(_base(plan, 1, model, _data(plan, 1), seed), run, _outputs(plan, 1))
            jobs.append(Job(job_id, m, {"model": name, "seed": seed}))
    return jobs


def _expand_phase2(plan: dict[str, Any], run: Path, model_map: Mapping[str, str]
                   ) -> tuple[list[Job], list[ReduceStep], list[Job]]:
    """(shard jobs to run, reduce steps, one job per ranking = the unsharded manifests)."""
    from esa.metrics import canonical_name

    grid, jobs, reduce, rankings = plan["grid"], [], [], []
    n_shards = int(grid.get("shards", 1))
    for name, model in _model_sections(plan, model_map):
        for entry in _profile_entries(grid):
            for seed in grid.get("seeds", [0]):
                base = _base(plan, 2, model, _data(plan, 2, entry), seed)
                metric = {"name": canonical_name(entry["metric"]), **METRIC_DEFAULTS,
                          **{k: v for k, v in entry.items() if k in METRIC_DEFAULTS}}
                base.update(metric=metric, ranking={"mode": entry["mode"], "topk": entry["topk"]})
                labels = {"model": name, "metric": metric["name"], "mode": entry["mode"],
                          "topk": entry["topk"], "seed": seed}
                whole_id, whole = _finish({**base, "shard": "0/1"}, run, _outputs(plan, 2))
                rankings.append(Job(whole_id, whole, labels))
                if n_shards == 1:
                    jobs.append(rankings[-1])
                    continue
                shards = [_finish({**base, "shard": f"{i}/{n_shards}"}, run, _outputs(plan, 2))
                          for i in range(n_shards)]
                jobs += [Job(sid, m, {**labels, "shard": m["shard"]}) for sid, m in shards]
                reduce.append(ReduceStep(whole_id, paths.results_dir(run, whole_id), tuple(s for s, _ in shards),
                                         tuple(paths.results_dir(run, s) for s, _ in shards)))
    return jobs, reduce, rankings


def _select(rankings: Iterable[Job], wanted: dict[str, Any]) -> list[Job]:
    from esa.metrics import canonical_name

    filters = {"models": "model", "metrics": "metric", "modes": "mode", "topk": "topk", "seeds": "seed"}
    keep = []
    for job in rankings:
        ok = True
        for key, label in filters.items():
            if key in wanted:
                values = [canonical_name(v) for v in wanted[key]] if key == "metrics" else wanted[key]
                ok = ok and job.labels[label] in values
        if ok:
            keep.append(job)
    return keep


def _control_sets(grid: dict[str, Any]) -> list[list[str]]:
    controls = grid.get("controls", [])
    if controls and all(isinstance(c, list) for c in controls):
        return [list(c) for c in controls]
    return [list(controls)]


def _expand_phase3(plan: dict[str, Any], plan_path: Path, run: Path, model_map: Mapping[str, str]) -> list[Job]:
    from esa.perturbations import get_perturbation

    source = plan["from_phase2"]
    p2_path = (plan_path.parent / source["plan"]).resolve()
    p2 = read_plan(p2_path)
    if p2["experiment"]["phase"] != 2 or p2["experiment"]["name"] != plan["experiment"]["name"]:
        raise UserError(f"from_phase2.plan '{source['plan']}' must be a phase-2 plan of the same experiment "
                        f"'{plan['experiment']['name']}' (it is phase {p2['experiment']['phase']} of "
                        f"'{p2['experiment']['name']}')")
    _, _, rankings = _expand_phase2(p2, run, model_map)
    chosen = _select(rankings, source)
    if not chosen:
        raise UserError(f"from_phase2 selects none of the {len(rankings)} phase-2 rankings of '{source['plan']}'")
    grid = plan["grid"]
    perturbations = [get_perturbation(p["name"], **{k: v for k, v in p.items() if k != "name"}).describe()
                     for p in grid["perturbation"]]
    jobs = []
    for ranking in chosen:
        have = ranking.labels["topk"]
        for pert, k, names, repeats in itertools.product(perturbations, grid.get("k", [have]), _control_sets(grid),
                                                         _as_list(grid.get("repeats", 20))):
            if k > have:
                raise UserError(f"grid.k {k} exceeds the top {have} that phase-2 job {ranking.id} "
                                f"({ranking.labels['metric']}, {ranking.labels['mode']}) ranks; "
                                "narrow from_phase2.topk or lower k")
            base = _base(plan, 3, ranking.manifest["model"], _data(plan, 3), ranking.labels["seed"])
            scores = paths.results_dir(run, ranking.id) / "scores.h5"
            base.update(perturbation=pert,
                        targets={"weights": [], "list": None, "from_scores": str(scores), "topk": k,
                                 "mode": ranking.labels["mode"]},
                        controls={"names": names, "repeats": repeats}, baseline={"eval_json": None})
            job_id, m = _finish(base, run, _outputs(plan, 3))
            labels = {**ranking.labels, "ranking": ranking.id, "perturbation": pert["name"],
                      "params": pert["params"], "k": k, "controls": names, "repeats": repeats}
            jobs.append(Job(job_id, m, labels, needs=(ranking.id,)))
    return jobs


def expand_plan(path: str | Path, *, runs_root: str | Path | None = None,
                model_map: Mapping[str, str] | None = None) -> ExpandedPlan:
    """Expand and validate a plan; nothing is written. `model_map` replaces model ids (e.g. tests)."""
    path = Path(path).resolve()
    plan = read_plan(path)
    phase, name = plan["experiment"]["phase"], plan["experiment"]["name"]
    root = paths.runs_root(runs_root, plan["experiment"].get("runs"))
    run = paths.run_dir(name, root)
    model_map = dict(model_map or {})
    reduce: list[ReduceStep] = []
    if phase == 1:
        jobs = _expand_phase1(plan, run, model_map)
    elif phase == 2:
        jobs, reduce, _ = _expand_phase2(plan, run, model_map)
    else:
        jobs = _expand_phase3(plan, path, run, model_map)
    unique = list({j.id: j for j in reversed(jobs)}.values())[::-1]  # first occurrence wins, order kept
    notes = [f"{len(jobs) - len(unique)} duplicate grid entries give the same manifest; kept once"] \
        if len(unique) < len(jobs) else []
    notes += [f"reduce step: `esa {' '.join(r.command())}` after its {len(r.shard_ids)} shards" for r in reduce]
    for i, job in enumerate(unique):
        paths.ensure_inside(run, job.manifest["outputs"]["dir"])
        check_manifest(job.manifest, run_dir=run, source=f"plan '{path}': job {i} ({_describe(job.labels)})")
    return ExpandedPlan(path, phase, name, run, dict(plan.get("resources", {})), unique, reduce, notes)


def _describe(labels: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items() if k not in ("params", "ranking"))


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write, skipped when the file already holds exactly `text` (re-expansion touches nothing)."""
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)


def _json_text(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write_expanded(plan: ExpandedPlan) -> list[Path]:
    """Write RUN/manifests/<id>.json, the index file and RUN/plan-phase<N>.json; returns manifest paths.

    Idempotent: the same plan writes the same files with the same contents (unchanged files are
    not rewritten). Manifests of earlier, different expansions are left alone; the index lists
    exactly this expansion's manifests, in grid order."""
    run = plan.run_dir
    folder = paths.manifests_dir(run)
    paths.ensure_inside(run.parent, run)
    folder.mkdir(parents=True, exist_ok=True)
    paths.ensure_inside(run, folder)  # a manifests/ symlinked elsewhere is refused
    written = []
    for job in plan.jobs:
        target = paths.ensure_inside(run, plan.manifest_path(job.id))
        paths.ensure_inside(run, job.manifest["outputs"]["dir"])
        _write_if_changed(target, _json_text(job.manifest))
        written.append(target)
    index = plan.index_path
    _write_if_changed(index, "".join(f"{p}\n" for p in written))
    record = {"plan": str(plan.plan_path), "phase": plan.phase, "experiment": plan.experiment,
              "run_dir": str(run), "resources": plan.resources, "index": str(index), "notes": plan.notes,
              "jobs": [{"id": j.id, "labels": j.labels, "needs": list(j.needs)} for j in plan.jobs],
              "reduce": [{"id": r.id, "out_dir": str(r.out_dir), "shards": list(r.shard_ids),
                          "command": r.command()} for r in plan.reduce]}
    _write_if_changed(paths.plan_record_path(run, plan.phase), _json_text(record))
    return written
