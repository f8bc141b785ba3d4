"""Find the linear-like weights of a model and feed their input features to a callback.

Activation-based metrics (act_mag, super_weight) need, for every weight tensor that acts as
a linear map, (a) which axis of the tensor indexes *input features* and (b) the input rows
that reached it during a forward pass. The layouts differ by architecture:

| module | weight shape | input-feature axis |
| --- | --- | --- |
| ``nn.Linear`` (llama, mistral, phi3 fused qkv/gate_up, gpt_neox, lm_head) | [out, in] | 1 |
| transformers ``Conv1D`` (gpt2; ``y = x @ W + b``) | [in, out] | 0 |
| MoE router with a bare ``weight`` (Mixtral ``mlp.gate``: ``F.linear(x, weight)``) | [E, in] | 1 |
| fused experts ``gate_up_proj`` / ``up_proj`` (Mixtral) | [E, 2I, H] | 2 (1 if transposed) |
| fused experts ``down_proj`` | [E, H, I] | 2 (1 if transposed) |

For fused experts, expert ``e`` only sees the tokens routed to it, so captures are delivered
per expert: ``gate_up_proj`` gets the routed hidden states, ``down_proj`` the intermediate
activations ``act(gate) * up`` of those tokens, recomputed from the routed hidden states with
the experts module's own gate function (so custom gates and layouts are honoured).

Parameters are named by ``model.named_parameters()`` (duplicates removed), so a tied
``lm_head`` reports under the embedding's name, e.g. ``transformer.wte.weight`` for GPT-2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LinearWeight",
    "Capture",
    "find_linear_weights",
    "is_down_projection",
    "broadcast_inputs",
    "capture_linear_io",
    "eval_mode",
    "matrix_index",
]

Kind = Literal["linear", "conv1d", "router", "experts_in", "experts_down"]

# Last name components of MLP down projections across architectures: llama/mistral/phi3/
# qwen `down_proj`, gpt_neox `dense_4h_to_h`, opt/phi-1 `fc2`, old mixtral/dbrx `w2`.
# GPT-2's `c_proj` is a down projection only under `mlp` (attn.c_proj is the attention output).
_DOWN_NAMES = frozenset({"down_proj", "dense_4h_to_h", "fc2", "w2"})


@dataclass(frozen=True)
class LinearWeight:
    """One weight tensor used as a linear map, and how its axes relate to input features.

    param_name: canonical parameter name (first name in ``named_parameters()``).
    module_name: the module that applies it (differs from the parameter's prefix when tied).
    kind: ``linear`` | ``conv1d`` | ``router`` | ``experts_in`` | ``experts_down``.
    in_axis: the tensor axis that indexes input features.
    out_axis: the tensor axis that indexes output features.
    expert_axis: 0 for stacked expert tensors, else None.
    """

    param_name: str
    module_name: str
    kind: Kind
    in_axis: int
    out_axis: int
    expert_axis: int | None
    module: nn.Module = field(compare=False, repr=False)
    param: nn.Parameter = field(compare=False, repr=False)

    @property
    def in_features(self) -> int:
        """Number of input features."""
        return int(self.param.shape[self.in_axis])

    @property
    def num_experts(self) -> int | None:
        """Number of stacked experts, or None for a plain matrix."""
        return None if self.expert_axis is None else int(self.param.shape[self.expert_axis])

    @property
    def accumulator_shape(self) -> tuple[int, ...]:
        """Shape of a per-input-feature accumulator: [in] or [E, in] for experts."""
        if self.expert_axis is None:
            return (self.in_features,)
        return (int(self.num_experts), self.in_features)  # type: ignore[arg-type]


@dataclass
class Capture:
    """Rows that reached one linear weight in one forward call.

    inputs: [N, in] input features (the model's dtype). outputs: [N, out] or None when the
    caller did not ask for outputs. expert: expert number for fused experts, else None.
    token_index: for experts, the flat (batch*seq) token index of each row; None means rows
    are all tokens in order.
    """

    weight: LinearWeight
    inputs: torch.Tensor
    outputs: torch.Tensor | None
    expert: int | None
    token_index: torch.Tensor | None


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None
    return Conv1D


def _is_router(module: nn.Module) -> bool:
    # Transformers' MoE routers (MixtralTopKRouter, Qwen2MoeTopKRouter, ...) are bare modules
    # holding a [num_experts, hidden] weight applied with F.linear; they are linear maps.
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or w.ndim != 2 or isinstance(module, nn.Linear):
        return False
    if not type(module).__name__.endswith("Router"):
        return False
    n_exp = getattr(module, "num_experts", None)
    return n_exp is None or int(n_exp) == w.shape[0]


def _expert_params(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter] | None:
    """(first projection, down projection) of a fused-experts module, or None."""
    down = getattr(module, "down_proj", None)
    if not isinstance(down, nn.Parameter) or down.ndim != 3:
        return None
    first_name = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    first = getattr(module, first_name, None)
    if not isinstance(first, nn.Parameter) or first.ndim != 3:
        return None
    if not (hasattr(module, "_apply_gate") or hasattr(module, "act_fn")):
        return None
    return first, down


def find_linear_weights(model: nn.Module) -> list[LinearWeight]:
    """List every linear-like weight of `model` in module order.

    A parameter used by several modules (tied lm_head) appears once per module, always under
    its canonical name, so accumulators keyed by ``param_name`` sum over all its uses.
    Non-floating weights (quantised storage) are skipped: they have no per-weight value.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    conv1d = _conv1d_class()
    found: list[LinearWeight] = []

    def add(mname: str, module: nn.Module, p: nn.Parameter, kind: Kind, in_axis: int,
            out_axis: int, expert_axis: int | None = None) -> None:
        if id(p) in names and p.is_floating_point():
            found.append(LinearWeight(names[id(p)], mname, kind, in_axis, out_axis,
                                      expert_axis, module, p))

    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear):
            add(mname, module, module.weight, "linear", 1, 0)
        elif conv1d is not None and isinstance(module, conv1d):
            add(mname, module, module.weight, "conv1d", 0, 1)
        elif _is_router(module):
            add(mname, module, module.weight, "router", 1, 0)
        elif (pair := _expert_params(module)) is not None:
            # Non-transposed experts store [E, out, in] like nn.Linear; transposed [E, in, out].
            in_axis, out_axis = (1, 2) if getattr(module, "is_transposed", False) else (2, 1)
            add(mname, module, pair[0], "experts_in", in_axis, out_axis, 0)
            add(mname, module, pair[1], "experts_down", in_axis, out_axis, 0)
    return found


def is_down_projection(weight: LinearWeight) -> bool:
    """True for MLP down projections (the super-weight hosts of Yu et al. 2024)."""
    if weight.kind == "experts_down":
        return True
    parts = weight.module_name.split(".")
    if parts[-1] in _DOWN_NAMES:
        return True
    return parts[-1] == "c_proj" and len(parts) > 1 and parts[-2] == "mlp"


def matrix_index(weight: LinearWeight, row: int, col: int, expert: int | None = None
                 ) -> tuple[int, ...]:
    """Index in the parameter's own layout of the (output `row`, input `col`) entry."""
    index = [0] * weight.param.ndim
    index[weight.out_axis] = int(row)
    index[weight.in_axis] = int(col)
    if weight.expert_axis is not None:
        if expert is None:
            raise ValueError(f"{weight.param_name} holds experts: an expert number is needed")
        index[weight.expert_axis] = int(expert)
    return tuple(index)


def broadcast_inputs(weight: LinearWeight, per_input: torch.Tensor) -> torch.Tensor:
    """Reshape a per-input-feature tensor ([in], or [E, in] for experts) so that it
    broadcasts against the weight tensor along its input axis (and expert axis)."""
    shape = [1] * weight.param.ndim
    shape[weight.in_axis] = weight.in_features
    if weight.expert_axis is not None:
        shape[weight.expert_axis] = int(weight.num_experts)  # type: ignore[arg-type]
    return per_input.reshape(shape)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout, no router jitter), then restore every submodule's own
    training flag (a model may mix frozen eval-mode parts with training parts)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _first_arg(args: tuple, kwargs: dict, pos: int, name: str) -> torch.Tensor:
    if len(args) > pos:
        return args[pos]
    if name in kwargs:
        return kwargs[name]
    raise RuntimeError(f"cannot find argument {name!r} of a fused-experts forward call")


