"""Plan one ESA job: the peak stage per GPU, whether it fits, and the smallest layout that does.

`plan_job` evaluates every stage of the job (esa.planner.stages) and reports the largest as
the peak, broken down into named parts (esa.planner.plan.PARTS); `smallest_layout` tries 1, 2,
4, 8 GPUs on one node, then whole nodes, until the peak fits.
"""

from __future__ import annotations

import math
from typing import Any

from esa.core.errors import UserError
from esa.planner.configs import load_config
from esa.planner.flops import estimate_time
from esa.planner.gpus import GpuSpec, gpu_preset
from esa.planner.plan import PARTS, Layout, MemoryPlan
from esa.planner.shape import ModelShape, model_shape
from esa.planner.stages import CUDA_CONTEXT, FRAGMENTATION, JobStages

__all__ = ["METRICS", "PARTS", "Layout", "MemoryPlan", "canonical_metric", "candidate_layouts", "plan_job",
           "smallest_layout"]

METRICS = ("magnitude", "grad_x_weight", "grad_squared", "hessian_diag", "hutchinson_diag", "act_mag",
           "super_weight", "obd", "fisher_obd", "ablation", "baseline", "perturb")
ALIASES = {"activation_magnitude": "act_mag"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CURVATURE = ("hutchinson_diag", "hessian_diag", "obd")
# Metrics planned as another whose memory and passes they share: obd keeps hutchinson_diag's sums (and
# scales them by ½·w² in place), fisher_obd grad_squared's.
PLANNED_AS = {"obd": "hutchinson_diag", "fisher_obd": "grad_squared"}
# Metrics esa refuses on a sharded model (esa.profile.metrics: shardable = False): one GPU per job.
UNSHARDABLE = (*CURVATURE, "fisher_obd", "ablation")
DEFAULT_SAMPLES = 128  # windows per job when none are given (time estimate, batch count)


def canonical_metric(metric: str) -> str:
    """Resolve aliases; UserError lists the valid names."""
    name = ALIASES.get(metric, metric)
    if name not in METRICS:
        raise UserError(f"unknown metric '{metric}'; valid: {', '.join(METRICS)} (alias activation_magnitude)")
    return name


def _complete(parts: dict[str, int], device: str) -> dict[str, int]:
    full = {k: int(parts.get(k, 0)) for k in PARTS}
    if device == "cuda":
        tensors = sum(v for k, v in full.items() if k != "overhead")
        full["overhead"] = CUDA_CONTEXT + int(FRAGMENTATION * tensors)
    full["total"] = sum(full[k] for k in PARTS)
    return full


def _notes(s: ModelShape, metric: str, attention: str, requested: str, T: int, checkpointing: bool,
           world: int) -> list[str]:
    notes = []
    if metric in CURVATURE and requested != "eager":
        notes.append("second-order metrics switch to eager attention (fused kernels have no double backward)")
    if metric in CURVATURE and checkpointing:
        notes.append("activation checkpointing does not shrink the double-backward graph; planned without it")
    if metric == "hessian_diag":
        notes.append("hessian_diag planned for one whole tensor (the largest); vmap'd one-hot chunks multiply "
                     "the backward's temporaries by the chunk size, so small tensors can need more")
    if s.max_positions and T > int(s.max_positions):
        notes.append(f"seq_len {T} exceeds the model's context ({s.max_positions}); esa refuses it")
    if metric in PLANNED_AS:
        notes.append(f"{metric} planned as {PLANNED_AS[metric]} (the same sums, scaled by ½·w² in place)"
                     + ("; exact on candidates: as hessian_diag" if metric == "obd" else
                        "; --per-sample runs one backward per window: time x batch_size" if metric == "fisher_obd"
                        else ""))
    if metric == "ablation":
        notes.append("ablation: forward only, plus the output of one block for every calibration window; time "
                     "= one forward of every window per candidate (an upper bound: a candidate in block s skips "
                     "the s blocks before it)")
    if world > 1 and metric in CURVATURE:
        notes.append(f"esa refuses {metric} on a sharded model (FSDP2 has no double backward): run it on one "
                     "GPU per job and split the windows over jobs (shard = 'i/n', then esa reduce)")
    elif world > 1 and metric in UNSHARDABLE:
        notes.append(f"esa refuses {metric} on a sharded model: run it on one GPU per job and split the "
                     + ("candidates" if metric == "ablation" else "windows") + " over jobs (shard = 'i/n', "
                     "then esa reduce)")
    elif world > 1:
        notes.append("multi-GPU layouts assume FSDP2 sharding of weights and fp32 sums "
                     "(embedding, lm_head and each block wrapped separately)")
    return notes


def plan_job(config: str | dict[str, Any], metric: str, *, seq_len: int, batch_size: int, dtype: str = "bf16",
             attention: str = "sdpa", nodes: int = 1, gpus_per_node: int = 1,
             activation_checkpointing: bool = False, gpu_memory_bytes: int | None = None,
             gpu: str | GpuSpec | None = None, mfu: float = 0.35, samples: int | None = None, probes: int = 1,
             control_evals: int = 20, coords: int = 1, device: str = "cuda", name: str | None = None) -> MemoryPlan:
    """Predict the peak memory per GPU (and time) of one ESA job.

    config: a config.json dict, or anything `load_config` accepts. metric: a phase-2 metric,
    'baseline' (phase 1) or 'perturb' (phase 3). batch_size is the job's batch (a manifest's
    data.batch_size): a sharded job splits it over its GPUs, so each holds ceil(batch_size / GPUs)
    windows at a time. gpu: a preset name or
    GpuSpec for the time estimate (and the memory, unless gpu_memory_bytes is given).
    samples: calibration/evaluation windows (time estimate, number of batches; default 128). coords: the
    exact coordinates of hessian_diag, or the candidates of ablation (time estimate). device='cpu'
    drops the GPU-only parts (used to validate against CPU measurements).
    """
    metric = canonical_metric(metric)
    if dtype == "auto":
        dtype = "bf16"
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of bf16, fp16, fp32")
    requested = attention
    if attention in ("auto", "flash_attention_2"):
        attention = "sdpa"
    if attention not in ("sdpa", "eager"):
        raise UserError(f"unknown attention '{requested}'; choose one of eager, sdpa")
    if metric in CURVATURE:
        attention = "eager"
    for label, value in (("seq_len", seq_len), ("batch_size", batch_size), ("nodes", nodes),
                         ("gpus_per_node", gpus_per_node), ("probes", probes)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{label} must be a positive integer, got {value!r}")
    if seq_len < 2:
        raise UserError("seq_len must be at least 2 (one token is predicted from the one before)")
    if device not in ("cuda", "cpu"):
        raise UserError(f"device must be cuda or cpu, got {device!r}")
    label = name or (config if isinstance(config, str) else str(config.get("_name_or_path") or config.get("model_type")))
    s = model_shape(load_config(config))
    layout = Layout(nodes, gpus_per_node)
    job = JobStages(s, PLANNED_AS.get(metric, metric), -(-batch_size // layout.world), seq_len, DTYPE_BYTES[dtype],
                    attention, layout.world, activation_checkpointing and metric not in CURVATURE, device, probes,
               math.ceil((samples or DEFAULT_SAMPLES) / batch_size))
    stages = {k: _complete(v, device) for k, v in job.stages().items()}
    peak = max(stages, key=lambda k: stages[k]["total"])
    spec = gpu_preset(gpu) if isinstance(gpu, str) else gpu
    if gpu_memory_bytes is None and spec is not None:
        gpu_memory_bytes = spec.memory_bytes
    time = None
    if spec is not None:
        time = estimate_time(s, PLANNED_AS.get(metric, metric), seq_len=seq_len, samples=samples or DEFAULT_SAMPLES,
                             attention=attention, gpus=layout.world, peak_flops=spec.peak_flops(dtype), mfu=mfu,
                             gpu=spec.name, probes=probes, control_evals=control_evals, coords=coords)
    settings = {"seq_len": seq_len, "batch_size": batch_size, "dtype": dtype, "attention": attention,
                "activation_checkpointing": bool(activation_checkpointing), "probes": probes, "device": device,
                "samples": samples or DEFAULT_SAMPLES}
    return MemoryPlan(model=label, n_parameters=s.n_parameters(), metric=metric, settings=settings, layout=layout,
                      per_gpu_bytes=stages[peak], peak_stage=peak, stages={k: v["total"] for k, v in stages.items()},
                      gpu_memory_bytes=gpu_memory_bytes, time=time,
                      notes=_notes(s, metric, attention, requested, seq_len, activation_checkpointing, layout.world))


def candidate_layouts(max_gpus_per_node: int = 8, max_nodes: int = 64) -> list[Layout]:
    """Layouts in the order they are tried: 1, 2, 4, 8 GPUs on one node (up to
    max_gpus_per_node), then 2, 3, ... full nodes."""
    if max_gpus_per_node < 1 or max_nodes < 1:
        raise UserError("gpus_per_node and max_nodes must be at least 1")
    single = [g for g in (1, 2, 4, 8, 16) if g < max_gpus_per_node] + [max_gpus_per_node]
    out = [Layout(1, g) for g in single]
    out += [Layout(k, max_gpus_per_node) for k in range(2, max_nodes + 1)]
    return out


def smallest_layout(config: str | dict[str, Any], metric: str, *, gpu_memory_bytes: int,
                    max_gpus_per_node: int = 8, max_nodes: int = 64, **kwargs: Any) -> MemoryPlan:
    """The plan on the first layout of `candidate_layouts` whose peak fits `gpu_memory_bytes`;
    when none fits, the plan on the largest layout tried (its `fits` is False). Other keyword
    arguments go to `plan_job`."""
    kwargs.pop("nodes", None)
    kwargs.pop("gpus_per_node", None)
    cfg = load_config(config) if isinstance(config, str) else config
    kwargs.setdefault("name", config if isinstance(config, str) else None)
    plan = None
    # Curvature metrics, fisher_obd and ablation cannot be sharded: one GPU or nothing.
    layouts = [Layout(1, 1)] if canonical_metric(metric) in UNSHARDABLE else candidate_layouts(max_gpus_per_node,
                                                                                                max_nodes)
    for layout in layouts:
        plan = plan_job(cfg, metric, nodes=layout.nodes, gpus_per_node=layout.gpus_per_node,
                        gpu_memory_bytes=gpu_memory_bytes, **kwargs)
        if plan.fits:
            return plan
    assert plan is not None
    plan.notes.append("does not fit on one GPU, and cannot be sharded" if len(layouts) == 1 else
                      f"does not fit on up to {max_nodes} nodes x {max_gpus_per_node} GPUs")
    return plan
