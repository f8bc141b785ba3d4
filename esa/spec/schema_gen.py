"""The JSON Schemas of manifests and plans, generated from the typed spec (never written by hand).

`esa validate`, the runner and plan expansion validate against these dicts in memory; the
files in manifests/schema/ are the same documents for editors and other tools, written by
`python -m esa.spec.schema_gen` (a test checks that the files equal the generated ones, so
the schema and the code cannot drift). Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, get_type_hints

from esa.spec.fields import doc_of, has_default, must_state, phases_of, rules_of
from esa.spec.manifest import (MANIFEST_TYPES, SCHEMA_VERSION, BaselineRef, ControlsSpec, DataSpec, Manifest,
                               MetricSpec, ModelSpec, Outputs, Parallel, PerturbationSpec, RankingSpec, Resources,
                               TargetsSpec)
from esa.spec.names import PERTURBATIONS
from esa.spec.params import PARAMS

__all__ = ["MANIFEST_ID", "PLAN_ID", "manifest_schema", "plan_schema", "schema_files", "write_schema_files"]

MANIFEST_ID = f"urn:esa:schema:manifest:v{SCHEMA_VERSION}"
PLAN_ID = f"urn:esa:schema:plan:v{SCHEMA_VERSION}"
DRAFT = "https://json-schema.org/draft/2020-12/schema"

# The manifest's sections and the $defs name each one gets.
SECTIONS: dict[type, str] = {ModelSpec: "model", DataSpec: "data", MetricSpec: "metric", RankingSpec: "ranking",
                             PerturbationSpec: "perturbation", TargetsSpec: "targets", ControlsSpec: "controls",
                             BaselineRef: "baseline", Outputs: "outputs", Resources: "resources",
                             Parallel: "parallel"}

# Value kinds that several fields share.
SHARED_DEFS: dict[str, dict[str, Any]] = {
    "output_dir": {
        "description": "A job's output folder; it must not contain '..' segments.", "type": "string",
        "minLength": 1, "pattern": "^(?![\\s\\S]*\\u0000)(?!(?:[\\s\\S]*[/\\\\])?\\.\\.(?:[/\\\\]|$))",
        "x-error": {"pattern": "must not contain '..' path segments (outputs stay inside their folder)"}},
    "input_path_or_null": {
        "description": "A file the job reads (may lie outside the run folder: reading is harmless); null: none.",
        "type": ["string", "null"], "minLength": 1, "pattern": "^[^\\u0000]*$",
        "x-error": {"pattern": "must be a non-empty path without NUL characters, or null"}},
    "weight_ref": {
        "description": "One weight: 'param_name:i,j' (multi-index), e.g. 'model.embed_tokens.weight:128000,3303'.",
        "type": "string", "pattern": "^[^:\\s]+:\\s*[\\[(]?\\s*[0-9]+(\\s*,\\s*[0-9]+)*\\s*[\\])]?$",
        "x-error": {"pattern": "must name one weight as 'param_name:i,j'"}},
    "k_or_k_list": {
        "description": "How many top-ranked weights: k, or a list of distinct k (a sweep); null: all ranked.",
        "type": ["integer", "array", "null"], "minimum": 1, "minItems": 1, "uniqueItems": True,
        "items": {"type": "integer", "minimum": 1}},
    "name_pattern_list": {
        "description": "Parameter-name patterns (glob, or substring).", "type": "array",
        "items": {"type": "string", "minLength": 1}, "default": []},
}
# Rules between fields of one perturbation's parameters.
PARAM_RULES: dict[str, dict[str, Any]] = {
    "bit_flip": {"if": {"properties": {"bit_index": {"type": "integer"}}, "required": ["bit_index"]},
                 "then": {"properties": {"bits": {"const": 1, "x-error": {
                     "const": "bit_flip takes either bits (random positions) or bit_index, not both"}}}}},
}
_JSON_TYPES = {str: "string", int: "integer", bool: "boolean", float: "number"}


# ----------------------------------------------------------------------------------- fields
def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _type_schema(tp: Any, items: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON-Schema type of a Python annotation."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        base = _type_schema(inner[0], items)
        if "$ref" in base:  # an optional section: files leave it out rather than writing null
            return base
        if "type" in base:
            base["type"] = [base["type"], "null"]
        else:
            base = {"anyOf": [base, {"type": "null"}]}
        return base
    if typing.get_origin(tp) is tuple:
        return {"type": "array", "items": items or _type_schema(args[0], None)}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return {"$ref": f"#/$defs/{SECTIONS[tp]}"} if tp in SECTIONS else {"type": "object"}
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    return {"type": "object"} if typing.get_origin(tp) is dict else {}  # Any: the caller narrows it


def field_schema(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """The schema of one field: its description, type, rules and default."""
    rules = rules_of(f)
    ref, items = rules.pop("ref", None), rules.pop("items", None)
    if items and "ref" in items:
        items = {"$ref": f"#/$defs/{items['ref']}"}
    schema: dict[str, Any] = {"description": doc_of(f)} if doc_of(f) else {}
    body = {"$ref": f"#/$defs/{ref}"} if ref else _type_schema(tp, items)
    if "enum" in rules or "const" in rules or "anyOf" in rules:
        body.pop("type", None)  # the listed values (or alternatives) say it all
        if "enum" in rules:
            rules["enum"] = list(rules["enum"])
    schema.update(body)
    schema.update(rules)
    if has_default(f) and (ref or "$ref" not in body):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if _documentable(default, schema):
            schema["default"] = _json_value(default)
    return schema


def _documentable(default: Any, schema: dict[str, Any]) -> bool:
    """Whether a code default is a value a file could hold (a placeholder like phase 0 is not)."""
    if dataclasses.is_dataclass(default):
        return False
    if "enum" in schema:
        return default in schema["enum"]
    if default is None:
        ref = schema.get("$ref", "").removeprefix("#/$defs/")
        types_ = schema.get("type", SHARED_DEFS.get(ref, {}).get("type"))
        return isinstance(types_, list) and "null" in types_
    return True


def object_schema(cls: type, *, description: str | None = None, fields_: list[str] | None = None) -> dict[str, Any]:
    """A closed JSON object with the fields of dataclass `cls` (all, or `fields_`)."""
    hints = get_type_hints(cls)
    chosen = [f for f in dataclasses.fields(cls) if fields_ is None or f.name in fields_]
    out: dict[str, Any] = {"description": description or (cls.__doc__ or "").strip().splitlines()[0],
                           "type": "object", "additionalProperties": False}
    required = [f.name for f in chosen if must_state(f)]
    if required:
        out["required"] = required
    out["properties"] = {f.name: field_schema(f, hints[f.name]) for f in chosen}
    return out


# ------------------------------------------------------------------------------- manifest
def _params_defs() -> dict[str, dict[str, Any]]:
    defs = {}
    for kind, cls in PARAMS.items():
        d = object_schema(cls, description=cls.doc)
        d.update(PARAM_RULES.get(kind, {}))
        defs[f"params_{kind}"] = d
    return defs


def _perturbation_def() -> dict[str, Any]:
    d = object_schema(PerturbationSpec)
    d["properties"]["params"] = {"description": d["properties"]["params"]["description"], "type": "object",
                                 "default": {}}
    rules = []
    for entry in PERTURBATIONS:
        names = [entry.name, *entry.aliases]
        cond = {"const": names[0]} if len(names) == 1 else {"enum": names}
        rules.append({"if": {"properties": {"name": cond}, "required": ["name"]},
                      "then": {"properties": {"params": {"$ref": f"#/$defs/params_{entry.name}"}}}})
    d["allOf"] = rules
    return d


def _targets_def() -> dict[str, Any]:
    d = object_schema(TargetsSpec)
    d["anyOf"] = [{"properties": {"weights": {"minItems": 1}}, "required": ["weights"]},
                  {"properties": {"list": {"type": "string"}}, "required": ["list"]},
                  {"properties": {"from_scores": {"type": "string"}}, "required": ["from_scores"]}]
    d["x-error"] = {"anyOf": "no targets: give weights, list or from_scores"}
    return d


def _phase_rules(types_by_phase: dict[int, type], root_fields: dict[str, dataclasses.Field]) -> list[dict[str, Any]]:
    """One if/then per phase: its required sections, and `not: {}` for what it does not allow."""
    rules = []
    for phase, typ in types_by_phase.items():
        own = {f.name: f for f in dataclasses.fields(typ)}
        props: dict[str, Any] = {name: {"not": {}} for name in root_fields if name not in own}
        for name, f in own.items():
            section = _section_type(f)
            if section is None:
                continue
            banned = {g.name: {"not": {}} for g in dataclasses.fields(section)
                      if phases_of(g) is not None and phase not in phases_of(g)}  # type: ignore[operator]
            if banned:
                props[name] = {"properties": banned}
        then: dict[str, Any] = {}
        required = [n for n, f in own.items() if n not in _base_names() and must_state(f)]
        if required:
            then["required"] = required
        then["properties"] = props
        rules.append({"if": {"properties": {"phase": {"const": phase}}, "required": ["phase"]}, "then": then})
    return rules


def _base_names() -> set[str]:
    return {f.name for f in dataclasses.fields(Manifest)}


def _section_type(f: dataclasses.Field) -> type | None:
    tp = get_type_hints(Manifest if f.name in _base_names() else _owner(f))[f.name]
    for arg in typing.get_args(tp) or (tp,):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _owner(f: dataclasses.Field) -> type:
    return next(t for t in MANIFEST_TYPES.values() if f.name in {g.name for g in dataclasses.fields(t)})


@lru_cache(maxsize=None)
def manifest_schema() -> dict[str, Any]:
    """The manifest schema (a fresh copy is the caller's to keep: do not mutate)."""
    root: dict[str, dataclasses.Field] = {}
    hints: dict[str, Any] = {}
    for typ in MANIFEST_TYPES.values():
        typ_hints = get_type_hints(typ)
        for f in dataclasses.fields(typ):
            root.setdefault(f.name, f)
            hints.setdefault(f.name, typ_hints[f.name])
    base = set(_base_names())
    properties = {}
    for name, f in root.items():
        schema = field_schema(f, hints[name])
        if name not in base and "$ref" in schema:  # a phase's own section: say which phase
            schema = {"$ref": schema["$ref"]}
        properties[name] = schema
    defs: dict[str, Any] = dict(SHARED_DEFS)
    for cls, name in SECTIONS.items():
        defs[name] = object_schema(cls)
    defs["perturbation"] = _perturbation_def()
    defs["targets"] = _targets_def()
    defs.update(_params_defs())
    rules = _phase_rules(MANIFEST_TYPES, root)
    rules.append({  # a rule across sections: bottom_k ranks by the phase-2 ranking of from_scores
        "if": {"properties": {"controls": {"properties": {"names": {"contains": {"const": "bottom_k"}}},
                                           "required": ["names"]}}, "required": ["controls"]},
        "then": {"properties": {"targets": {
            "required": ["from_scores"],
            "properties": {"from_scores": {"type": "string", "x-error": {
                "type": "the bottom_k control needs a ranking: set targets.from_scores to a scores.h5"}}},
            "x-error": {"required": "the bottom_k control needs a ranking: set targets.from_scores to a scores.h5"}}}}})
    return {
        "$schema": DRAFT, "$id": MANIFEST_ID, "title": f"ESA job manifest, schema version {SCHEMA_VERSION}",
        "description": "One job of ESA: phase 1 (baseline), 2 (profile: score and rank weights) or 3 (perturb "
                       "weights against controls). `esa validate FILE` checks a file against this schema; "
                       "`esa run FILE` runs it. Unknown fields are errors at every level. Keys marked x-error "
                       "carry the message shown when their rule fails. Generated from esa/spec/manifest.py.",
        "type": "object", "additionalProperties": False,
        "required": [n for n, f in root.items() if n in base and must_state(f)],
        "properties": properties, "allOf": rules, "$defs": defs}


@lru_cache(maxsize=None)
def plan_schema() -> dict[str, Any]:
    """The plan schema (built from esa.spec.plan's types)."""
    from esa.spec.plan import plan_schema as build

    return build(MANIFEST_ID, PLAN_ID, DRAFT)


def schema_files() -> dict[str, dict[str, Any]]:
    """File name -> schema document, as manifests/schema/ holds them."""
    return {"manifest.schema.json": manifest_schema(), "plan.schema.json": plan_schema()}


def render(doc: dict[str, Any]) -> str:
    """The file text of a schema."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def write_schema_files(folder: Path) -> list[Path]:
    """Write every schema into `folder`; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, doc in schema_files().items():
        (folder / name).write_text(render(doc), encoding="utf-8")
        out.append(folder / name)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "manifests" / "schema"
    for path in write_schema_files(target):
        print(path)
