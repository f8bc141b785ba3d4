"""Weight targets: which individual weights a perturbation touches, checked against a model.

A target is given as ``'param:i,j'`` (see :mod:`esa.spec.weights`), as a ``(param, (i, j))`` pair,
or as a :class:`WeightTarget`. Resolving checks every reference against the parameter shapes
and reports each problem (unknown parameter, wrong number of indices, index out of range) in
one clear line. Shapes can come from a loaded model or, before any model is loaded, from the
headers of its safetensors checkpoint (:func:`param_shapes_from_checkpoint`).
"""

from __future__ import annotations

import difflib
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esa.core.errors import UserError
from esa.results.exports import read_topk_csv
from esa.spec.weights import format_weight, parse_weight

__all__ = [
    "WeightTarget",
    "TargetRef",
    "resolve_targets",
    "check_targets_against_shapes",
    "read_target_list",
    "param_shapes_from_checkpoint",
    "param_shapes",
    "tied_aliases",
    "flat_to_index",
    "numel",
]

# At most this many problems are spelled out in one error message; the rest are counted.
_MAX_PROBLEMS_SHOWN = 5


@dataclass(frozen=True)
class WeightTarget:
    """One weight of one parameter tensor.

    param: the parameter's name as ``model.named_parameters()`` lists it (tied parameters
        under their first, canonical name); index: the multi-index; flat_index: the row-major
        position in the flattened tensor.
    """

    param: str
    index: tuple[int, ...]
    flat_index: int

    @property
    def name(self) -> str:
        """The weight's canonical name ``param:i,j``."""
        return format_weight(self.param, self.index)

    def __str__(self) -> str:
        return self.name


TargetRef = str | WeightTarget | tuple[str, Sequence[int]] | tuple[str, str]


