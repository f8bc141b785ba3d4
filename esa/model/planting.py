"""Plant an exact, known super weight in a model (for tests and demonstrations).

Enlarging one weight does not make it matter: the next normalisation absorbs the scale. A
weight that matters can be built exactly from a *cancelling pair* in one MLP:

1. make neuron ``col2`` a copy of neuron ``col`` (same input weights and biases, so its
   activation x_col2 equals x_col on every token);
2. clear neuron ``col2``'s output column, then set ``down[row, col] += V`` and
   ``down[row, col2] = -V``.

The two contributions to residual channel ``row`` cancel, (down[row,col] + V)·x_col - V·x_col
= down[row,col]·x_col, so the planted model computes what the original computes with neuron
``col2`` removed (exact in real arithmetic; within rounding in floating point). Zeroing
``down[row, col2]`` adds +V·x_col to channel ``row`` and zeroing ``down[row, col]`` adds about
-V·x_col: a huge activation spike that wrecks the model, while zeroing random weights does
nothing noticeable. Both planted weights are the largest |W| of the model for large V.

Supported MLPs: gated llama-style ``gate_proj``/``up_proj``/``down_proj`` (llama, mistral,
qwen2, ...), phi3's fused ``gate_up_proj`` (gate rows first, then up rows), gpt2's
``c_fc``/``c_proj`` (Conv1D, weights stored [in, out], so the down index is [col, row]) and
gpt_neox's ``dense_h_to_4h``/``dense_4h_to_h``. Mixture-of-experts MLPs are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esa.core.errors import UserError
from esa.model.blocks import decoder_blocks
from esa.spec.weights import format_weight

__all__ = ["plant_super_weight", "find_mlp", "MLPLayout", "DEFAULT_RELATIVE_MAGNITUDE"]

# Default V as a multiple of the largest |W| of the down projection (as in issue #4).
DEFAULT_RELATIVE_MAGNITUDE = 1e4


@dataclass
class MLPLayout:
    """Where one MLP's neurons live.

    inputs: (tensor, dim, offset) triples: neuron n's input weights are the slice
        ``tensor.select(dim, offset + n)`` (a row of a Linear, a column of a Conv1D, an
        entry of a bias). down: the output projection's weight; down_transposed: True when
        it is stored [intermediate, hidden] (gpt2 Conv1D). hidden / intermediate: sizes.
    """

    kind: str
    inputs: list[tuple[torch.Tensor, int, int]]
    down: torch.Tensor
    down_transposed: bool
    hidden: int
    intermediate: int

    def down_index(self, row: int, col: int) -> tuple[int, int]:
        """Storage index of the down weight from neuron ``col`` to residual channel ``row``."""
        return (col, row) if self.down_transposed else (row, col)


def _linear_rows(linear: torch.nn.Module, offset: int = 0) -> list[tuple[torch.Tensor, int, int]]:
    out = [(linear.weight, 0, offset)]
    if getattr(linear, "bias", None) is not None:
        out.append((linear.bias, 0, offset))
    return out


def find_mlp(model: torch.nn.Module, layer: int) -> MLPLayout:
    """Locate the MLP of block ``layer`` and describe its neuron layout."""
    blocks = decoder_blocks(model)
    if not 0 <= layer < len(blocks):
        raise UserError(f"layer {layer} out of range: the model has {len(blocks)} blocks")
    mlp = getattr(blocks[layer], "mlp", None)
    if mlp is None or hasattr(mlp, "experts"):
        raise UserError(f"block {layer} of {type(model).__name__} has no dense MLP to plant in "
                        "(mixture-of-experts MLPs are not supported)")
    if all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
        down = mlp.down_proj.weight
        inputs = _linear_rows(mlp.gate_proj) + _linear_rows(mlp.up_proj)
        return MLPLayout("gated", inputs, down, False, down.shape[0], down.shape[1])
    if hasattr(mlp, "gate_up_proj") and hasattr(mlp, "down_proj"):
        down = mlp.down_proj.weight
        n = down.shape[1]
        inputs = _linear_rows(mlp.gate_up_proj) + _linear_rows(mlp.gate_up_proj, offset=n)
        return MLPLayout("fused_gate_up", inputs, down, False, down.shape[0], n)
    if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
        down = mlp.c_proj.weight  # Conv1D: [intermediate, hidden]
        inputs = [(mlp.c_fc.weight, 1, 0)]
        if getattr(mlp.c_fc, "bias", None) is not None:
            inputs.append((mlp.c_fc.bias, 0, 0))
        return MLPLayout("conv1d", inputs, down, True, down.shape[1], down.shape[0])
    if hasattr(mlp, "dense_h_to_4h") and hasattr(mlp, "dense_4h_to_h"):
        down = mlp.dense_4h_to_h.weight
        inputs = _linear_rows(mlp.dense_h_to_4h)
        return MLPLayout("dense", inputs, down, False, down.shape[0], down.shape[1])
    raise UserError(f"unsupported MLP {type(mlp).__name__} in block {layer}; supported: "
                    "gate/up/down_proj, gate_up_proj, c_fc/c_proj, dense_h_to_4h/dense_4h_to_h")


def _param_name(model: torch.nn.Module, tensor: torch.Tensor) -> str:
    for name, param in model.named_parameters():
        if param is tensor:
            return name
    raise UserError("the down projection is not a parameter of the model")  # pragma: no cover


def plant_super_weight(model: torch.nn.Module, layer: int, row: int, col: int, col2: int,
                       magnitude: float | None = None) -> list[str]:
    """Plant a cancelling pair of weights (see the module docstring) in place.

    layer: block index; row: residual (hidden) channel; col, col2: two distinct MLP neurons;
    magnitude: V (default 1e4 times the largest |W| of that down projection). Returns the
    names ``'param:i,j'`` of the two planted weights: first down[row, col] (= old + V),
    then down[row, col2] (= -V), in storage order (gpt2: ``c_proj.weight:col,row``).
    """
    mlp = find_mlp(model, layer)
    if not 0 <= row < mlp.hidden:
        raise UserError(f"row {row} out of range: the hidden size is {mlp.hidden}")
    for name, c in (("col", col), ("col2", col2)):
        if not 0 <= c < mlp.intermediate:
            raise UserError(f"{name} {c} out of range: the MLP has {mlp.intermediate} neurons")
    if col == col2:
        raise UserError("col and col2 must be different neurons")
    with torch.no_grad():
        down = mlp.down
        if magnitude is None:
            magnitude = DEFAULT_RELATIVE_MAGNITUDE * float(down.abs().max())
        v = float(magnitude)
        if not v > 0 or v == float("inf"):
            raise UserError(f"magnitude must be a positive finite number, got {magnitude!r}")
        for tensor, dim, offset in mlp.inputs:
            tensor.select(dim, offset + col2).copy_(tensor.select(dim, offset + col))
        # Clear neuron col2's output so that its only remaining effect is the planted -V.
        down.select(0 if mlp.down_transposed else 1, col2).zero_()
        i1, i2 = mlp.down_index(row, col), mlp.down_index(row, col2)
        down[i1] = torch.tensor(float(down[i1]) + v, dtype=torch.float64).to(down.dtype)
        down[i2] = torch.tensor(-v, dtype=torch.float64).to(down.dtype)
    name = _param_name(model, mlp.down)
    return [format_weight(name, i1), format_weight(name, i2)]
