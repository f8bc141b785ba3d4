"""Perplexity, mean NLL and token accuracy over fixed-length windows.

PPL = exp(mean NLL over every predicted token); token accuracy is the argmax hit rate over the
same tokens. Per-window NLL is kept so that a perturbed run can be compared with the baseline
window by window (paired bootstrap).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from esa.core.errors import NonFiniteLossError
from esa.core.logs import get_logger, progress
from esa.parallel.env import rank, world_size
from esa.parallel.split import all_gather_rows, eval_steps, split_range
from esa.results.records import EvalFigures

log = get_logger("evaluate")

SUSPICIOUS_PPL = 1.5


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every predicted token, [windows, tokens - 1]; cross-entropy in at least fp32
    (bf16 / fp16 logits are promoted, fp64 logits stay fp64)."""
    pred = logits[:, :-1]
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))
    target = ids[:, 1:]
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(target.shape)


def window_sums(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window sum of next-token NLL (token_nll) and count of argmax hits."""
    hits = (logits[:, :-1].argmax(dim=-1) == ids[:, 1:]).sum(dim=1)
    return token_nll(logits, ids).sum(dim=1), hits


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL); inf when a badly damaged model's finite NLL (> ~709 nats) overflows a float."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate(model: Any, windows: torch.Tensor, batch_size: int = 4, desc: str = "eval") -> EvalFigures:
    """Evaluate `model` on LongTensor windows [N, T]; NaN/Inf loss raises NonFiniteLossError."""
    device = next(model.parameters()).device
    n, seq_len = windows.shape
    # Sharded (several ranks): each rank evaluates its contiguous part of the windows, then every
    # rank gathers all per-window figures in window order. One rank: the whole set, batch by batch.
    first, last = split_range(n, world_size(), rank())
    local = torch.zeros(last - first, 2, dtype=torch.float64)
    steps = list(eval_steps(n, batch_size))
    for start, stop, real in progress(steps, total=len(steps), desc=desc):
        batch = windows[start:stop].to(device)
        logits = model(input_ids=batch).logits
        if real:
            sums, hits = window_sums(logits, batch)
            local[start - first:stop - first] = torch.stack([sums.double(), hits.double()], dim=1).cpu()
    figures = all_gather_rows(local, n)
    nll_sums, hit_counts = figures[:, 0], figures[:, 1]
    predicted = seq_len - 1
    if not torch.isfinite(nll_sums).all():
        bad = int((~torch.isfinite(nll_sums)).sum())
        raise NonFiniteLossError(f"the loss is NaN/Inf on {bad} of {n} windows: the model's "
                                 "outputs are not finite (broken weights, or fp16 overflow: try --dtype bf16/fp32)")
    n_tokens = n * predicted
    mean_nll = float(nll_sums.sum() / n_tokens)
    result = EvalFigures(nll=mean_nll, ppl=perplexity(mean_nll),
                        token_accuracy=float(hit_counts.sum() / n_tokens), n_tokens=n_tokens,
                        n_windows=n, per_window_nll=(nll_sums / predicted).tolist(),
                        per_window_accuracy=(hit_counts / predicted).tolist())
    result.flags = sanity_flags(result, windows)
    for flag in result.flags:
        log.warning("suspicious result: %s", flag)
    return result


def sanity_flags(result: EvalFigures, windows: torch.Tensor | None = None) -> list[str]:
    """Reasons to distrust a result (a PPL near 1 means broken data, not a great model)."""
    flags = []
    if result.ppl < SUSPICIOUS_PPL:
        flags.append(f"ppl {result.ppl:.3f} < {SUSPICIOUS_PPL}: almost certainly a data bug "
                     "(padding counted, repeated windows or text the model memorised)")
    if windows is not None and len(windows) > 1:
        rows = np.ascontiguousarray(windows.cpu().numpy())
        unique = len({r.tobytes() for r in rows})
        if unique < len(rows):
            flags.append(f"{len(rows) - unique} of {len(rows)} windows are exact repeats")
        # One token filling most of the data is what a padded dataset looks like.
        values, counts = np.unique(rows, return_counts=True)
        top = counts.max() / rows.size
        if top > 0.5:
            flags.append(f"token id {int(values[counts.argmax()])} makes up {top:.0%} of the data (padding?)")
    return flags
