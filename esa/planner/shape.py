"""A model's dimensions and parameter counts, read from its config.json dict.

Supported families (what ESA's seed models use): llama-like decoders (model_type llama,
mistral), phi3 (fused qkv / gate_up), mixtral (fused MoE experts), gpt_neox and gpt2.
Counts follow the transformers implementations exactly (a test builds each bundled config
on the meta device and compares).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esa.core.errors import UserError

_FAMILIES = {"llama": "llama", "mistral": "llama", "phi3": "phi3",
             "mixtral": "mixtral", "gpt_neox": "gpt_neox", "gpt2": "gpt2"}


@dataclass(frozen=True)
class ModelShape:
    """Everything the planner needs to know about a model; sizes are element counts."""

    family: str  # llama | phi3 | mixtral | gpt_neox | gpt2
    model_type: str
    hidden: int
    intermediate: int  # per expert for mixtral
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None
    tied: bool
    experts: int = 0
    experts_per_token: int = 0
    attention_bias: bool = False
    mlp_bias: bool = False
    parallel_residual: bool = False
    gelu_tanh_chain: bool = False  # gpt2 gelu_new: a chain of elementwise ops, 5 saved tensors
    position_embeddings: int = 0  # gpt2's learned wpe rows

    @property
    def q_dim(self) -> int:
        """Width of all query heads together."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of all key (or value) heads together."""
        return self.kv_heads * self.head_dim

    @property
    def gqa(self) -> bool:
        """Grouped-query attention (fewer key/value heads than query heads)."""
        return self.kv_heads != self.heads

    # ------------------------------------------------------------------ parameter counts
    def attention_params(self) -> int:
        """q, k, v and output projections of one block (with biases where present)."""
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        n = h * (q + 2 * kv) + q * h
        if self.family in ("gpt_neox", "gpt2"):
            n += (q + 2 * kv) + h
        elif self.attention_bias:
            n += (q + 2 * kv) + h
        return n

    def mlp_params(self) -> int:
        """The feed-forward part of one block (router + experts for mixtral)."""
        h, i = self.hidden, self.intermediate
        if self.family == "mixtral":
            return self.experts * h + self.experts * 3 * h * i
        if self.family in ("gpt_neox", "gpt2"):
            return 2 * h * i + i + h
        return 3 * h * i + (2 * i + h if self.mlp_bias else 0)

    def norm_params(self) -> int:
        """Parameters of one norm (LayerNorm has a bias, RMSNorm does not)."""
        return 2 * self.hidden if self.family in ("gpt_neox", "gpt2") else self.hidden

    def block_params(self) -> int:
        """One decoder block."""
        return self.attention_params() + self.mlp_params() + 2 * self.norm_params()

    def embed_params(self) -> int:
        """Token embedding."""
        return self.vocab * self.hidden

    def lm_head_params(self) -> int:
        """Output projection (0 when tied to the embedding)."""
        return 0 if self.tied else self.vocab * self.hidden

    def n_parameters(self) -> int:
        """All parameters, a tied lm_head counted once (what model.parameters() yields)."""
        return (self.layers * self.block_params() + self.embed_params() + self.lm_head_params()
                + self.norm_params() + self.position_embeddings * self.hidden)

    def linear_params(self) -> int:
        """Weights act_mag scores: every linear-like weight (projections, router, experts,
        lm_head or the tied embedding); not embeddings, norms or biases."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        attn = h * (q + 2 * kv) + q * h
        if self.family == "mixtral":
            mlp = self.experts * h + self.experts * 3 * h * i
        elif self.family in ("gpt_neox", "gpt2"):
            mlp = 2 * h * i
        else:
            mlp = 3 * h * i
        return self.layers * (attn + mlp) + self.vocab * h

    def down_params(self) -> int:
        """Weights super_weight scores: the MLP down projections (all experts)."""
        per = self.hidden * self.intermediate * (self.experts if self.family == "mixtral" else 1)
        return self.layers * per

    def largest_tensor(self) -> int:
        """Elements of the largest single parameter tensor."""
        h, i = self.hidden, self.intermediate
        block = {"llama": max(h * self.q_dim, h * i), "phi3": max(h * (self.q_dim + 2 * self.kv_dim), 2 * h * i),
                 "mixtral": self.experts * 2 * i * h, "gpt_neox": max(3 * h * h, h * i),
                 "gpt2": max(3 * h * h, h * i)}[self.family]
        return max(block, self.vocab * h)

    def largest_linear(self) -> int:
        """Elements of the largest tensor act_mag scores (the lm_head or a block weight)."""
        return self.largest_tensor()

    def largest_down(self) -> int:
        """Elements of the largest down-projection tensor."""
        return self.hidden * self.intermediate * (self.experts if self.family == "mixtral" else 1)

    def largest_unit(self) -> int:
        """Parameters of the largest FSDP unit: a decoder block, the embedding, or the lm_head
        (each wrapped separately; final norm and position embeddings join the nearest)."""
        return max(self.block_params(), self.embed_params() + self.position_embeddings * self.hidden,
                   self.lm_head_params())

    def matmul_params_per_token(self) -> int:
        """Weights each token is multiplied with in a forward pass: all block projections (for
        MoE the router and top-k of the experts) plus the lm_head; lookups cost nothing."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        attn = h * (q + 2 * kv) + q * h
        if self.family == "mixtral":
            mlp = self.experts * h + self.experts_per_token * 3 * h * i
        elif self.family in ("gpt_neox", "gpt2"):
            mlp = 2 * h * i
        else:
            mlp = 3 * h * i
        return self.layers * (attn + mlp) + self.vocab * h


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    if default is None:
        raise UserError(f"model config has none of {', '.join(names)}")
    return default


