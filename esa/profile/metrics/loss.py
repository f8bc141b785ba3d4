"""The loss every data-driven metric differentiates: mean next-token NLL of one batch."""

from __future__ import annotations

import torch

from esa.core.errors import NonFiniteLossError, UserError
from esa.parallel.env import any_rank

__all__ = ["next_token_nll", "predicted_tokens"]


def predicted_tokens(input_ids: torch.Tensor) -> int:
    """Number of tokens a batch [B, T] predicts (every position but the first of each row)."""
    return int(input_ids.shape[0]) * max(int(input_ids.shape[1]) - 1, 0)


def next_token_nll(model: torch.nn.Module, input_ids: torch.Tensor,
                   batch_index: int | None = None) -> torch.Tensor:
    """Mean next-token negative log-likelihood of a batch of token ids [B, T].

    Logits at positions 0..T-2 are scored against tokens 1..T-1. The cross-entropy runs in
    fp32 at least (bf16/fp16 logits are upcast; fp64 models stay fp64, which the
    first-principles tests rely on). The returned scalar keeps its autograd graph.

    Raises UserError for a batch that predicts nothing and NonFiniteLossError when the loss
    is NaN or Inf, since every score derived from it would be meaningless.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise UserError(
            f"a calibration batch must be token ids of shape [batch, seq_len >= 2], "
            f"got shape {tuple(input_ids.shape)}"
        )
    # use_cache=False: scoring never generates, a KV cache would only cost memory.
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = input_ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    )
    # One host sync per batch: cheap next to a forward pass, and it stops a run at the
    # first bad batch instead of writing NaN scores (on every rank of a sharded job at once:
    # a rank that stopped alone would leave the others waiting in the next collective).
    if any_rank(not bool(torch.isfinite(loss))):
        where = f" on calibration batch {batch_index}" if batch_index is not None else ""
        dtype = next((p.dtype for p in model.parameters()), None)
        raise NonFiniteLossError(
            f"the next-token loss is {loss.item()}{where} (model dtype {dtype}); the model "
            "produces non-finite logits on this data, so no sensitivity score can be "
            "computed. Check the weights (a previous perturbation not undone?), try "
            "--dtype fp32, or inspect the calibration text."
        )
    return loss
