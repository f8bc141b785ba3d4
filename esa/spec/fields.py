"""How a typed spec field is declared: its default, its documentation and its JSON-Schema rules.

Every section of a manifest or a plan is a frozen dataclass whose fields carry, in their
metadata, what the generated JSON Schema needs (a description, extra rules, whether a file
must state the field, which phases allow it). The defaults live in the dataclass, written once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["spec_field", "doc_of", "rules_of", "phases_of", "must_state", "default_of", "omitted_at_default"]


def spec_field(default: Any = dataclasses.MISSING, doc: str = "", *, required: bool = False,
               phases: tuple[int, ...] | None = None, omit_default: bool = False, **rules: Any) -> Any:
    """A dataclass field with its schema metadata.

    default: the default (lists/dicts/dataclass instances are copied per instance);
    doc: the description a person reads in the schema and in --help;
    required: a manifest file must state this field even though code has a default;
    phases: the phases whose manifests allow the field (None: every phase);
    omit_default: the canonical form leaves the field out while it holds its default. Fields added
        after schema version 1 was published use it, so the canonical form (and so the id) of every
        manifest written before stays what it was;
    rules: extra JSON-Schema keywords (minimum, pattern, enum, x-error, items, ref=..., ...).
    """
    meta = {"doc": doc, "rules": rules, "required": required, "phases": phases, "omit_default": omit_default}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


def doc_of(f: dataclasses.Field) -> str:
    """The field's description."""
    return str(f.metadata.get("doc", ""))


def rules_of(f: dataclasses.Field) -> dict[str, Any]:
    """Extra JSON-Schema keywords of the field."""
    return dict(f.metadata.get("rules", {}))


def phases_of(f: dataclasses.Field) -> tuple[int, ...] | None:
    """The phases that allow the field (None: all)."""
    return f.metadata.get("phases")


def omitted_at_default(f: dataclasses.Field) -> bool:
    """Whether the canonical form leaves the field out while it holds its default."""
    return bool(f.metadata.get("omit_default"))


def must_state(f: dataclasses.Field) -> bool:
    """Whether a manifest file must state the field (no default, or marked required)."""
    return bool(f.metadata.get("required")) or not has_default(f)


def has_default(f: dataclasses.Field) -> bool:
    """Whether the field has a default."""
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls` (for --help texts)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")
