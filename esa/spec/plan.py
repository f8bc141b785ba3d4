"""Phase plans: the TOML a person edits, typed, and its grid expanded into typed manifests.

A plan (manifests/phaseN.toml) names the experiment, the model/data/output settings every job
shares, the Slurm resources and a grid. Expansion crosses the grid and builds each job's
manifest through :meth:`Manifest.from_dict` — the same path as the CLI's flags — so every
default comes from esa.spec.manifest and equal jobs get equal ids however they were written.
Where a job writes is the caller's business (`results_dir(job_id)`, a run layout's method).

Phase 3 reads phase-2 rankings of the same experiment: ``[from_phase2] plan = "phase2.toml"``
is expanded too (ids are content hashes, known without running anything), and each selected
phase-2 job gives ``targets.from_scores = results_dir(<phase-2 id>)/scores.h5``. A phase-2 plan
may have ``[from_phase2]`` too (the ground truth: ablation of the weights other metrics rank):
each of its jobs then takes ``metric.candidates_from`` = the selected rankings of its model. A sharded
phase-2 job (``grid.shards = N``) becomes N manifests with ``shard = "i/N"`` plus a reduce step
writing into results_dir(<id of the unsharded manifest>), the folder phase 3 reads. Torch-free.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esa.core.errors import UserError
from esa.spec.fields import default_of, spec_field
from esa.spec.manifest import (ControlsSpec, DataSpec, Manifest, MetricSpec, ModelSpec, Outputs, Parallel,
                               RankingSpec, Resources)
from esa.spec.names import METRICS

__all__ = ["Plan", "Grid", "FromPhase2", "Job", "ReduceStep", "Expansion", "read_plan", "parse_plan", "expand",
           "plan_schema"]

ResultsDir = Callable[[str], Path]


# ----------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class ExperimentSpec:
    """The experiment: its name is the run folder RUNS/<name>."""

    name: str = spec_field(doc="Experiment name = run folder name (a plain name).")
    phase: int = spec_field(doc="Which phase this plan expands.", enum=[1, 2, 3])
    runs: str | None = spec_field(None, "Runs root when neither the caller nor $ESA_RUNS names one (relative: "
                                  "to the current directory); null: ./runs.", minLength=1)
    description: str = spec_field("", "Free text for people.")


@dataclass(frozen=True)
class Grid:
    """The jobs: every combination of the listed values (phase-dependent keys)."""

    models: tuple[Any, ...] = spec_field((), "Phases 1, 2: models (hub id, local folder, or a table with id and "
                                         "model settings).", phases=(1, 2))
    seeds: tuple[int, ...] = spec_field((default_of(Manifest, "seed"),), "Phases 1, 2: seeds.", phases=(1, 2))
    metrics: tuple[str, ...] = spec_field((), "Phase 2: metrics, crossed with modes and topk (for uneven grids use "
                                          "[[grid.profile]] instead).", phases=(2,))
    modes: tuple[str, ...] = spec_field((default_of(RankingSpec, "mode"),), "Phase 2: ranking modes crossed with "
                                        "metrics.", phases=(2,))
    topk: tuple[int, ...] = spec_field((default_of(RankingSpec, "topk"),), "Phase 2: k values crossed with metrics.",
                                       phases=(2,))
    profile: tuple[dict[str, Any], ...] = spec_field(
        (), "Phase 2: an uneven grid as a list of entries (each crossed with models and seeds; list values inside "
        "an entry are crossed too). Replaces metrics x modes x topk.", phases=(2,))
    shards: int = spec_field(1, "Phase 2: split each job's calibration windows over N array tasks (shard 'i/N'), "
                             "summed by one reduce step per job.", phases=(2,), minimum=1)
    perturbation: tuple[dict[str, Any], ...] = spec_field(
        (), "Phase 3: perturbations, each a table: name plus its parameters (scale, sigma, mode, bits, bit_index, "
        "prob).", phases=(3,))
    k: tuple[Any, ...] = spec_field((), "Phase 3: how many top-ranked weights to perturb, one job per entry; an "
                                    "entry that is a list of k is one dose-response job over those k (e.g. "
                                    "[[1, 10, 100]]); default: each ranking's own topk.", phases=(3,))
    controls: tuple[Any, ...] = spec_field(default_of(ControlsSpec, "names"), "Phase 3: one control set (list of "
                                           "names) or several (list of lists, crossed).", phases=(3,))
    repeats: tuple[int, ...] = spec_field((default_of(ControlsSpec, "repeats"),), "Phase 3: draws of each random "
                                          "control (a list is crossed).", phases=(3,))


@dataclass(frozen=True)
class FromPhase2:
    """Phase 3: the phase-2 plan of the same experiment whose rankings are the targets; phase 2 (a ground-truth
    plan): the plan whose rankings give each model's candidates (metric.candidates_from). Which of its jobs to
    use (every filter is optional)."""

    plan: str = spec_field(doc="The phase-2 plan file (relative: to this plan's folder).", minLength=1)
    models: tuple[str, ...] = spec_field((), "Use only these models (ids as written in the phase-2 plan).")
    metrics: tuple[str, ...] = spec_field((), "Use only these metrics.")
    modes: tuple[str, ...] = spec_field((), "Use only these ranking modes.")
    topk: tuple[int, ...] = spec_field((), "Use only rankings of these k.")
    seeds: tuple[int, ...] = spec_field((), "Use only these seeds.")


@dataclass(frozen=True)
class Plan:
    """A plan as written (model/data/outputs are partial manifest sections: plan > defaults)."""

    path: Path
    experiment: ExperimentSpec
    grid: Grid
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    parallel: dict[str, Any] = field(default_factory=dict)
    from_phase2: FromPhase2 | None = None

    @property
    def phase(self) -> int:
        """The phase this plan expands."""
        return self.experiment.phase

    @property
    def name(self) -> str:
        """The experiment's name."""
        return self.experiment.name


