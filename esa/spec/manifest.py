"""The typed job manifest: every section, every default (written once), and the job's id.

A manifest says what to run (phase, model, data, seed and the phase's own sections) and where
to write (outputs.dir). It is built the same way from CLI flags, from a plan and from a saved
JSON file: a plain dict of what was *given* goes through :meth:`Manifest.from_dict`, which
checks it against the JSON Schema generated from these classes (esa.spec.schema) and fills
every default from here. Precedence: flags > plan > defaults (a caller merges the dicts).

The id is a short hash of the canonical manifest with every default filled, without the
sections that say where or how a job runs rather than what it computes (outputs, resources,
parallel, experiment, id): equal jobs get equal ids however they were written. Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar, get_type_hints

from esa.core.errors import UserError
from esa.spec.fields import omitted_at_default, spec_field
from esa.spec.names import CONTROLS, METRICS, PERTURBATIONS
from esa.spec.params import PerturbationParams, perturbation_params

__all__ = ["SCHEMA_VERSION", "PHASES", "DTYPES", "DEVICES", "ATTENTION", "MODES", "DEFAULT_BATCH_SIZE",
           "NOT_IDENTITY", "ModelSpec", "DataSpec", "MetricSpec", "RankingSpec", "PerturbationSpec",
           "TargetsSpec", "ControlsSpec", "BaselineRef", "Outputs", "Resources", "Parallel", "Manifest",
           "BaselineManifest", "ProfileManifest", "PerturbManifest", "MANIFEST_TYPES", "manifest_id",
           "parse_shard"]

SCHEMA_VERSION = 1
PHASES = (1, 2, 3)
DTYPES = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cuda", "cpu")
ATTENTION = ("auto", "eager", "sdpa", "flash_attention_2")
MODES = ("per_layer", "global")
SAVE_SCORES = ("full", "topk")
SCORE_DTYPES = ("float32", "float16")
COMPRESSIONS = (None, "lzf", "gzip")
# Windows per forward pass when a manifest does not say: phase 2 scores gradients of one window
# at a time unless asked (the runbook's setting); evaluation batches four.
DEFAULT_BATCH_SIZE = {1: 4, 2: 1, 3: 4}
# Top-level keys that say where or how a job runs, not what it computes: not part of the id.
NOT_IDENTITY = ("outputs", "id", "experiment", "resources", "parallel")

_WEIGHT_REF = {"ref": "weight_ref"}
_PATTERNS = {"ref": "name_pattern_list"}
_INPUT_PATH = {"ref": "input_path_or_null"}


# ------------------------------------------------------------------------------------ sections
@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how."""

    id: str = spec_field(doc="Hub id (read from the local Hugging Face cache), a local model folder, "
                         "or esa:tiny-<arch> (the built-in tiny model).", minLength=1)
    revision: str | None = spec_field(None, "Hub revision (branch, tag or commit); null: the default branch.",
                                      minLength=1)
    dtype: str = spec_field("auto", "Weights dtype; auto = bf16 on GPU, fp32 on CPU.", enum=DTYPES)
    device: str = spec_field("auto", "auto = cuda when available, else cpu.", enum=DEVICES)
    attention: str = spec_field("auto", "Attention kernel; second-order metrics switch to eager themselves.",
                                enum=ATTENTION)
    trust_remote_code: bool = spec_field(False, "Let the model repository's own Python code run. Off unless "
                                         "a manifest says so.")


