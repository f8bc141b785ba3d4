"""Scaled-down copies of a model config: the same architecture with fewer/smaller layers.

Used by the planner's tests and benchmarks/bench_planner_memory.py to build random-init models
whose memory can be measured on a CPU; torch-free (dict editing only).
"""

from __future__ import annotations

import copy
from typing import Any

from esa.core.errors import UserError
from esa.planner.configs import load_config


def scaled_config(model: str | dict[str, Any], *, hidden: int, layers: int, heads: int, intermediate: int,
                  vocab: int, kv_heads: int | None = None, experts: int | None = None,
                  experts_per_token: int | None = None, max_positions: int | None = None) -> dict[str, Any]:
    """A copy of `model`'s config.json dict with the given sizes (key names per family).

    Special-token ids are moved inside the smaller vocabulary (pad 0, bos 1, eos 2), as
    esa.tiny does, so a tokenizer trained offline can drive the model.
    """
    cfg = copy.deepcopy(load_config(model))
    mtype = cfg.get("model_type")
    if hidden % heads:
        raise UserError(f"hidden {hidden} is not a multiple of heads {heads}")
    if mtype == "gpt2":
        cfg.update(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate, vocab_size=vocab)
        if max_positions:
            cfg.update(n_positions=max_positions, n_ctx=max_positions)
    else:
        cfg.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   intermediate_size=intermediate, vocab_size=vocab)
        cfg.pop("head_dim", None)
        if "num_key_value_heads" in cfg:  # families without the key have no grouped-query attention
            cfg["num_key_value_heads"] = kv_heads or heads
        if max_positions:
            cfg["max_position_embeddings"] = max_positions
            if cfg.get("original_max_position_embeddings"):
                cfg["original_max_position_embeddings"] = max_positions
        if mtype == "mixtral":
            cfg["num_local_experts"] = experts or cfg["num_local_experts"]
            cfg["num_experts_per_tok"] = experts_per_token or cfg["num_experts_per_tok"]
        if isinstance(cfg.get("sliding_window"), int) and max_positions:
            cfg["sliding_window"] = max(cfg["sliding_window"], max_positions)
    for key, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        if cfg.get(key) is not None:
            cfg[key] = value
    cfg.pop("_name_or_path", None)
    return cfg
