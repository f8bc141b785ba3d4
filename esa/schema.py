"""JSON-Schema validation of manifests (and plans), with one readable line per error.

The schemas live in manifests/schema/ (manifest.schema.json, plan.schema.json). Every error
names the field path and the rule, e.g. ``$.metric.name: 'grad_x_wieght' is not one of [...]``.
Beyond the schema, :func:`validate_manifest` checks what JSON Schema cannot express: a shard
``i/n`` with ``i < n``, an ``id`` equal to the content hash, and (given a run folder) an output
folder that stays inside that run folder.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from esa.errors import UserError

# The message a schema gives for one of its rules: {"x-error": {"pattern": "must be ..."}}.
# JSON Schema 2020-12 ignores unknown keywords, so this is an annotation for us only.
_MESSAGE_KEY = "x-error"
_SCHEMA_FILES = {"manifest": "manifest.schema.json", "plan": "plan.schema.json"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def schema_dir() -> Path:
    """Folder of the schema files: $ESA_SCHEMA_DIR, else manifests/schema/ next to the package."""
    env = os.environ.get("ESA_SCHEMA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent.parent / "manifests" / "schema")
    for folder in candidates:
        if (folder / _SCHEMA_FILES["manifest"]).is_file():
            return folder
    raise UserError(f"cannot find {_SCHEMA_FILES['manifest']} (looked in {', '.join(map(str, candidates))}); "
                    "set ESA_SCHEMA_DIR to the folder that holds it")


@lru_cache(maxsize=None)
def load_schema(name: str = "manifest") -> dict[str, Any]:
    """The parsed schema 'manifest' or 'plan'."""
    return json.loads((schema_dir() / _SCHEMA_FILES[name]).read_text())


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
        (load_schema(n)["$id"], Resource.from_contents(load_schema(n))) for n in _SCHEMA_FILES)
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


def run_dir_of(manifest_file: str | Path) -> Path | None:
    """RUN for a file named RUN/manifests/<12-hex id>.json (the layout plan expansion writes), else None."""
    path = Path(manifest_file)
    if path.parent.name == "manifests" and re.fullmatch(r"[0-9a-f]{12}", path.stem):
        return path.parent.parent
    return None


def _extra_errors(doc: dict[str, Any], run_dir: str | Path | None) -> list[str]:
    """Rules JSON Schema cannot express; run only on schema-valid documents."""
    errors = []
    if "shard" in doc:
        i, n = (int(x) for x in doc["shard"].split("/"))
        if i >= n:
            errors.append(f"$.shard: '{doc['shard']}' needs 0 <= i < n")
    if "id" in doc:
        from esa.manifest import manifest_id  # imports torch: only here

        expected = manifest_id(doc)
        if doc["id"] != expected:
            errors.append(f"$.id: '{doc['id']}' is not the content hash '{expected}' of this manifest "
                          "(edited after expansion? expand the plan again)")
    if run_dir is not None:
        out = doc["outputs"]["dir"]
        if not Path(out).is_absolute():
            errors.append(f"$.outputs.dir: '{out}' is relative; a manifest in a run folder names an "
                          "absolute folder inside it (RUN/results/<id>)")
        else:
            reason = escape_reason(run_dir, out)
            if reason:
                errors.append(f"$.outputs.dir: {reason}")
    return errors


def validate_manifest(doc: Any, run_dir: str | Path | None = None) -> list[str]:
    """All errors of a manifest ([] when valid); with `run_dir`, outputs.dir must lie inside it."""
    errors = schema_errors(doc, "manifest")
    if errors:
        return errors
    return _extra_errors(doc, run_dir)


def check_manifest(doc: Any, run_dir: str | Path | None = None, source: str = "manifest") -> None:
    """Raise UserError (one line, every error) unless the manifest is valid."""
    errors = validate_manifest(doc, run_dir)
    if errors:
        raise UserError(f"{source} is invalid: {'; '.join(errors)}")