@dataclass(frozen=True)
class DataSpec:
    """Evaluation (phases 1, 3) or calibration (phase 2) text, and its windows."""

    dataset: str = spec_field("builtin", "'builtin' (offline corpus), a hub dataset name, or a local "
                              ".txt/.jsonl/.json/.parquet file or folder.", required=True, minLength=1)
    config: str | None = spec_field(None, "Hub dataset configuration, e.g. wikitext-2-raw-v1.")
    split: str | None = spec_field(None, "Split; null: validation for builtin, test for hub data.")
    text_field: str = spec_field("text", "Column holding the text (json/parquet/hub).", minLength=1)
    seq_len: int | None = spec_field(None, "Tokens per window; null: min(2048, the model's context).", minimum=2)
    max_samples: int | None = spec_field(
        None, "Windows used (phases 1, 3: the first K; phase 2: K drawn by the seed from the pool); null: all.",
        minimum=1)
    batch_size: int | None = spec_field(
        None, "Windows per forward pass; null: " + ", ".join(f"{b} in phase {p}" for p, b in
                                                           DEFAULT_BATCH_SIZE.items()) + ".", minimum=1)
    pool_size: int | None = spec_field(None, "Phase 2: the seed draws max_samples windows from the first "
                                       "pool_size windows; null: all.", phases=(2,), minimum=1)

    def resolved_split(self) -> str:
        """The split actually read."""
        if self.split:
            return self.split
        return "validation" if self.dataset == "builtin" else "test"


@dataclass(frozen=True)
class PerturbationSpec:
    """Phase 3: how target weights are damaged (always restored bit-exactly afterwards)."""

    name: str = spec_field(doc="Perturbation kind (aliases accepted: " + "; ".join(
        f"{a} = {c}" for a, c in PERTURBATIONS.aliases().items()) + ").",
        enum=PERTURBATIONS.names(with_aliases=True))
    params: PerturbationParams = spec_field(None, "Parameters of the kind (zero: none; sign_flip and scale: "
                                            "scale; gauss_noise: sigma, mode; bit_flip: bits, bit_index, prob).")

    def __post_init__(self) -> None:
        name = PERTURBATIONS.canonical(self.name)
        params = self.params
        if not isinstance(params, PerturbationParams) or params.kind != name:
            params = perturbation_params(name, params if isinstance(params, dict) else None)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "params", params)

    def to_json(self, phase: int) -> dict[str, Any]:
        """``{"name": ..., "params": {...}}`` with every parameter filled."""
        return {"name": self.name, "params": self.params.to_dict()}

    @classmethod
    def from_json(cls, doc: dict[str, Any], phase: int, path: str) -> PerturbationSpec:
        """From a manifest's perturbation section (alias names and partial params accepted)."""
        if "name" not in doc:
            raise UserError(f"{path}.name: required field is missing")
        return cls(doc["name"], perturbation_params(doc["name"], doc.get("params")))