@dataclass(frozen=True)
class Job:
    """One expanded manifest, with the grid values that made it and the results it reads."""

    manifest: Manifest
    labels: dict[str, Any]
    needs: tuple[str, ...] = ()  # ids whose results this job reads (phase 3: its ranking)

    @property
    def id(self) -> str:
        """The manifest's id."""
        assert self.manifest.id is not None
        return self.manifest.id

    @property
    def out_dir(self) -> Path:
        """Where the job writes (the manifest's outputs.dir)."""
        return Path(self.manifest.outputs.dir)


@dataclass(frozen=True)
class ReduceStep:
    """Phase-2 shards whose accumulators `esa reduce` sums into out_dir."""

    id: str  # the id of the same job unsharded: its results folder is what phase 3 reads
    out_dir: Path
    shards: tuple[Job, ...]

    def command(self) -> list[str]:
        """argv after `python -m esa`: reduce SHARD_DIR... --out-dir OUT."""
        return ["reduce", *(str(s.out_dir) for s in self.shards), "--out-dir", str(self.out_dir)]


@dataclass
class Expansion:
    """A plan expanded into jobs (nothing written)."""

    plan: Plan
    jobs: list[Job]
    reduce: list[ReduceStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------------- reading
def read_plan(path: str | Path) -> Plan:
    """The plan in a TOML file, checked against the plan schema (UserError naming every bad key)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plan '{path}' does not exist (plans live in manifests/phaseN.toml and "
                        "manifests/tiny/phaseN.toml)")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"plan '{path}' is not valid TOML: {exc}") from None
    return parse_plan(doc, path)


def parse_plan(doc: dict[str, Any], path: str | Path = "(in memory)") -> Plan:
    """A typed plan from its TOML/dict form (an in-memory plan too), checked against the schema."""
    from esa.spec.schema import schema_errors

    errors = schema_errors(doc, "plan")
    if errors:
        raise UserError(f"plan '{path}' is invalid: {'; '.join(errors)}")
    grid = {k: tuple(v) if isinstance(v, list) else v for k, v in doc["grid"].items()}
    if "repeats" in grid and not isinstance(grid["repeats"], tuple):
        grid["repeats"] = (grid["repeats"],)
    source = doc.get("from_phase2")
    return Plan(path=Path(path), experiment=ExperimentSpec(**doc["experiment"]), grid=Grid(**grid),
                model=dict(doc.get("model", {})), data=dict(doc.get("data", {})),
                outputs=dict(doc.get("outputs", {})), resources=Resources(**doc.get("resources", {})),
                parallel=dict(doc.get("parallel", {})),
                from_phase2=None if source is None else FromPhase2(
                    **{k: tuple(v) if isinstance(v, list) else v for k, v in source.items()}))


# ------------------------------------------------------------------------------ expansion
def _model_sections(plan: Plan, model_map: Mapping[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(name as written in the plan, the sections of its jobs: model (plan settings overridden by the
    entry's), resources and parallel (the plan's, overridden by the entry's own tables)).

    `model_map` replaces model ids (a test runs a plan on a small local model)."""
    out = []
    for entry in plan.grid.models:
        entry = {"id": entry} if isinstance(entry, str) else dict(entry)
        name = entry["id"]
        resources = dataclasses.replace(plan.resources, **entry.pop("resources", {}))
        parallel = {**plan.parallel, **entry.pop("parallel", {})}
        out.append((name, {"model": {**plan.model, **entry, "id": model_map.get(name, name)},
                           "resources": dataclasses.asdict(resources), "parallel": parallel}))
    return out


def _manifest(plan: Plan, phase: int, sections: dict[str, Any], results_dir: ResultsDir,
              where: str) -> Manifest:
    """A typed manifest with its id and its results folder (defaults filled by the spec)."""
    doc = {"phase": phase, "experiment": plan.name, "outputs": {**plan.outputs, "dir": "."}, **sections}
    manifest = Manifest.from_dict(doc, source=f"plan '{plan.path}': {where}", partial=True).with_id()
    return manifest.with_outputs(dir=str(results_dir(manifest.job_id())))


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _profile_entries(grid: Grid) -> list[dict[str, Any]]:
    """Phase 2: [[grid.profile]] blocks or metrics x modes x topk, each crossed into single entries."""
    if grid.profile and grid.metrics:
        raise UserError("a phase-2 grid takes either metrics/modes/topk or [[grid.profile]] entries, not both")
    if grid.profile:
        blocks: Iterable[dict[str, Any]] = grid.profile
    elif grid.metrics:
        blocks = [{"metric": list(grid.metrics), "mode": list(grid.modes), "topk": list(grid.topk)}]
    else:
        raise UserError("a phase-2 plan needs grid.metrics or [[grid.profile]] entries")
    entries = []
    for block in blocks:
        axes = [_as_list(block["metric"]), _as_list(block.get("mode", default_of(RankingSpec, "mode"))),
                _as_list(block.get("topk", default_of(RankingSpec, "topk")))]
        rest = {k: v for k, v in block.items() if k not in ("metric", "mode", "topk")}
        entries += [{"metric": m, "mode": mode, "topk": k, **rest} for m, mode, k in itertools.product(*axes)]
    return entries


_METRIC_KEYS = {f.name for f in dataclasses.fields(MetricSpec)} - {"name"}
_DATA_KEYS = {f.name for f in dataclasses.fields(DataSpec)}


def _expand_phase1(plan: Plan, results_dir: ResultsDir, model_map: Mapping[str, str]) -> list[Job]:
    jobs = []
    for name, where in _model_sections(plan, model_map):
        for seed in plan.grid.seeds:
            labels = {"model": name, "seed": seed}
            m = _manifest(plan, 1, {**where, "data": plan.data, "seed": seed}, results_dir, _describe(labels))
            jobs.append(Job(m, labels))
    return jobs


def _source_rankings(plan: Plan, results_dir: ResultsDir, model_map: Mapping[str, str],
                     p2: Plan | None) -> list[Job]:
    """The phase-2 rankings a plan's [from_phase2] selects (p2: that plan, when the caller has it)."""
    assert plan.from_phase2 is not None
    source = plan.from_phase2
    if p2 is None:
        p2 = read_plan((plan.path.parent / source.plan).resolve())
    if p2.phase != 2 or p2.name != plan.name:
        raise UserError(f"from_phase2.plan '{source.plan}' must be a phase-2 plan of the same experiment "
                        f"'{plan.name}' (it is phase {p2.phase} of '{p2.name}')")
    if plan.phase == 2 and p2.from_phase2 is not None:
        raise UserError(f"from_phase2.plan '{source.plan}' takes its own candidates from another plan; point "
                        "from_phase2 at the plan that ranks the weights")
    _, _, rankings = _expand_phase2(p2, results_dir, model_map)
    chosen = _select(rankings, source)
    if not chosen:
        raise UserError(f"from_phase2 selects none of the {len(rankings)} phase-2 rankings of '{source.plan}'")
    return chosen


def _expand_phase2(plan: Plan, results_dir: ResultsDir, model_map: Mapping[str, str], p2: Plan | None = None
                   ) -> tuple[list[Job], list[ReduceStep], list[Job]]:
    """(shard jobs to run, reduce steps, one job per ranking = the unsharded manifests).

    With [from_phase2] (a ground-truth plan: ablation, or obd / hessian_diag on candidates) every job
    takes its candidates from the selected rankings of the same model (metric.candidates_from) and
    needs them."""
    jobs: list[Job] = []
    reduce: list[ReduceStep] = []
    rankings: list[Job] = []
    n_shards = plan.grid.shards
    sources = _source_rankings(plan, results_dir, model_map, p2) if plan.from_phase2 is not None else None
    models = _model_sections(plan, model_map)
    for entry in _profile_entries(plan.grid):
        unknown = sorted(set(entry.get("models") or ()) - {name for name, _ in models})
        if unknown:
            raise UserError(f"grid.profile entry for {entry['metric']} names models not in grid.models: "
                            f"{', '.join(unknown)}")
    for name, where in models:
        needs: tuple[str, ...] = ()
        candidates: dict[str, Any] = {}
        if sources is not None:
            own = [r for r in sources if r.labels["model"] == name]
            if not own:
                raise UserError(f"from_phase2 selects no ranking of model '{name}' (the source plan's models: "
                                f"{', '.join(sorted({str(r.labels['model']) for r in sources}))})")
            needs = tuple(r.id for r in own)
            candidates = {"candidates_from": [str(r.out_dir / "scores.h5") for r in own]}
        for entry in _profile_entries(plan.grid):
            if entry.get("models") and name not in entry["models"]:
                continue
            for seed in plan.grid.seeds:
                sections = {**where, "seed": seed,
                            "data": {**plan.data, **{k: v for k, v in entry.items() if k in _DATA_KEYS}},
                            "metric": {"name": entry["metric"], **candidates,
                                       **{k: v for k, v in entry.items() if k in _METRIC_KEYS}},
                            "ranking": {"mode": entry["mode"], "topk": entry["topk"]}}
                labels = {"model": name, "metric": METRICS.canonical(entry["metric"]), "mode": entry["mode"],
                          "topk": entry["topk"], "seed": seed}
                whole = Job(_manifest(plan, 2, {**sections, "shard": "0/1"}, results_dir, _describe(labels)), labels,
                            needs)
                rankings.append(whole)
                if n_shards == 1:
                    jobs.append(whole)
                    continue
                shards = tuple(Job(_manifest(plan, 2, {**sections, "shard": f"{i}/{n_shards}"}, results_dir,
                                             _describe(labels)), {**labels, "shard": f"{i}/{n_shards}"}, needs)
                               for i in range(n_shards))
                jobs += shards
                reduce.append(ReduceStep(whole.id, whole.out_dir, shards))
    return jobs, reduce, rankings


def _select(rankings: Iterable[Job], wanted: FromPhase2) -> list[Job]:
    filters = {"models": "model", "metrics": "metric", "modes": "mode", "topk": "topk", "seeds": "seed"}
    keep = []
    for job in rankings:
        ok = True
        for key, label in filters.items():
            values = list(getattr(wanted, key))
            if key == "metrics":
                values = [METRICS.canonical(v) for v in values]
            if values and job.labels[label] not in values:
                ok = False
        if ok:
            keep.append(job)
    return keep


def _control_sets(grid: Grid) -> list[list[str]]:
    if grid.controls and all(isinstance(c, (list, tuple)) for c in grid.controls):
        return [list(c) for c in grid.controls]
    return [list(grid.controls)]


def _expand_phase3(plan: Plan, results_dir: ResultsDir, model_map: Mapping[str, str], p2: Plan | None) -> list[Job]:
    assert plan.from_phase2 is not None  # the schema requires it for phase 3
    chosen = _source_rankings(plan, results_dir, model_map, p2)
    jobs = []
    for ranking in chosen:
        have = ranking.labels["topk"]
        for pert, k, names, repeats in itertools.product(plan.grid.perturbation, plan.grid.k or [have],
                                                         _control_sets(plan.grid), plan.grid.repeats):
            # An entry of grid.k that is itself a list is one dose-response job over those k.
            k = sorted(set(k)) if isinstance(k, (list, tuple)) else k
            if max(_as_list(k)) > have:
                raise UserError(f"grid.k {k} exceeds the top {have} that phase-2 job {ranking.id} "
                                f"({ranking.labels['metric']}, {ranking.labels['mode']}) ranks; "
                                "narrow from_phase2.topk or lower k")
            perturbation = {"name": pert["name"], "params": {n: v for n, v in pert.items() if n != "name"}}
            # Where the job runs: this plan's resources; its parallel section, else the ranking job's layout.
            layout = {"nodes": ranking.manifest.parallel.nodes, "gpus_per_node": ranking.manifest.parallel.gpus_per_node}
            sections = {"model": dataclasses.asdict(ranking.manifest.model), "data": plan.data,
                        "resources": dataclasses.asdict(plan.resources), "parallel": plan.parallel or layout,
                        "seed": ranking.manifest.seed, "perturbation": perturbation,
                        "targets": {"from_scores": str(ranking.out_dir / "scores.h5"), "topk": k,
                                    "mode": ranking.labels["mode"]},
                        "controls": {"names": names, "repeats": repeats}}
            labels = {**ranking.labels, "ranking": ranking.id, "perturbation": pert["name"],
                      "params": perturbation["params"], "k": k, "controls": names, "repeats": repeats}
            m = _manifest(plan, 3, sections, results_dir, _describe(labels))
            labels["perturbation"] = m.perturbation.name  # type: ignore[attr-defined]
            labels["params"] = m.perturbation.params.to_dict()  # type: ignore[attr-defined]
            jobs.append(Job(m, labels, needs=(ranking.id,)))
    return jobs


def expand(plan: Plan, results_dir: ResultsDir, model_map: Mapping[str, str] | None = None,
           phase2: Plan | None = None) -> Expansion:
    """Expand a plan into jobs (first occurrence of a duplicate kept); nothing is written.

    `results_dir(job_id)` places each job; `model_map` replaces model ids of the plan; `phase2`
    is the phase-2 plan a phase-3 plan reads (default: the file its from_phase2.plan names)."""
    model_map = dict(model_map or {})
    reduce: list[ReduceStep] = []
    if plan.phase == 1:
        jobs = _expand_phase1(plan, results_dir, model_map)
    elif plan.phase == 2:
        jobs, reduce, _ = _expand_phase2(plan, results_dir, model_map, phase2)
    else:
        jobs = _expand_phase3(plan, results_dir, model_map, phase2)
    unique = list({j.id: j for j in reversed(jobs)}.values())[::-1]
    notes = [f"{len(jobs) - len(unique)} duplicate grid entries give the same manifest; kept once"] \
        if len(unique) < len(jobs) else []
    notes += [f"reduce step: `esa {' '.join(r.command())}` after its {len(r.shards)} shards" for r in reduce]
    return Expansion(plan, unique, reduce, notes)


def _model_entry(model: dict[str, Any], resources: dict[str, Any], parallel: dict[str, Any]) -> dict[str, Any]:
    """A grid.models table: model settings plus this model's own resources and parallel tables."""
    props = {**model["properties"], "resources": {**resources, "description": "This model's jobs' resources "
                                                  "(override [resources])."},
             "parallel": {**parallel, "description": "How this model's jobs run (overrides [parallel])."}}
    return {**model, "properties": props, "required": ["id"]}


def _describe(labels: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items() if k not in ("params", "ranking"))


# ---------------------------------------------------------------------------------- schema
def plan_schema(manifest_id: str, plan_id: str, draft: str) -> dict[str, Any]:
    """The plan schema: sections refer to the manifest schema's fields, so both say the same."""
    from esa.spec.schema_gen import object_schema

    def ref(section: str, name: str) -> dict[str, Any]:
        return {"$ref": f"{manifest_id}#/$defs/{section}/properties/{name}"}

    def partial(cls: type, section: str, skip: tuple[str, ...] = (), description: str = "") -> dict[str, Any]:
        return {"description": description, "type": "object", "additionalProperties": False,
                "properties": {f.name: ref(section, f.name) for f in dataclasses.fields(cls) if f.name not in skip}}

    int_list = {"description": "A list of distinct integers.", "type": "array", "minItems": 1, "uniqueItems": True,
                "items": {"type": "integer"}}
    pos_list = {"description": "A list of distinct integers >= 1.", "type": "array", "minItems": 1,
                "uniqueItems": True, "items": {"type": "integer", "minimum": 1}}
    metric_name = {"$ref": f"{manifest_id}#/$defs/metric/properties/name"}
    mode = {"$ref": f"{manifest_id}#/$defs/ranking/properties/mode"}
    control = {"$ref": f"{manifest_id}#/$defs/controls/properties/names/items"}
    grid = object_schema(Grid)
    gp = grid["properties"]
    gp["models"] = {"description": gp["models"]["description"], "type": "array", "minItems": 1, "items": {
        "anyOf": [{"type": "string", "minLength": 1}, {"$ref": "#/$defs/model_entry"}]}}
    gp["seeds"] = {**int_list, "description": gp["seeds"]["description"], "default": gp["seeds"]["default"]}
    gp["metrics"] = {"description": gp["metrics"]["description"], "type": "array", "minItems": 1, "items": metric_name}
    gp["modes"] = {"description": gp["modes"]["description"], "type": "array", "minItems": 1, "items": mode,
                   "default": gp["modes"]["default"]}
    gp["topk"] = {**pos_list, "description": gp["topk"]["description"], "default": gp["topk"]["default"]}
    gp["profile"] = {"description": gp["profile"]["description"], "type": "array", "minItems": 1,
                     "items": {"$ref": "#/$defs/profile_entry"}}
    gp["perturbation"] = {"description": gp["perturbation"]["description"], "type": "array", "minItems": 1,
                          "items": {"$ref": "#/$defs/perturbation_entry"}}
    gp["k"] = {"description": gp["k"]["description"], "type": "array", "minItems": 1,
               "items": {"anyOf": [{"type": "integer", "minimum": 1}, pos_list]}}
    gp["controls"] = {"description": gp["controls"]["description"], "anyOf": [
        {"type": "array", "items": control, "uniqueItems": True},
        {"type": "array", "minItems": 1, "items": {"$ref": f"{manifest_id}#/$defs/controls/properties/names"}}],
        "default": gp["controls"]["default"]}
    gp["repeats"] = {"description": gp["repeats"]["description"], "anyOf": [
        {"type": "integer", "minimum": 1}, pos_list], "default": gp["repeats"]["default"][0]}
    source = object_schema(FromPhase2)
    sp = source["properties"]
    for key, items in (("models", {"type": "string"}), ("metrics", metric_name), ("modes", mode)):
        sp[key] = {"description": sp[key]["description"], "type": "array", "items": items}
    sp["topk"] = {**pos_list, "description": sp["topk"]["description"]}
    sp["seeds"] = {**int_list, "description": sp["seeds"]["description"]}
    experiment = object_schema(ExperimentSpec)
    experiment["properties"]["name"] = {"description": experiment["properties"]["name"]["description"],
                                        "$ref": f"{manifest_id}#/properties/experiment"}
    experiment["properties"]["phase"].pop("default", None)
    resources = {"description": "Slurm resources of every task of this phase, plus the array throttle.",
                 "type": "object", "additionalProperties": False,
                 "properties": {f.name: ref("resources", f.name) for f in dataclasses.fields(Resources)}}
    # Which grid keys (and nested data/outputs fields) each phase allows.
    rules = []
    nested_phase = {"data": DataSpec, "outputs": Outputs, "parallel": Parallel}
    for phase in (1, 2, 3):
        props: dict[str, Any] = {}
        if phase == 1:
            props["from_phase2"] = {"not": {}}
        if phase == 1:
            props["outputs"] = {"not": {}}
        for section, cls in nested_phase.items():
            if section == "outputs" and phase == 1:
                continue
            banned = {f.name: {"not": {}} for f in dataclasses.fields(cls)
                      if f.metadata.get("phases") is not None and phase not in f.metadata["phases"]}
            if banned:
                props[section] = {"properties": banned}
        grid_banned = {f.name: {"not": {}} for f in dataclasses.fields(Grid)
                       if f.metadata.get("phases") is not None and phase not in f.metadata["phases"]}
        then: dict[str, Any] = {"properties": {**props, "grid": {
            "required": ["perturbation"] if phase == 3 else ["models"], "properties": grid_banned}}}
        if phase == 3:
            then["required"] = ["from_phase2"]
        rules.append({"if": {"properties": {"experiment": {"properties": {"phase": {"const": phase}},
                                                           "required": ["phase"]}}, "required": ["experiment"]},
                      "then": then})
    entry_data = ("seq_len", "max_samples", "batch_size", "pool_size")
    profile_entry = {
        "description": "One block of a phase-2 grid: metric, mode and topk (each a value or a list to cross), "
                       "plus optional metric and data settings for these jobs only.",
        "type": "object", "additionalProperties": False, "required": ["metric"], "properties": {
            "metric": {"description": "Metric name or list of names.",
                       "anyOf": [metric_name, {"type": "array", "minItems": 1, "items": metric_name}]},
            "mode": {"description": "Ranking mode or list of modes.",
                     "anyOf": [mode, {"type": "array", "minItems": 1, "items": mode}],
                     "default": default_of(RankingSpec, "mode")},
            "topk": {"description": "k or list of k.", "anyOf": [{"type": "integer", "minimum": 1}, pos_list],
                     "default": default_of(RankingSpec, "topk")},
            "models": {"description": "Only for these models of grid.models (ids as written there); default: all.",
                       "type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            **{name: ref("metric", name) for name in sorted(_METRIC_KEYS)},
            **{name: ref("data", name) for name in entry_data}}}
    from esa.spec.params import PARAMS

    param_props: dict[str, Any] = {}
    for kind, cls in PARAMS.items():
        for f in dataclasses.fields(cls):
            param_props.setdefault(f.name, {"$ref": f"{manifest_id}#/$defs/params_{kind}/properties/{f.name}"})
    perturbation_entry = {
        "description": "One perturbation: its name and parameters as keys of the same table (checked by the "
                       "manifest schema after expansion).", "type": "object", "additionalProperties": False,
        "required": ["name"], "properties": {"name": {"$ref": f"{manifest_id}#/$defs/perturbation/properties/name"},
                                             **param_props}}
    return {
        "$schema": draft, "$id": plan_id, "title": "ESA phase plan (TOML), schema version 1",
        "description": "A human-edited plan of one phase: the grid of jobs, their shared model/data settings and "
                       "the Slurm resources. Expansion turns it into one manifest per job (see manifests/README.md). "
                       "Unknown keys are errors. Generated from esa/spec/plan.py.",
        "type": "object", "additionalProperties": False, "required": ["experiment", "grid"],
        "properties": {
            "experiment": experiment,
            "model": partial(ModelSpec, "model", skip=("id",), description="Model settings shared by every model of "
                             "the grid (a model entry may override them)."),
            "data": partial(DataSpec, "data", description="The data section of every manifest (phase 2: "
                            "calibration; phases 1, 3: evaluation)."),
            "outputs": partial(Outputs, "outputs", skip=("dir",), description="Optional result files of every "
                               "manifest (the folder itself is always RUN/results/<id>)."),
            "resources": resources,
            "parallel": partial(Parallel, "parallel", description="How every job of the plan runs: ranks "
                                "(torch.distributed, FSDP2) and activation checkpointing (a model entry may "
                                "override it)."),
            "grid": grid, "from_phase2": source},
        "allOf": rules,
        "$defs": {"model_entry": _model_entry(partial(ModelSpec, "model", description="A model with its own "
                                                      "settings (override [model]), and optionally its own "
                                                      "resources and parallel tables."), resources,
                                              partial(Parallel, "parallel")),
                  "profile_entry": profile_entry, "perturbation_entry": perturbation_entry}}

