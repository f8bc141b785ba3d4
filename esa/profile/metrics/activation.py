"""act_mag: Wanda's activation-aware magnitude |W_ij| * ||X_j||_2.

||X_j||_2 is the L2 norm of input feature j of the weight's module over *all* calibration
tokens (every position of every batch). Forward hooks on the inputs of every linear-like
module (esa.model.linear_modules) add the per-feature sum of squares to an fp32 accumulator
(`act_sq_sum`), so data shards sum exactly and `finalize` takes the square root at the end.

Layout rules: nn.Linear [out, in] scales column j; GPT-2 Conv1D [in, out] scales row j;
fused qkv / gate_up projections are plain Linear/Conv1D; Mixtral fused experts use, for
expert e, only the tokens routed to e (hidden states for gate_up_proj, act(gate)*up for
down_proj); the router (``mlp.gate``) is a linear map and is scored too. Everything that is
not a linear weight (embeddings, norms, biases) is listed in ``unscored``. A tied lm_head
is scored under the embedding's parameter name, from the lm_head's inputs: the embedding
lookup has no input features, so its linear use is the only one that defines a score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from esa.core.errors import UserError
from esa.parallel.env import all_sum
from esa.parallel.fsdp import scaled_abs
from esa.parallel.split import LocalBatch, as_local
from esa.model.linear_modules import (
    Capture,
    LinearWeight,
    broadcast_inputs,
    capture_linear_io,
    eval_mode,
    find_linear_weights,
)
from esa.profile.metrics.base import Metric, MetricOptions, MetricResult, start_counts, start_sum
from esa.spec.weights import matches

__all__ = ["ActMag", "ACT_SQ_SUM", "forward_batches", "selected_linear_weights"]

ACT_SQ_SUM = "act_sq_sum"
_CHUNK_ROWS = 8192  # bounds the fp32 temporary when upcasting a bf16 activation block


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def forward_batches(model: nn.Module, batches: Iterable[torch.Tensor | LocalBatch],
                    on_batch: Callable[[int, LocalBatch], None] | None = None) -> int:
    """Run the model on every calibration batch (eval mode, no grad, no KV cache) and return
    the number of tokens seen (over every rank of a sharded job). `on_batch(i, part)` is called
    before batch i; a stand-in part (`part.real` False: this rank has no window in the batch, but
    every rank must run every forward) is run and must be ignored by the callbacks."""
    device = _input_device(model)
    tokens = 0
    with torch.no_grad(), eval_mode(model):
        for i, item in enumerate(batches):
            part = as_local(item if isinstance(item, LocalBatch) else torch.as_tensor(item))
            ids = part.ids if part.ids.ndim != 1 else part.ids.unsqueeze(0)
            if ids.ndim != 2 or ids.is_floating_point():
                raise UserError(f"calibration batch {i} must be integer token ids [B, T], "
                                f"got {tuple(ids.shape)} {ids.dtype}")
            part = part._replace(ids=ids)
            if on_batch is not None:
                on_batch(i, part)
            model(input_ids=ids.to(device), use_cache=False)
            tokens += ids.numel() if part.real else 0
    tokens = int(all_sum(torch.tensor([tokens], dtype=torch.int64)).item())
    if tokens == 0:
        raise UserError("no calibration tokens: activation metrics need data")
    return tokens


def selected_linear_weights(model: nn.Module, options: MetricOptions) -> list[LinearWeight]:
    """The linear-like weights of `model` whose names pass options.include / exclude."""
    return [w for w in find_linear_weights(model)
            if matches(w.param_name, options.include, options.exclude)]


def _add_sum_sq(acc: torch.Tensor, x: torch.Tensor) -> None:
    # Upcast block by block: squares of bf16 activations overflow/lose precision in bf16.
    for part in x.split(_CHUNK_ROWS):
        acc += part.to(device=acc.device, dtype=torch.float32).square().sum(dim=0)


def _unscored(model: nn.Module, scored: Iterable[str], options: MetricOptions) -> list[str]:
    done = set(scored)
    return [n for n, _ in model.named_parameters()
            if n not in done and matches(n, options.include, options.exclude)]


class ActMag(Metric):
    """|W_ij| * ||X_j||_2 over all calibration tokens (Wanda), for linear-like weights."""

    name = "act_mag"
    resumable = True
    needs_data = True

    def score(self, model: nn.Module, batches: Iterable[torch.Tensor],
              options: MetricOptions) -> MetricResult:
        """One forward pass per batch; returns scores, accumulators and the unscored list."""
        weights = selected_linear_weights(model, options)
        acc: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for w in weights:
            if w.param_name not in acc:
                like = torch.empty(w.accumulator_shape, dtype=torch.float32, device=w.param.device)
                acc[w.param_name] = start_sum(options, ACT_SQ_SUM, w.param_name, like)
            counts.setdefault(w.param_name, 0)
        counts = start_counts(options, counts)
        expert_tokens: dict[str, list[int]] = {
            w.param_name: [0] * int(w.num_experts) for w in weights if w.expert_axis is not None}
        state = {"real": True}

        def on_batch(_: int, part: LocalBatch) -> None:
            state["real"] = part.real

        def on_capture(c: Capture) -> None:
            if not state["real"]:  # a stand-in forward of a rank with no window in this batch
                return
            name = c.weight.param_name
            target = acc[name] if c.expert is None else acc[name][c.expert]
            _add_sum_sq(target, c.inputs)
            counts[name] += int(c.inputs.shape[0])
            if c.expert is not None:
                expert_tokens[name][c.expert] += int(c.inputs.shape[0])

        with capture_linear_io(weights, on_capture):
            n_tokens = forward_batches(model, batches, on_batch)

        accumulators = {ACT_SQ_SUM: acc}
        extras = {
            "tokens": n_tokens,
            # Which module's inputs scored a parameter when it is not the parameter's own
            # module (tied lm_head -> embedding name), so reports can say so.
            "scored_via": {w.param_name: w.module_name for w in weights
                           if not w.param_name.startswith(w.module_name + ".")},
            "expert_tokens": expert_tokens,
        }
        result = MetricResult({}, unscored=_unscored(model, acc, options), accumulators=accumulators,
                              counts=counts, extras=extras)
        if options.finalize:
            self.merge_ranks(result)
            result.scores = self.finalize(accumulators, counts, model)
        return result

    def merge_ranks(self, result: MetricResult) -> None:
        """A sharded job's per-rank sums of squares, token counts and expert counts, summed over
        the ranks (in place; a no-op for one rank)."""
        for name in sorted(result.accumulators[ACT_SQ_SUM]):
            all_sum(result.accumulators[ACT_SQ_SUM][name])
        names = sorted(result.counts)
        experts = result.extras["expert_tokens"]
        flat = [result.counts[n] for n in names] + [c for n in sorted(experts) for c in experts[n]]
        totals = iter(all_sum(torch.tensor(flat, dtype=torch.int64)).tolist())
        result.counts.update({n: next(totals) for n in names})
        for n in sorted(experts):
            experts[n] = [next(totals) for _ in experts[n]]

    def finalize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, int],
                 model: nn.Module, inplace: bool = False) -> dict[str, torch.Tensor]:
        """Scores from (summed) per-feature sums of squares: |W| * sqrt(act_sq_sum)."""
        if ACT_SQ_SUM not in accumulators:
            raise UserError(f"act_mag needs the '{ACT_SQ_SUM}' accumulator; "
                            f"got {sorted(accumulators)}")
        by_name = {w.param_name: w for w in find_linear_weights(model)}
        scores: dict[str, torch.Tensor] = {}
        for name, sq in accumulators[ACT_SQ_SUM].items():
            w = by_name.get(name)
            if w is None:
                raise UserError(f"act_mag accumulator for '{name}', which is not a linear "
                                f"weight of this model (wrong model for these shards?)")
            if tuple(sq.shape) != w.accumulator_shape:
                raise UserError(f"act_mag accumulator for '{name}' has shape "
                                f"{tuple(sq.shape)}, expected {w.accumulator_shape}")
            norm = sq.to(device=w.param.device, dtype=torch.float32).sqrt()
            # abs() allocates a new tensor, so the in-place multiply never touches the weight.
            scores[name] = scaled_abs(w.param, broadcast_inputs(w, norm))
        return scores
