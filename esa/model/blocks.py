"""The decoder blocks of a causal LM: the ModuleList its forward runs one after another."""

from __future__ import annotations

import torch

from esa.core.errors import UserError

__all__ = ["BLOCK_PATHS", "decoder_blocks"]

# Where decoder blocks live in the supported architectures.
BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks (UserError naming the paths looked at when there is none)."""
    for path in BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise UserError(f"cannot find the decoder blocks of {type(model).__name__} "
                    f"(looked for {', '.join(BLOCK_PATHS)})")
