"""Names of individual weights and of the parameters that hold them.

A weight is written ``param_name:i,j`` -- the parameter's exact name, a colon, and its
multi-index in the parameter's own indexing (``model.embed_tokens.weight:128000,3303``).
The parameter name itself may contain dots but never a colon, so the *last* colon splits
the two parts.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

from esa.core.errors import UserError

__all__ = ["format_weight", "parse_weight", "layer_of", "module_type_of", "matches"]

# Block containers used by the seed architectures and friends: llama/mistral/phi3/mixtral
# (`model.layers.N`), gpt2 (`transformer.h.N`), gpt_neox (`gpt_neox.layers.N`), opt/bloom
# (`decoder.layers.N`, `h.N`), falcon (`h.N`), t5-style `block.N`.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_GLOB_CHARS = frozenset("*?[")


def format_weight(param: str, index: Sequence[int]) -> str:
    """Return the canonical name ``param:i,j,...`` of one weight."""
    if ":" in param:
        raise UserError(f"parameter name {param!r} must not contain ':'")
    return f"{param}:{','.join(str(int(i)) for i in index)}"


def parse_weight(text: str) -> tuple[str, tuple[int, ...]]:
    """Split ``param:i,j`` into ``(param, (i, j))``; raise UserError on malformed text."""
    if not isinstance(text, str):
        raise UserError(f"weight name must be a string like 'param:i,j', got {text!r}")
    param, sep, idx = text.strip().rpartition(":")
    if not sep or not param or not idx:
        raise UserError(f"malformed weight name {text!r}: expected 'param_name:i,j'")
    parts = [p.strip() for p in idx.split(",")]
    try:
        index = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(
            f"malformed weight name {text!r}: the index must be comma-separated integers"
        ) from None
    if any(i < 0 for i in index):
        raise UserError(f"malformed weight name {text!r}: negative index")
    return param, index


def layer_of(param_name: str) -> int | None:
    """Return the transformer block index of a parameter, or None outside the blocks.

    ``model.layers.3.mlp.down_proj.weight`` -> 3, ``transformer.h.11.attn.c_attn.weight``
    -> 11, ``model.embed_tokens.weight`` -> None.
    """
    m = _LAYER_RE.search(param_name)
    return int(m.group(1)) if m else None


def module_type_of(param_name: str) -> str:
    """Return the module kind of a parameter: the last name component that is not
    ``weight``/``bias`` or a number (``q_proj``, ``down_proj``, ``c_attn``, ``embed_tokens``).

    For mixture-of-experts names such as ``block_sparse_moe.experts.3.w1.weight`` the
    expert number is skipped, giving ``w1``. A bare name (``weight``) is returned as is.
    """
    parts = param_name.split(".")
    for part in reversed(parts[:-1] if len(parts) > 1 else parts):
        if part.isdigit():
            continue
        return part
    return param_name


def matches(name: str, include: Iterable[str] | str | None = None,
            exclude: Iterable[str] | str | None = None) -> bool:
    """Decide whether a parameter name passes the include / exclude filters.

    A pattern that contains a glob character (``*``, ``?`` or ``[``) is matched against the
    whole name with :func:`fnmatch.fnmatchcase`; any other pattern matches when it occurs as
    a substring (so ``mlp`` selects every MLP parameter). With no include patterns every name
    is included; a name that matches any exclude pattern is dropped (exclude wins).
    """
    inc = _as_patterns(include)
    exc = _as_patterns(exclude)
    if inc and not any(_match_one(name, p) for p in inc):
        return False
    return not any(_match_one(name, p) for p in exc)


def _as_patterns(patterns: Iterable[str] | str | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    return [p for p in patterns if p]


def _match_one(name: str, pattern: str) -> bool:
    if _GLOB_CHARS.intersection(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name
