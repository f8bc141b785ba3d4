"""JSON-Schema validation of manifests and plans, with one readable line per error.

The schemas are generated from the typed spec (esa.spec.schema_gen) and validated against in
memory. Every error names the field path and the rule, e.g.
``$.metric.name: 'grad_x_wieght' is not one of [...]``. Beyond the schema,
:func:`validate_manifest` checks what JSON Schema cannot express (a shard ``i/n`` with
``i < n``, an ``id`` equal to the content hash) and, given a run folder, that the output
folder stays inside it. Torch-free.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from esa.core.errors import UserError

__all__ = ["load_schema", "json_path", "schema_errors", "escape_reason", "validate_manifest", "check_manifest"]

# The message a schema gives for one of its rules: {"x-error": {"pattern": "must be ..."}}.
# JSON Schema 2020-12 ignores unknown keywords, so this is an annotation for us only.
_MESSAGE_KEY = "x-error"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def load_schema(name: str = "manifest") -> dict[str, Any]:
    """The schema 'manifest' or 'plan' (generated from the typed spec)."""
    from esa.spec.schema_gen import manifest_schema, plan_schema

    return manifest_schema() if name == "manifest" else plan_schema()


@lru_cache(maxsize=None)
def _validator(name: str) -> Any:
    from jsonschema import Draft202012Validator
    from jsonschema.validators import extend
    from referencing import Registry, Resource

    # Strict integers: 4.0 is not a batch size (JSON Schema would accept it), and True is not 1.
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
    strict = extend(Draft202012Validator, type_checker=checker)
    # Both schemas in one registry, so the plan schema can $ref the manifest's definitions.
    registry = Registry().with_resources(
        (load_schema(n)["$id"], Resource.from_contents(load_schema(n))) for n in ("manifest", "plan"))
    return strict(load_schema(name), registry=registry)


def json_path(parts: Any) -> str:
    """['metric', 'include', 0] -> '$.metric.include[0]'."""
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(str(part)):
            out += f".{part}"
        else:
            out += f"[{json.dumps(str(part))}]"
    return out


def _phase_of(doc: Any) -> Any:
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("experiment"), dict):  # a plan
        return doc["experiment"].get("phase")
    return doc.get("phase")


def _lines(error: Any, doc: Any, what: str) -> list[str]:
    """One or more lines for one jsonschema error."""
    path = list(error.absolute_path)
    custom = error.schema.get(_MESSAGE_KEY, {}) if isinstance(error.schema, dict) else {}
    if error.validator in custom:
        return [f"{json_path(path)}: {custom[error.validator]}"]
    if error.validator == "additionalProperties":
        known = set(error.schema.get("properties", {}))
        return [f"{json_path(path + [k])}: unknown field (not in the schema; check the spelling)"
                for k in sorted(set(error.instance) - known, key=str)]
    if error.validator == "required":
        return [f"{json_path(path + [k])}: required field is missing"
                for k in error.validator_value if k not in error.instance]
    if error.validator == "not" and error.validator_value == {}:  # {"not": {}}: the field is forbidden here
        return [f"{json_path(path)}: not allowed in a phase-{_phase_of(doc)} {what}"]
    if error.validator in ("anyOf", "oneOf") and error.context:
        from jsonschema.exceptions import best_match

        # Prefer the branch whose type fitted: its complaint is the useful one.
        fitting = [c for c in error.context if c.validator != "type"] or error.context
        return _lines(best_match(fitting), doc, what)
    return [f"{json_path(path)}: {error.message}"]


def schema_errors(doc: Any, name: str = "manifest") -> list[str]:
    """Every schema violation of `doc` against schema `name`, one line each, sorted by path."""
    what = "plan" if name == "plan" else "manifest"
    lines: list[str] = []
    for error in _validator(name).iter_errors(doc):
        for line in _lines(error, doc, what):
            if line not in lines:
                lines.append(line)
    return sorted(lines)


def escape_reason(run_dir: str | Path, path: str | Path) -> str | None:
    """Why `path` is not strictly inside `run_dir` (None when it is).

    Relative paths count from `run_dir`; symlinks are followed, so a link inside the run
    folder that points elsewhere is refused like '..' or an absolute path elsewhere."""
    root = Path(run_dir).resolve()
    target = Path(path) if Path(path).is_absolute() else Path(run_dir) / path
    resolved = target.resolve()
    if resolved == root or root not in resolved.parents:
        via = "" if resolved == Path(os.path.abspath(target)) else f" (resolves to {resolved})"
        return f"'{path}'{via} is outside the run folder {root}"
    return None


def _typed(doc: Any, run_dir: str | Path | None) -> tuple[Any, list[str]]:
    """(typed manifest or None, errors): the schema, the checks it cannot express, the run folder."""
    errors = schema_errors(doc, "manifest")
    if errors:
        return None, errors
    from esa.spec.manifest import Manifest

    try:
        manifest = Manifest.from_dict(doc, source="")
    except UserError as exc:  # what the schema cannot express: shard i < n, the id's hash
        return None, [str(exc).removeprefix(" is invalid: ")]
    if run_dir is not None:
        out = doc["outputs"]["dir"]
        if not Path(out).is_absolute():
            return None, [f"$.outputs.dir: '{out}' is relative; a manifest in a run folder names an "
                          "absolute folder inside it (RUN/results/<id>)"]
        reason = escape_reason(run_dir, out)
        if reason:
            return None, [f"$.outputs.dir: {reason}"]
    return manifest, []


def validate_manifest(doc: Any, run_dir: str | Path | None = None) -> list[str]:
    """All errors of a manifest ([] when valid); with `run_dir`, outputs.dir must lie inside it."""
    return _typed(doc, run_dir)[1]


def check_manifest(doc: Any, run_dir: str | Path | None = None, source: str = "manifest") -> Any:
    """The typed manifest (esa.spec.manifest.Manifest); UserError (one line, every error) unless valid."""
    manifest, errors = _typed(doc, run_dir)
    if errors:
        raise UserError(f"{source} is invalid: {'; '.join(errors)}")
    return manifest