@dataclass(frozen=True)
class MetricSpec:
    """Phase 2: the sensitivity metric and its options."""

    name: str = spec_field(doc="Metric name (aliases accepted: " + ", ".join(
        f"{a} = {c}" for a, c in METRICS.aliases().items()) + ").", enum=METRICS.names(with_aliases=True))
    probes: int = spec_field(1, "hutchinson_diag: Rademacher probes per batch.", minimum=1)
    include: tuple[str, ...] = spec_field((), "Score only parameters whose name matches one of these; "
                                          "empty: all.", **_PATTERNS)
    exclude: tuple[str, ...] = spec_field((), "Skip parameters whose name matches one of these.", **_PATTERNS)
    candidates: tuple[str, ...] = spec_field((), "hessian_diag, obd, ablation: score only these weights (and those "
                                             "of candidates_from).", items=_WEIGHT_REF)
    max_exact_coords: int = spec_field(4096, "hessian_diag, obd: refuse more exact coordinates than this.", minimum=1)
    candidates_from: tuple[str, ...] = spec_field(
        (), "hessian_diag, obd, ablation: files whose first n_candidates weights are candidates too: a scores.h5 "
        "(its top-k, best score first), a super_weights.json (by rank) or a CSV list (the columns of "
        "top_weights.csv, or param,index; file order). Several files: the union, first occurrence kept.",
        omit_default=True, items={"type": "string", "minLength": 1})
    n_candidates: int | None = spec_field(None, "With candidates_from: take the first N weights of each file "
                                          "(null: every weight it lists).", omit_default=True, minimum=1)
    per_sample: bool = spec_field(False, "fisher_obd: the empirical Fisher of per-window gradients (default: of "
                                  "per-batch gradients).", omit_default=True)
    perturbation: PerturbationSpec = spec_field(
        PerturbationSpec("zero"), "ablation: what is done to each candidate on its own (restored bit-exactly "
        "before the next one); any phase-3 perturbation.", omit_default=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", METRICS.canonical(self.name))


@dataclass(frozen=True)
class RankingSpec:
    """Phase 2: how scores are ranked."""

    mode: str = spec_field("per_layer", "per_layer: top-k within each tensor; global: top-k over all scored "
                           "tensors.", required=True, enum=MODES)
    topk: int = spec_field(100, "k of the top-k and bottom-k lists.", required=True, minimum=1)
    include: tuple[str, ...] = spec_field((), "Rank only parameters whose name matches one of these; empty: "
                                          "all scored.", **_PATTERNS)
    exclude: tuple[str, ...] = spec_field((), "Leave parameters whose name matches out of the ranking.",
                                          **_PATTERNS)


@dataclass(frozen=True)
class TargetsSpec:
    """Phase 3: the weights to perturb: explicit weights, a CSV list, and/or the top-k of a phase-2 ranking."""

    weights: tuple[str, ...] = spec_field((), "Explicit weights.", items=_WEIGHT_REF)
    list: str | None = spec_field(None, "CSV with the columns of top_weights.csv, or param,index.", **_INPUT_PATH)
    from_scores: str | None = spec_field(None, "A phase-2 scores.h5 whose top-k are the targets (plans: "
                                         "RUN/results/<phase-2 id>/scores.h5).", **_INPUT_PATH)
    topk: int | tuple[int, ...] | None = spec_field(
        None, "With from_scores: how many (null: all ranked). A list of k is a dose-response sweep in one job: "
        "the top k for each k, each against its own matched controls.", ref="k_or_k_list")
    mode: str | None = spec_field(None, "With from_scores: the ranking mode it must hold (null: any).",
                                  enum=(*MODES, None))

    def __post_init__(self) -> None:
        # A list of k is kept sorted without repeats; a list of one k is that k, so [100] and 100
        # are the same job (and a single k keeps the canonical form it always had).
        k = self.topk
        if isinstance(k, (list, tuple)) and k and all(isinstance(v, int) and not isinstance(v, bool) for v in k):
            ks = tuple(sorted(set(k)))
            object.__setattr__(self, "topk", ks[0] if len(ks) == 1 else ks)

    def ks(self) -> list[int | None]:
        """The k values of this job in increasing order ([None]: all ranked)."""
        if isinstance(self.topk, tuple):
            return list(self.topk)
        return [self.topk]


@dataclass(frozen=True)
class ControlsSpec:
    """Phase 3: null models the target damage is compared with."""

    names: tuple[str, ...] = spec_field((), "; ".join(f"{e.name}: {e.summary}" for e in CONTROLS) + ".",
                                        items={"enum": CONTROLS.names()}, uniqueItems=True)
    repeats: int = spec_field(20, "Draws of each random control (bottom_k is drawn once).", minimum=1)


@dataclass(frozen=True)
class BaselineRef:
    """Phase 3: reuse a phase-1 result instead of evaluating the unmodified model again."""

    eval_json: str | None = spec_field(None, "A phase-1 eval.json, reused when it matches the model and "
                                       "data.", **_INPUT_PATH)


@dataclass(frozen=True)
class Outputs:
    """Where results go, and which optional files to write. The allowed fields depend on the phase."""

    dir: str = spec_field(doc="Output folder of the job. Plan expansion writes the absolute path "
                          "RUN/results/<id>; inside a run folder it must stay inside it.", ref="output_dir")
    save_scores: str = spec_field("full", "Phase 2: full = every score tensor in scores.h5; topk = only the "
                                  "ranked lists (huge models).", phases=(2,), enum=SAVE_SCORES)
    score_dtype: str = spec_field("float32", "Phase 2: dtype of stored scores.", phases=(2,), enum=SCORE_DTYPES)
    compression: str | None = spec_field(None, "Phase 2: HDF5 compression of the score datasets (null: none, "
                                         "fastest).", phases=(2,), enum=COMPRESSIONS)
    export_topk_csv: bool = spec_field(True, "Phase 2: write top_weights.csv.", phases=(2,))
    export_stats: bool = spec_field(True, "Phase 2: write per-tensor sensitivity_stats.{csv,json}.", phases=(2,))
    save_plots: bool = spec_field(False, "Phases 2 and 3: write PNG plots.", phases=(2, 3))


@dataclass(frozen=True)
class Resources:
    """Slurm resources of a job (plans keep them per phase and per model; submission reads them). Not part
    of the id. gpus, mem and time may be "auto": the planner (esa.planner) fills them, and the job's
    parallel layout, for a GPU of gpu_memory."""

    gpus: int | str = spec_field(0, 'GPUs per rank (a job of G ranks per node asks for G times this per node, '
                                 '--gres=gpu:N); "auto": the planner picks the smallest layout of 1-GPU ranks '
                                 'whose peak fits gpu_memory, and sets parallel to it.',
                                 anyOf=[{"type": "integer", "minimum": 0}, {"const": "auto"}],
                                 **{"x-error": {"anyOf": 'must be a whole number of GPUs or "auto"'}})
    cpus: int = spec_field(1, "CPUs per task (--cpus-per-task).", minimum=1)
    mem: str | None = spec_field(None, 'Memory per node (--mem), e.g. 64G; null: the cluster\'s default; "auto": '
                                 "the planner's host-memory estimate.", pattern="^([1-9][0-9]*[KMGT]?|auto)$",
                                 **{"x-error": {"pattern": 'must be a Slurm size like 64G, 500M or 16000, or "auto"'}})
    time: str = spec_field("01:00:00", 'Time limit (--time): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS; '
                           '"auto": twice the planner\'s estimate at its stated MFU plus 15 minutes.',
                           pattern="^([0-9]+-[0-9]{1,2}(:[0-9]{2}){0,2}|[0-9]+(:[0-9]{2}){0,2}|auto)$",
                           **{"x-error": {"pattern": 'must be a Slurm time like 04:00:00, 90 or 1-12:00:00, '
                                                     'or "auto"'}})
    gpu_memory: str | None = spec_field(None, 'Memory of one GPU of the partition, e.g. "80G": what "auto" '
                                        "plans for (required by gpus = \"auto\").", pattern="^[1-9][0-9]*[KMGT]$",
                                        **{"x-error": {"pattern": "must be a size like 40G or 80G"}})
    node_gpus: int = spec_field(8, 'GPUs in one node of the partition: the largest one-node layout "auto" tries '
                                "before it spreads a job over nodes.", minimum=1)
    partition: str | None = spec_field(None, "Partition (--partition); null: the cluster's default.", minLength=1)
    account: str | None = spec_field(None, "Account (--account); null: the user's default.", minLength=1)
    qos: str | None = spec_field(None, "Quality of service (--qos); null: the default.", minLength=1)
    array_parallelism: int = spec_field(64, "At most this many tasks of an array run at once (--array=...%N).",
                                        minimum=1)

    @property
    def auto(self) -> list[str]:
        """The fields left to the planner."""
        return [k for k in ("gpus", "mem", "time") if getattr(self, k) == "auto"]


@dataclass(frozen=True)
class Parallel:
    """How the job runs: how many ranks (torch.distributed, FSDP2), and whether activations are
    recomputed. Not part of the id: neither changes the results (a sharded run equals an unsharded
    one with the same global batch)."""

    nodes: int = spec_field(1, "Nodes of the job.", minimum=1)
    gpus_per_node: int = spec_field(1, "Ranks (GPUs) per node.", minimum=1)
    activation_checkpointing: bool = spec_field(
        False, "Phase 2, first-order gradient metrics: recompute each decoder block's activations in "
        "backward instead of keeping them (less memory, about one more forward pass of time; same scores).",
        phases=(2,))

    @property
    def world_size(self) -> int:
        """nodes × gpus_per_node."""
        return self.nodes * self.gpus_per_node


# ----------------------------------------------------------------------------------- manifests
@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What every phase's manifest holds; use the subclass of the phase."""

    PHASE: ClassVar[int] = 0
    schema_version: int = spec_field(SCHEMA_VERSION, "Version of the schema the manifest was written for.",
                                     required=True, const=SCHEMA_VERSION)
    phase: int = spec_field(0, "1 = baseline, 2 = sensitivity profile, 3 = perturbation.", required=True,
                            enum=list(PHASES))
    experiment: str = spec_field("adhoc", "Experiment name (also the run folder's name when the manifest comes "
                                 "from a plan). Not part of the id.", minLength=1, maxLength=128,
                                 pattern="^(?!\\.\\.?$)[^/\\\\\\u0000]+$",
                                 **{"x-error": {"pattern": "must be a plain name (no slashes, not '.' or '..')"}})
    id: str | None = spec_field(None, "Content hash of the canonical manifest (esa.spec.manifest.manifest_id); "
                                "added by plan expansion and the runner.", type="string", pattern="^[0-9a-f]{12}$",
                                **{"x-error": {"pattern": "must be 12 lowercase hex digits "
                                                          "(esa.spec.manifest.manifest_id)"}})
    model: ModelSpec = spec_field(doc="Which model to load and how.")
    data: DataSpec = spec_field(DataSpec(), "Evaluation (phases 1, 3) or calibration (phase 2) text.",
                                required=True)
    seed: int = spec_field(0, "Seed of everything random in the job: the calibration subset, Hutchinson probes, "
                           "noise, bit positions, control draws.", required=True)
    outputs: Outputs = spec_field(doc="Where results go, and which optional files to write.")
    resources: Resources | None = spec_field(None, "Slurm resources (plans keep them per phase). Not part of "
                                             "the id.")
    parallel: Parallel = spec_field(Parallel(), "Ranks that run the job under torch.distributed (FSDP2), and "
                                    "activation checkpointing. Not part of the id.")

    def __post_init__(self) -> None:
        if self.phase not in (0, self.PHASE):
            raise UserError(f"manifest: $.phase {self.phase} does not match a phase-{self.PHASE} manifest")
        object.__setattr__(self, "phase", self.PHASE)
        if self.data.batch_size is None:
            object.__setattr__(self, "data", dataclasses.replace(self.data, batch_size=DEFAULT_BATCH_SIZE[self.PHASE]))

    # --------------------------------------------------------------------------- (de)serialising
    @classmethod
    def from_dict(cls, doc: Any, *, source: str = "manifest", check_id: bool = True,
                  partial: bool = False) -> Manifest:
        """A typed manifest from its JSON form (UserError naming every bad field); `cls` may be
        Manifest (any phase).

        A file (``partial=False``) is checked against the schema as written: it states every
        required field. A builder's dict (``partial=True``: the CLI's flags, a plan's settings)
        holds only what was given; the defaults are filled first and the whole manifest is checked."""
        from esa.spec.schema import schema_errors

        def invalid(errors: list[str]) -> UserError:
            return UserError(f"{source} is invalid: {'; '.join(errors)}")

        if not partial:
            errors = schema_errors(doc, "manifest")
            if errors:
                raise invalid(errors)
        elif not isinstance(doc, dict) or doc.get("phase") not in PHASES:
            raise invalid([f"$.phase: must be one of {list(PHASES)}"])
        typ = MANIFEST_TYPES[doc["phase"]]
        if cls is not Manifest and typ is not cls:
            raise UserError(f"{source} is a phase-{doc['phase']} manifest, not phase {cls.PHASE}")
        try:
            manifest = _build(typ, doc, doc["phase"], "$")
        except UserError as exc:
            raise invalid([str(exc)]) from None
        if partial:
            errors = schema_errors(manifest.to_dict(), "manifest")
            if errors:
                raise invalid(errors)
        if check_id and manifest.id is not None and manifest.id != manifest.job_id():
            raise invalid([f"$.id: '{manifest.id}' is not the content hash '{manifest.job_id()}' of this manifest "
                           "(edited after expansion? expand the plan again)"])
        return manifest

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form: every field of this phase, defaults filled, aliases resolved."""
        return _to_json(self, self.PHASE)

    def job_id(self) -> str:
        """Short content hash of what the job computes (see NOT_IDENTITY)."""
        return manifest_id(self.to_dict())

    def with_id(self) -> Manifest:
        """This manifest with its id set to the content hash."""
        return dataclasses.replace(self, id=self.job_id())

    def with_outputs(self, **changes: Any) -> Manifest:
        """This manifest with fields of its outputs section replaced (e.g. dir=...)."""
        return dataclasses.replace(self, outputs=dataclasses.replace(self.outputs, **changes))


@dataclass(frozen=True, kw_only=True)
class BaselineManifest(Manifest):
    """Phase 1: evaluate the unmodified model."""

    PHASE: ClassVar[int] = 1


@dataclass(frozen=True, kw_only=True)
class ProfileManifest(Manifest):
    """Phase 2: score and rank every weight."""

    PHASE: ClassVar[int] = 2
    metric: MetricSpec = spec_field(doc="Phase 2: the sensitivity metric and its options.")
    ranking: RankingSpec = spec_field(RankingSpec(), "Phase 2: how scores are ranked.", required=True)
    shard: str = spec_field("0/1", "Phase 2: score only slice i of n of the calibration windows (0 <= i < n); "
                            "`esa reduce` sums the shards.", pattern="^[0-9]+/[1-9][0-9]*$",
                            **{"x-error": {"pattern": "must look like 'i/n' with 0 <= i < n, e.g. '0/4'"}})

    def __post_init__(self) -> None:
        super().__post_init__()
        try:  # the field's name in the one line for 'x', '3/2', '1/0'
            parse_shard(self.shard)
        except UserError:
            raise UserError(f"$.shard: '{self.shard}' needs 0 <= i < n") from None


@dataclass(frozen=True, kw_only=True)
class PerturbManifest(Manifest):
    """Phase 3: perturb target weights against matched controls."""

    PHASE: ClassVar[int] = 3
    perturbation: PerturbationSpec = spec_field(doc="Phase 3: how target weights are damaged.")
    targets: TargetsSpec = spec_field(doc="Phase 3: the weights to perturb.")
    controls: ControlsSpec = spec_field(ControlsSpec(), "Phase 3: null models the target damage is compared with.")
    baseline: BaselineRef = spec_field(BaselineRef(), "Phase 3: reuse a phase-1 result.")



MANIFEST_TYPES: dict[int, type[Manifest]] = {1: BaselineManifest, 2: ProfileManifest, 3: PerturbManifest}


# ------------------------------------------------------------------------------------- helpers
def manifest_id(doc: dict[str, Any]) -> str:
    """Short content hash of a canonical manifest dict without the NOT_IDENTITY keys."""
    core = {k: v for k, v in doc.items() if k not in NOT_IDENTITY}
    canonical = json.dumps(core, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text in (None, ""):
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got '{text}'") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n




def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type inside an annotation like `X` or `X | None`."""
    for arg in getattr(tp, "__args__", (tp,)):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _build(cls: type, doc: dict[str, Any], phase: int, path: str) -> Any:
    """Instantiate dataclass `cls` from a JSON object (unknown and missing fields are errors)."""
    if not isinstance(doc, dict):
        raise UserError(f"{path}: must be an object")
    if hasattr(cls, "from_json"):
        return cls.from_json(doc, phase, path)
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise UserError(f"{path}.{unknown[0]}: unknown field (not in the schema; check the spelling)")
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        if name not in doc:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{path}.{name}: required field is missing")
            continue
        value, inner = doc[name], _dataclass_in(hints[name])
        if inner is not None and isinstance(value, dict):
            value = _build(inner, value, phase, f"{path}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _to_json(obj: Any, phase: int) -> Any:
    if hasattr(obj, "to_json"):
        return obj.to_json(phase)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in fields(obj):
            allowed = f.metadata.get("phases")
            if allowed is not None and phase not in allowed:
                continue
            if omitted_at_default(f) and getattr(obj, f.name) == _default(f):
                continue  # added after schema version 1: written only when set (ids stay as they were)
            if f.name in ("id", "resources") and getattr(obj, f.name) is None:
                continue  # optional top-level keys are left out rather than written as null
            out[f.name] = _to_json(getattr(obj, f.name), phase)
        return out
    if isinstance(obj, tuple):
        return [_to_json(v, phase) for v in obj]
    return obj
