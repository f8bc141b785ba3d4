"""Job manifests: the plain JSON document every command builds and `esa run` executes.

A manifest says what to run (phase, model, data, seed, and the phase's own sections) and
where to write (outputs.dir). The CLI builds one from its flags; plans (jobs/) build many.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from typing import Any

from esa.data import DataSpec, validate_spec
from esa.errors import UserError
from esa.models import ModelSpec

SCHEMA_VERSION = 1
PHASES = (1, 2, 3)
# Sections that say where results go, not what is computed: they do not change the job's id.
_NOT_IDENTITY = ("outputs", "id")


def base_manifest(phase: int, model: ModelSpec, data: DataSpec, *, batch_size: int, seed: int,
                  out_dir: str, experiment: str | None = None) -> dict[str, Any]:
    """The sections every phase shares."""
    return {
        "schema_version": SCHEMA_VERSION,
        "phase": phase,
        "experiment": experiment or "adhoc",
        "model": asdict(model),
        "data": {**asdict(data), "batch_size": batch_size},
        "seed": seed,
        "outputs": {"dir": out_dir},
    }


def manifest_id(manifest: dict[str, Any]) -> str:
    """Short content hash of the canonical JSON (outputs excluded): re-expanding is idempotent."""
    core = {k: v for k, v in manifest.items() if k not in _NOT_IDENTITY}
    canonical = json.dumps(core, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _section(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    value = manifest.get(name)
    if not isinstance(value, dict):
        raise UserError(f"manifest: $.{name} is missing or not an object")
    return value


def model_spec(manifest: dict[str, Any]) -> ModelSpec:
    """The ModelSpec of a manifest (unknown keys are an error)."""
    section = _section(manifest, "model")
    known = {f.name for f in fields(ModelSpec)}
    extra = set(section) - known
    if extra:
        raise UserError(f"manifest: $.model has unknown field(s) {', '.join(sorted(extra))}")
    if "id" not in section:
        raise UserError("manifest: $.model.id is required")
    return ModelSpec(**section)


def data_spec(manifest: dict[str, Any]) -> tuple[DataSpec, int]:
    """The DataSpec and batch size of a manifest."""
    section = dict(_section(manifest, "data"))
    batch_size = int(section.pop("batch_size", 4))
    section.pop("pool_size", None)  # phase 2 reads it separately
    known = {f.name for f in fields(DataSpec)}
    extra = set(section) - known
    if extra:
        raise UserError(f"manifest: $.data has unknown field(s) {', '.join(sorted(extra))}")
    if batch_size < 1:
        raise UserError(f"manifest: $.data.batch_size must be at least 1 (got {batch_size})")
    return DataSpec(**section), batch_size


def check_basic(manifest: dict[str, Any]) -> None:
    """Structural checks every runner needs (the JSON Schema of `esa validate` is stricter)."""
    if not isinstance(manifest, dict):
        raise UserError("manifest: the document must be a JSON object")
    if manifest.get("phase") not in PHASES:
        raise UserError(f"manifest: $.phase must be one of {list(PHASES)} (got {manifest.get('phase')!r})")
    if not isinstance(_section(manifest, "outputs").get("dir"), str):
        raise UserError("manifest: $.outputs.dir is required")
    model_spec(manifest)
    validate_spec(data_spec(manifest)[0])
