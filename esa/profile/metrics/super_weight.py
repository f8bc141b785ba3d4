"""super_weight: the activation-spike detector of Yu et al. 2024, "The Super Weight in
Large Language Models".

A super weight sits in an MLP down projection: a large input activation in channel ``col``
times a large weight ``W[row, col]`` creates a massive output activation in residual channel
``row``. One forward pass over the calibration batches with hooks on every down projection
records, per layer (and per expert for fused MoE experts, over the tokens routed to it):

- the largest |input| over all tokens and its channel (``col``),
- the largest |output| over all tokens and its channel (``row``).

The candidate is the weight at [row, col] of that down projection, named in the parameter's
own indexing: ``[row, col]`` for nn.Linear, ``[col, row]`` for GPT-2's Conv1D ([in, out]),
``[expert, row, col]`` for stacked experts. Candidates go to ``extras['super_weights']``,
largest output spike first. As a ranking, down-projection tensors get the score
``|W_ij| * max_t |X_tj|``; every other parameter is unscored.

The detector sees what the intact model computes. A weight that matters only because a
partner cancels it (the planted pair of esa.model.planting) leaves no activation spike, so it is
invisible here by construction; gradient- and act_mag-based rankings still find it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from esa.core.errors import UserError
from esa.model.linear_modules import (
    Capture,
    LinearWeight,
    broadcast_inputs,
    capture_linear_io,
    find_linear_weights,
    is_down_projection,
    matrix_index,
)
from esa.parallel.env import all_gather_objects, all_max, world_size
from esa.parallel.fsdp import scaled_abs, value_at
from esa.parallel.split import LocalBatch
from esa.profile.metrics.activation import forward_batches
from esa.profile.metrics.base import Metric, MetricOptions, MetricResult
from esa.spec.weights import format_weight, layer_of, matches

__all__ = ["SuperWeight", "Spike"]


@dataclass
class Spike:
    """The largest-|value| activation seen so far: signed value, channel and token."""

    value: float = 0.0
    channel: int = -1
    token: tuple[int, int, int] | None = None  # (batch number, sequence in batch, position)

    def offer(self, block: torch.Tensor, token_of: Any) -> torch.Tensor:
        """Update from a [N, C] block; returns the per-channel max |value| (fp32, [C])."""
        col_max, col_arg = block.abs().max(dim=0)
        col_max = col_max.float()
        best, ch = col_max.max(dim=0)
        if best.item() > abs(self.value):
            ch_i = int(ch)
            row = int(col_arg[ch_i])
            self.value = float(block[row, ch_i])
            self.channel = ch_i
            self.token = token_of(row)
        return col_max


def _key_order(key: tuple[str, int | None]) -> tuple[str, int]:
    return key[0], -1 if key[1] is None else key[1]


def _better(a: Spike, b: Spike) -> Spike:
    """The spike one process scanning every token in order would keep."""
    if b.token is None:
        return a
    if a.token is None or abs(b.value) > abs(a.value) or (abs(b.value) == abs(a.value) and b.token < a.token):
        return b
    return a


@dataclass
class _Record:
    weight: LinearWeight
    expert: int | None
    channel_max: torch.Tensor  # max over tokens of |input feature j|, fp32 [in]
    inp: Spike = field(default_factory=Spike)
    out: Spike = field(default_factory=Spike)


class _SpikeTracker:
    """Collects per-(down projection, expert) spike records during the forward passes."""

    def __init__(self, weights: list[LinearWeight]) -> None:
        self.weights = weights
        self.records: dict[tuple[str, int | None], _Record] = {}
        self.batch = 0
        self.seq_len = 1
        self.first = 0  # position of this rank's first window in the global batch
        self.real = True

    def start_batch(self, index: int, part: LocalBatch) -> None:
        self.batch, self.seq_len = index, int(part.ids.shape[-1])
        self.first, self.real = part.first, part.real

    def _token_of(self, c: Capture) -> Any:
        def token_of(row: int) -> tuple[int, int, int]:
            flat = row if c.token_index is None else int(c.token_index[row])
            seq, pos = divmod(flat, self.seq_len)
            return (self.batch, self.first + seq, pos)
        return token_of

    def _record(self, weight: LinearWeight, expert: int | None) -> _Record:
        key = (weight.param_name, expert)
        if key not in self.records:
            zeros = torch.zeros(weight.in_features, dtype=torch.float32, device=weight.param.device)
            self.records[key] = _Record(weight, expert, zeros)
        return self.records[key]

    def update(self, c: Capture) -> None:
        if not self.real:  # a stand-in forward of a rank with no window in this batch
            return
        rec = self._record(c.weight, c.expert)
        token_of = self._token_of(c)
        col_max = rec.inp.offer(c.inputs, token_of)
        torch.maximum(rec.channel_max, col_max.to(rec.channel_max.device), out=rec.channel_max)
        assert c.outputs is not None  # the hooks were installed with want_outputs=True
        rec.out.offer(c.outputs, token_of)

    def merge_ranks(self) -> None:
        """A sharded job's spikes over every rank's tokens: channel maxima by max, each spike the
        largest |value| (ties: the earliest token, as one process scanning in order finds it)."""
        if world_size() == 1:
            return
        by_name = {w.param_name: w for w in self.weights}
        keys = sorted({k for ks in all_gather_objects(list(self.records)) for k in ks}, key=_key_order)
        for name, expert in keys:
            all_max(self._record(by_name[name], expert).channel_max)
        mine = {k: (r.inp, r.out) for k, r in self.records.items()}
        for theirs in all_gather_objects(mine):
            for key, (inp, out) in theirs.items():
                rec = self.records[key]
                rec.inp, rec.out = _better(rec.inp, inp), _better(rec.out, out)

    def candidates(self) -> list[dict[str, Any]]:
        """One candidate per record, largest |output spike| first (ties: |input spike|)."""
        found = []
        # One order on every rank: value_at is a collective in a sharded job.
        for name, expert in sorted(self.records, key=_key_order):
            rec = self.records[(name, expert)]
            if rec.inp.channel < 0 or rec.out.channel < 0:
                continue
            w = rec.weight
            index = matrix_index(w, rec.out.channel, rec.inp.channel, expert)
            found.append({
                "layer": layer_of(name),
                "param": name,
                "expert": expert,
                "row": rec.out.channel,
                "col": rec.inp.channel,
                "index": list(index),
                "weight": format_weight(name, index),
                "input_spike": rec.inp.value,
                "output_spike": rec.out.value,
                "input_token": list(rec.inp.token) if rec.inp.token else None,
                "output_token": list(rec.out.token) if rec.out.token else None,
                "weight_value": value_at(w.param, index),
            })
        found.sort(key=lambda d: (-abs(d["output_spike"]), -abs(d["input_spike"])))
        for rank, d in enumerate(found):
            d["rank"] = rank
        return found

    def channel_max(self, w: LinearWeight) -> torch.Tensor:
        """max_t |X_tj| per input feature, [in] or [E, in] (zeros where nothing was seen)."""
        if w.expert_axis is None:
            rec = self.records.get((w.param_name, None))
            if rec is None:
                return torch.zeros(w.in_features, device=w.param.device)
            return rec.channel_max
        rows = []
        for e in range(int(w.num_experts)):  # type: ignore[arg-type]
            rec = self.records.get((w.param_name, e))
            rows.append(rec.channel_max if rec is not None
                        else torch.zeros(w.in_features, device=w.param.device))
        return torch.stack(rows)


class SuperWeight(Metric):
    """Activation-spike super-weight detector (Yu et al. 2024) plus |W_ij| * max_t |X_tj|."""

    name = "super_weight"
    needs_data = True

    def score(self, model: nn.Module, batches: Iterable[torch.Tensor],
              options: MetricOptions) -> MetricResult:
        """One forward pass per batch; candidates in extras['super_weights']."""
        downs = [w for w in find_linear_weights(model)
                 if is_down_projection(w) and matches(w.param_name, options.include,
                                                      options.exclude)]
        if not downs:
            raise UserError(
                "super_weight found no MLP down projection (down_proj, dense_4h_to_h, "
                "mlp.c_proj, fc2, w2 or fused experts) in this model"
                + (" that passes --include/--exclude" if options.include or options.exclude
                   else ""))
        tracker = _SpikeTracker(downs)
        with capture_linear_io(downs, tracker.update, want_outputs=True):
            n_tokens = forward_batches(model, batches, on_batch=tracker.start_batch)
        tracker.merge_ranks()

        scores: dict[str, torch.Tensor] = {}
        for w in downs:
            scale = broadcast_inputs(w, tracker.channel_max(w).to(w.param.device))
            scores[w.param_name] = scaled_abs(w.param, scale)
        unscored = [n for n, _ in model.named_parameters()
                    if n not in scores and matches(n, options.include, options.exclude)]
        extras = {"super_weights": tracker.candidates(), "tokens": n_tokens}
        return MetricResult(scores=scores, unscored=unscored, extras=extras)

    def finalize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, int],
                 model: nn.Module) -> dict[str, torch.Tensor]:
        """No reduce over data shards: maxima over tokens do not add across them."""
        raise UserError("super_weight keeps maxima over tokens, which do not add across data "
                        "shards; run it without --shard (it needs a single forward pass)")
