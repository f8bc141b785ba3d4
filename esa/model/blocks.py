"""The repeated decoder blocks of a causal LM, and activation checkpointing over them.

Blocks are what FSDP2 shards one unit at a time and what activation checkpointing recomputes.
Checkpointing patches each block's ``forward`` in place: parameter names stay as they are (a
wrapper module would rename them), FSDP's hooks (in ``Module.__call__``) stay outside the
recomputed region, and it works in eval mode, where ESA scores (Hugging Face's own
``gradient_checkpointing_enable`` checkpoints only in training mode, so it is a no-op here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from esa.core.errors import UserError

__all__ = ["decoder_blocks", "checkpoint_blocks"]

# Where the block list sits in the seed architectures (used when a model does not name its block class).
_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks, in order.

    The block class each Hugging Face model names in ``_no_split_modules`` (LlamaDecoderLayer,
    GPT2Block, GPTNeoXLayer, ...); else the ModuleList at a known path; else the largest
    ModuleList of identical modules."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    for path in _BLOCK_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return list(found)
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    if not best:
        raise UserError(f"cannot find the decoder blocks of {type(model).__name__}")
    return best


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute each decoder block's activations in backward instead of keeping them.

    Active whenever grad is enabled (train or eval mode); scores are unchanged (the same
    operations run again). Returns the number of blocks patched."""
    from torch.utils.checkpoint import checkpoint

    blocks = decoder_blocks(model)
    for block in blocks:
        if getattr(block, "_esa_checkpointed", False):
            continue
        forward = block.forward

        def checkpointed(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = checkpointed  # type: ignore[method-assign]
        block._esa_checkpointed = True  # type: ignore[attr-defined]
    return len(blocks)