def model_shape(cfg: dict[str, Any]) -> ModelShape:
    """Read a config.json dict; UserError for an unsupported model_type or missing field."""
    mtype = str(cfg.get("model_type", ""))
    if mtype not in _FAMILIES:
        raise UserError(f"the planner does not know model_type '{mtype or '?'}'; supported: "
                        f"{', '.join(sorted(_FAMILIES))}")
    family = _FAMILIES[mtype]
    h = int(_get(cfg, "hidden_size", "n_embd"))
    heads = int(_get(cfg, "num_attention_heads", "n_head"))
    if family == "gpt2":
        inner = cfg.get("n_inner")
        return ModelShape(family, mtype, h, int(inner) if inner else 4 * h, int(_get(cfg, "n_layer", "num_hidden_layers")),
                          heads, heads, h // heads, int(cfg["vocab_size"]), int(_get(cfg, "n_positions", default=1024)),
                          tied=bool(cfg.get("tie_word_embeddings", True)),
                          gelu_tanh_chain=cfg.get("activation_function", "gelu_new") in ("gelu_new", "gelu_fast"),
                          position_embeddings=int(_get(cfg, "n_positions", default=1024)))
    kv = int(cfg.get("num_key_value_heads") or heads) if family != "gpt_neox" else heads
    head_dim = int(cfg.get("head_dim") or h // heads)
    tied = bool(cfg.get("tie_word_embeddings", False))
    common: dict[str, Any] = dict(family=family, model_type=mtype, hidden=h, intermediate=int(cfg["intermediate_size"]),
                  layers=int(cfg["num_hidden_layers"]), heads=heads, kv_heads=kv, head_dim=head_dim,
                  vocab=int(cfg["vocab_size"]), max_positions=cfg.get("max_position_embeddings"), tied=tied)
    if family == "mixtral":
        return ModelShape(**common, experts=int(cfg["num_local_experts"]),
                          experts_per_token=int(cfg["num_experts_per_tok"]))
    if family == "gpt_neox":
        return ModelShape(**common, attention_bias=bool(cfg.get("attention_bias", True)),
                          parallel_residual=bool(cfg.get("use_parallel_residual", True)))
    if family == "phi3":
        return ModelShape(**common)
    return ModelShape(**common, attention_bias=bool(cfg.get("attention_bias", False)),
                      mlp_bias=bool(cfg.get("mlp_bias", False)))