def _dense_hook(weight: LinearWeight, callback: Callable[[Capture], None],
                want_outputs: bool) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0]
        if x.shape[-1] != weight.in_features:
            raise RuntimeError(
                f"{weight.module_name}: input has {x.shape[-1]} features, the weight "
                f"{weight.param_name} expects {weight.in_features}; unsupported layout")
        y = output.reshape(-1, output.shape[-1]) if want_outputs else None
        callback(Capture(weight, x.reshape(-1, x.shape[-1]), y, None, None))
    return hook


def _gate(module: nn.Module, proj: torch.Tensor) -> torch.Tensor:
    """act(gate) * up of a fused gate_up output, with the module's own gate when it has one
    (transformers' experts define `_apply_gate`, which knows interleaved layouts)."""
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(proj)
    gate, up = proj.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _experts_hook(module: nn.Module, weights: Sequence[LinearWeight],
                  callback: Callable[[Capture], None], want_outputs: bool) -> Callable:
    first = next((w for w in weights if w.kind == "experts_in"), None)
    down = next((w for w in weights if w.kind == "experts_down"), None)
    transposed = bool(getattr(module, "is_transposed", False))
    has_gate = bool(getattr(module, "has_gate", True))
    has_bias = bool(getattr(module, "has_bias", False))
    first_bias_name = "gate_up_proj_bias" if has_gate else "up_proj_bias"

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if not transposed:
            return F.linear(x, w, b)
        y = x @ w
        return y if b is None else y + b

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        # The module's parameters as they are during this forward: a sharded model (FSDP2) swaps
        # its sharded parameters for the gathered full ones around each forward.
        gate_up, down_p = _expert_params(mod)  # type: ignore[misc]
        hidden = _first_arg(args, kwargs, 0, "hidden_states")
        top_k_index = _first_arg(args, kwargs, 1, "top_k_index")
        hidden = hidden.reshape(-1, hidden.shape[-1])
        n_exp = gate_up.shape[0]
        # A token is routed to expert e if e is among its top-k choices (ids >= n_exp are
        # expert-parallel sentinels and are ignored, as the model ignores them).
        for e in range(n_exp):
            tokens = (top_k_index == e).any(dim=-1).nonzero().flatten()
            if tokens.numel() == 0:
                continue
            h = hidden[tokens]
            if first is not None:
                callback(Capture(first, h, None, e, tokens))
            if down is None:
                continue
            b1 = getattr(mod, first_bias_name)[e] if has_bias else None
            proj = linear(h, gate_up[e], b1)
            inter = _gate(mod, proj) if has_gate else mod.act_fn(proj)
            out = None
            if want_outputs:
                b2 = mod.down_proj_bias[e] if has_bias else None
                out = linear(inter, down_p[e], b2)
            callback(Capture(down, inter, out, e, tokens))
    return hook


@contextmanager
def capture_linear_io(weights: Sequence[LinearWeight], callback: Callable[[Capture], None],
                      want_outputs: bool = False) -> Iterator[None]:
    """Within the block, call `callback` with a `Capture` each time one of `weights` is
    applied in a forward pass. Outputs are included only when `want_outputs` (for fused
    experts they cost an extra matmul). Hooks are always removed on exit."""
    handles = []
    by_module: dict[int, list[LinearWeight]] = {}
    for w in weights:
        by_module.setdefault(id(w.module), []).append(w)
    try:
        for group in by_module.values():
            module = group[0].module
            if group[0].kind in ("experts_in", "experts_down"):
                hook = _experts_hook(module, group, callback, want_outputs)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(
                    _dense_hook(group[0], callback, want_outputs)))
        yield
    finally:
        for h in handles:
            h.remove()
