"""`esa validate FILE...`: check manifests (JSON) and plans (TOML) against the schemas."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from esa.cli.options import HELP_FORMATTER

_ID_NAME = re.compile(r"^[0-9a-f]{12}$")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("validate", help="check manifest files against the JSON Schema",
                       formatter_class=HELP_FORMATTER,
                       description="Check each manifest (JSON) against the manifest schema. Prints "
                       "'FILE: OK' or one line per error ('FILE: $.field.path: message'); exits 0 only "
                       "if every file is valid. A manifest in a run folder (RUN/manifests/<id>.json) must "
                       "also write inside RUN and carry its id (the hash of its content). A .toml file is checked against the plan schema.")
    p.add_argument("files", nargs="+", metavar="FILE", help="manifest JSON files or plan TOML files")
    p.add_argument("--run-dir", default=None,
                   help="require outputs.dir inside this run folder (default: RUN for files named "
                        "RUN/manifests/<id>.json, else no such check)")
    p.set_defaults(func=run)


def _plan_errors(path: Path) -> list[str]:
    """Schema errors of a TOML plan (its expansion is checked by `make submit DRY_RUN=1`)."""
    import tomllib

    from esa.spec.schema import schema_errors

    try:
        return schema_errors(tomllib.loads(path.read_text()), "plan")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return [f"not valid TOML: {exc}"]


def file_errors(path: Path, run_dir: str | None = None) -> list[str]:
    """The errors of one manifest (or .toml plan) file ([] when valid)."""
    from esa.results.layout import RunLayout
    from esa.spec.schema import validate_manifest

    if not path.is_file():
        return ["cannot read: no such file"]
    if path.suffix == ".toml":
        return _plan_errors(path)
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"not valid JSON: {exc}"]
    layout = RunLayout.of_manifest_file(path)
    errors = validate_manifest(doc, Path(run_dir) if run_dir else (layout.root if layout else None))
    if not errors and _ID_NAME.match(path.stem) and isinstance(doc, dict) and doc.get("id") not in (None, path.stem):
        errors.append(f"$.id: '{doc['id']}' differs from the file name {path.name}")
    if not errors and layout is not None:
        from esa.results.layout import manifest_file_problem

        problem = manifest_file_problem(doc, path)  # what `esa run` and `make resubmit` refuse
        if problem:
            errors.append(f"$.id: {problem}")
    return errors


def run(args: argparse.Namespace) -> int:
    """Print OK or the errors of each file; 0 if all are valid, 1 otherwise."""
    bad = 0
    for name in args.files:
        errors = file_errors(Path(name), args.run_dir)
        bad += bool(errors)
        for line in errors or ["OK"]:
            print(f"{name}: {line}")
    if len(args.files) > 1:
        print(f"{len(args.files) - bad} of {len(args.files)} valid")
    return 1 if bad else 0