def flat_to_index(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major multi-index of flat position ``flat`` in a tensor of ``shape``."""
    index = []
    for dim in reversed(tuple(shape)):
        flat, rem = divmod(int(flat), int(dim))
        index.append(rem)
    return tuple(reversed(index))


def _index_to_flat(index: Sequence[int], shape: Sequence[int]) -> int:
    flat = 0
    for i, dim in zip(index, shape):
        flat = flat * int(dim) + int(i)
    return flat


def param_shapes(model_or_named_params: Any) -> dict[str, tuple[int, ...]]:
    """Map parameter name -> shape for a module, a name->tensor mapping, a name->shape
    mapping, or an iterable of (name, tensor) pairs. Tied parameters appear once."""
    if isinstance(model_or_named_params, torch.nn.Module):
        items: Iterable[tuple[str, Any]] = model_or_named_params.named_parameters()
    elif isinstance(model_or_named_params, Mapping):
        items = model_or_named_params.items()
    else:
        items = model_or_named_params
    shapes: dict[str, tuple[int, ...]] = {}
    for name, value in items:
        shape = value.shape if hasattr(value, "shape") else value
        shapes[name] = tuple(int(d) for d in shape)
    return shapes


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Map every extra name of a shared (tied) parameter to its canonical name, e.g.
    ``lm_head.weight`` -> ``transformer.wte.weight`` for GPT-2."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = canonical.setdefault(id(param), name)
        if first != name:
            aliases[name] = first
    return aliases


def _split_ref(ref: Any) -> tuple[str, Any, str]:
    """Return (param, raw index, text for messages) of one reference, or raise UserError."""
    if isinstance(ref, WeightTarget):
        return ref.param, ref.index, ref.name
    if isinstance(ref, str):
        param, index = parse_weight(ref)
        return param, index, ref
    if isinstance(ref, (tuple, list)) and len(ref) == 2 and isinstance(ref[0], str):
        param, raw = ref
        if isinstance(raw, str):
            index = _parse_index_text(raw, f"target {ref!r}")
        elif isinstance(raw, (int,)) and not isinstance(raw, bool):
            index = (raw,)
        else:
            try:
                index = tuple(int(i) for i in raw)
            except (TypeError, ValueError):
                raise UserError(f"target {ref!r}: the index must be integers like (i, j)") from None
        return param, index, f"{param}:{','.join(str(i) for i in index)}"
    raise UserError(f"cannot read target {ref!r}: write it as 'param:i,j' or (param, (i, j))")


def _parse_index_text(text: str, where: str) -> tuple[int, ...]:
    """Parse '3,4', '(3, 4)' or '[3, 4]' into (3, 4)."""
    body = text.strip().strip("()[]").strip()
    try:
        index = tuple(int(p) for p in body.split(",") if p.strip() != "")
    except ValueError:
        raise UserError(f"{where}: malformed index {text!r}; expected integers like 'i,j'"
                        ) from None
    if not index:
        raise UserError(f"{where}: empty index {text!r}; expected integers like 'i,j'")
    return index


def _problem(param: str, index: tuple[int, ...], text: str,
             shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """One line describing what is wrong with a reference, or None when it is valid."""
    if param not in shapes:
        close = difflib.get_close_matches(param, list(shapes), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"target {text!r}: unknown parameter {param!r}{hint}"
    shape = shapes[param]
    if len(index) != len(shape):
        ndim = len(shape)
        want = ",".join("ijklmn"[d] if d < 6 else "x" for d in range(ndim)) or "(scalar)"
        return (f"target {text!r}: {len(index)} ind{'ex' if len(index) == 1 else 'ices'} "
                f"given but {param!r} is {ndim}-D with shape {shape}; write {param}:{want}")
    bad = [d for d, (i, n) in enumerate(zip(index, shape)) if not 0 <= i < n]
    if bad:
        d = bad[0]
        return (f"target {text!r}: index {index[d]} out of range in dimension {d} of "
                f"{param!r} with shape {shape}")
    return None


def check_targets_against_shapes(
    shapes: Mapping[str, Sequence[int]],
    refs: Iterable[TargetRef],
    aliases: Mapping[str, str] | None = None,
) -> list[WeightTarget]:
    """Validate references against a name -> shape map and return them as WeightTargets.

    No model is needed, so this can run before any model work (shapes from
    :func:`param_shapes_from_checkpoint`). ``refs`` may also be a ranking (a TopK, or anything
    with ``.param`` and ``.index`` columns). ``aliases`` maps extra names of tied parameters
    to the canonical name. Exact duplicates are dropped (first occurrence kept), because a
    weight perturbed twice at once has no defined result. Every problem is collected; one
    UserError reports them (one line each problem, joined by '; ').
    """
    if hasattr(refs, "param") and hasattr(refs, "index"):
        refs = list(zip(refs.param, refs.index))
    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    aliases = dict(aliases or {})
    problems: list[str] = []
    out: list[WeightTarget] = []
    seen: set[tuple[str, int]] = set()
    for ref in refs:
        try:
            param, raw_index, text = _split_ref(ref)
        except UserError as err:
            problems.append(str(err))
            continue
        param = aliases.get(param, param)
        index = tuple(int(i) for i in raw_index)
        problem = _problem(param, index, text, shapes)
        if problem:
            problems.append(problem)
            continue
        flat = _index_to_flat(index, shapes[param])
        if (param, flat) in seen:
            continue
        seen.add((param, flat))
        out.append(WeightTarget(param, index, flat))
    if problems:
        shown = "; ".join(problems[:_MAX_PROBLEMS_SHOWN])
        more = len(problems) - _MAX_PROBLEMS_SHOWN
        prefix = f"{len(problems)} invalid targets: " if len(problems) > 1 else ""
        raise UserError(prefix + shown + (f"; and {more} more" if more > 0 else ""))
    return out


def resolve_targets(model_or_named_params: Any, refs: Iterable[TargetRef]) -> list[WeightTarget]:
    """Resolve references against a model (or its named parameters / a name->shape map).

    For a module, names of tied parameters (``lm_head.weight`` tied to the embedding) are
    accepted and mapped to the canonical name that ``named_parameters()`` lists.
    Raises UserError naming every unknown parameter, wrong index count or out-of-range index.
    """
    aliases = tied_aliases(model_or_named_params) if isinstance(
        model_or_named_params, torch.nn.Module) else {}
    return check_targets_against_shapes(param_shapes(model_or_named_params), refs, aliases)


def read_target_list(path: str | Path) -> list[tuple[str, tuple[int, ...]]]:
    """Read a CSV of targets: the columns of top_weights.csv, just ``param,index`` (index
    ``i,j``, quoted), or one ``weight`` column (``param:i,j``).

    Parsing is :func:`esa.results.exports.read_topk_csv`'s; rows keep file order. Validate the
    result with :func:`resolve_targets` or :func:`check_targets_against_shapes`.
    """
    topk = read_topk_csv(path)
    if len(topk) == 0:
        raise UserError(f"target list {str(path)!r} holds no weights")
    return list(zip(topk.param, topk.index))


def param_shapes_from_checkpoint(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes from the headers of a directory's ``*.safetensors`` files.

    Reads only each file's JSON header (8-byte little-endian length + JSON), never the
    tensors. Names are the checkpoint's: they equal ``named_parameters()`` names for the
    usual dense architectures, but a tied ``lm_head.weight`` may be absent and some
    architectures rename on load (e.g. transformers fuses Mixtral experts), so validate
    again with :func:`resolve_targets` once the model is loaded.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not files:
        raise UserError(f"no .safetensors files in {str(model_dir)!r}; target shapes can be "
                        "checked before loading only for safetensors checkpoints")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise UserError(f"{file} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", head)
            if length > 100 * 1024 * 1024:
                raise UserError(f"{file} is not a safetensors file (header of {length} bytes)")
            try:
                header = json.loads(fh.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{file} is not a safetensors file (unreadable header)") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shapes[name] = tuple(int(d) for d in info["shape"])
    return shapes


def numel(shape: Sequence[int]) -> int:
    """Number of elements of a tensor of ``shape``."""
    return math.prod(int(d) for d in shape)
