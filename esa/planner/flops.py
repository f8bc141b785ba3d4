"""FLOP counts and a time estimate at a stated model-FLOPs utilisation (MFU).

Forward FLOPs per token = 2 x (weights each token is multiplied with: block projections, the
top-k experts and router for MoE, the lm_head) + attention scores and values, 2 x layers x T x
(heads x head_dim) with a causal kernel (sdpa) or twice that when eager attention computes the
whole T x T matrix. A backward pass costs about 2 forwards; a Hessian-vector product by double
backward about 4 (it differentiates forward + backward again).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from esa.planner.shape import ModelShape

# Forward-pass equivalents of one calibration/evaluation batch, per metric.
PASSES = {"magnitude": 0.0, "baseline": 1.0, "act_mag": 1.0, "super_weight": 1.0,
          "grad_x_weight": 3.0, "grad_squared": 3.0}
HVP_PASSES = 4.0


def forward_flops_per_token(s: ModelShape, seq_len: int, attention: str) -> float:
    """FLOPs of one forward pass per token at context `seq_len`."""
    attn = 2.0 * s.layers * seq_len * s.q_dim * (2.0 if attention == "eager" else 1.0)
    return 2.0 * s.matmul_params_per_token() + attn


def passes(metric: str, probes: int = 1, control_evals: int = 20, coords: int = 1) -> float:
    """Forward-pass equivalents per batch: perturb evaluates the baseline, the perturbation and
    each control draw; hutchinson_diag = forward + backward + probes HVPs; hessian_diag one
    HVP per exact coordinate; ablation the unperturbed forward and one forward per candidate (`coords`)."""
    if metric == "perturb":
        return 2.0 + control_evals
    if metric == "ablation":
        return 1.0 + coords
    if metric == "hutchinson_diag":
        return 3.0 + HVP_PASSES * probes
    if metric == "hessian_diag":
        return 3.0 + HVP_PASSES * coords
    return PASSES[metric]


@dataclass(frozen=True)
class TimeEstimate:
    """Compute time of one job at a stated MFU (data loading, model loading and writing
    results are not included)."""

    flops: float
    tokens: int
    seconds: float
    mfu: float
    peak_flops_per_gpu: float
    gpus: int
    gpu: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def estimate_time(s: ModelShape, metric: str, *, seq_len: int, samples: int, attention: str, gpus: int,
                  peak_flops: float, mfu: float, gpu: str, probes: int = 1, control_evals: int = 20,
                  coords: int = 1) -> TimeEstimate:
    """Seconds for `samples` windows of `seq_len` tokens spread over `gpus` GPUs."""
    tokens = samples * seq_len
    flops = forward_flops_per_token(s, seq_len, attention) * tokens * passes(metric, probes, control_evals, coords)
    seconds = flops / (gpus * peak_flops * mfu) if flops else 0.0
    return TimeEstimate(flops=flops, tokens=tokens, seconds=seconds, mfu=mfu, peak_flops_per_gpu=peak_flops,
                        gpus=gpus, gpu=gpu)
