"""What one manifest needs: the planner's answer for a typed manifest, and its "auto" resources filled.

Used by `esa profile --dry-run`, `make submit DRY_RUN=1` (one line per job) and plan expansion
(`gpus`/`mem`/`time = "auto"`). Torch-free, like the rest of the planner.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from esa.core.errors import UserError
from esa.planner.gpus import parse_bytes
from esa.planner.memory import DTYPE_BYTES, plan_job, smallest_layout
from esa.planner.plan import MemoryPlan
from esa.spec.manifest import Manifest, Resources

__all__ = ["manifest_job", "plan_manifest", "host_memory_bytes", "fill_auto_resources", "AUTO_TIME_FACTOR"]

# "auto" time: this many times the estimate at the planner's MFU, plus a fixed allowance for loading
# the model and data and writing results; never under 30 minutes.
AUTO_TIME_FACTOR = 2.0
AUTO_TIME_FIXED_MIN = 15
AUTO_TIME_MIN_MIN = 30
# "auto" host memory: rank 0 of a node reads the full weights before sharding them; every rank also
# needs its process, CUDA context, tokenizer and data.
HOST_PER_RANK_BYTES = 8 * 1024**3
# Candidates planned per candidates_from file of an ablation job that takes every weight a file lists.
ABLATION_FILE_CANDIDATES = 100


def manifest_job(manifest: Manifest) -> dict[str, Any]:
    """plan_job's arguments for a manifest: the job (metric, baseline or perturb) and its settings."""
    model, data = manifest.model, manifest.data
    metric = {1: "baseline", 3: "perturb"}.get(manifest.PHASE) or manifest.metric.name  # type: ignore[attr-defined]
    job: dict[str, Any] = {"config": model.id, "metric": metric, "seq_len": data.seq_len, "batch_size": data.batch_size,
                           "dtype": model.dtype, "attention": model.attention, "samples": data.max_samples,
                           "device": "cpu" if model.device == "cpu" else "cuda", "name": model.id}
    if manifest.PHASE == 2:
        spec = manifest.metric  # type: ignore[attr-defined]
        job["probes"] = spec.probes
        if spec.name == "ablation":  # at most this many candidates (a file may list fewer; n_candidates null:
            # every weight a file lists, unknown before the file exists: planned as ABLATION_FILE_CANDIDATES)
            per_file = spec.n_candidates or ABLATION_FILE_CANDIDATES
            job["coords"] = max(1, len(spec.candidates) + per_file * len(spec.candidates_from))
        job["activation_checkpointing"] = manifest.parallel.activation_checkpointing
    if manifest.PHASE == 3:
        controls = manifest.controls  # type: ignore[attr-defined]
        job["control_evals"] = sum(1 if n == "bottom_k" else controls.repeats for n in controls.names)
    return job


def _config_and_job(manifest: Manifest) -> tuple[dict[str, Any], dict[str, Any]]:
    from esa.planner.configs import load_config
    from esa.planner.shape import model_shape

    job = manifest_job(manifest)
    config = load_config(manifest.model.id, manifest.model.revision)
    job["config"] = config
    if job["seq_len"] is None:  # the runner's default: min(2048, the model's context)
        job["seq_len"] = min(2048, int(model_shape(config).max_positions or 2048))
    return config, job


def plan_manifest(manifest: Manifest, *, gpu_memory: str | int | None = None, smallest: bool = False,
                  max_gpus_per_node: int = 8, gpu: str | None = None) -> MemoryPlan:
    """The planner's answer for a manifest: on its own layout (`manifest.parallel`), or with `smallest`
    on the smallest layout that fits `gpu_memory` (default: the manifest's resources.gpu_memory)."""
    _, job = _config_and_job(manifest)
    resources = manifest.resources or Resources()
    memory = gpu_memory if gpu_memory is not None else resources.gpu_memory
    memory_bytes = parse_bytes(memory) if memory is not None else None
    if gpu is not None:
        job["gpu"] = gpu
    elif job["device"] == "cuda":
        job["gpu"] = "a100-80g"  # the time estimate's GPU when the site does not say
    if smallest:
        if memory_bytes is None:
            raise UserError('planning the smallest layout needs the GPU memory: resources.gpu_memory = "80G"')
        return smallest_layout(job.pop("config"), job.pop("metric"), gpu_memory_bytes=memory_bytes,
                               max_gpus_per_node=max_gpus_per_node, **job)
    layout = manifest.parallel
    return plan_job(job.pop("config"), job.pop("metric"), nodes=layout.nodes, gpus_per_node=layout.gpus_per_node,
                    gpu_memory_bytes=memory_bytes, **job)


def host_memory_bytes(plan: MemoryPlan) -> int:
    """Memory per node for a job: the full weights (rank 0 reads them before sharding, an unsharded job
    before moving them to its GPU) plus HOST_PER_RANK_BYTES for every rank on the node."""
    weights = plan.n_parameters * DTYPE_BYTES[plan.settings["dtype"]]
    return int(weights * 1.1) + plan.layout.gpus_per_node * HOST_PER_RANK_BYTES


def _slurm_time(seconds: float) -> str:
    minutes = max(AUTO_TIME_MIN_MIN, math.ceil(AUTO_TIME_FACTOR * seconds / 60) + AUTO_TIME_FIXED_MIN)
    days, rest = divmod(minutes, 24 * 60)
    text = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{text}" if days else text


def fill_auto_resources(manifest: Manifest) -> tuple[Manifest, MemoryPlan | None]:
    """The manifest with its "auto" resources (and, for gpus = "auto", its parallel layout) filled by
    the planner; unchanged (and None) when nothing is "auto". One-line UserError when the planner
    cannot size the job (no config.json for the model, no gpu_memory, nothing fits)."""
    resources = manifest.resources
    if resources is None or not resources.auto:
        return manifest, None
    where = f"job {manifest.job_id()} ({manifest.model.id})"
    if resources.gpus == "auto" and not resources.gpu_memory:
        raise UserError(f'{where}: gpus = "auto" needs the GPU size: resources.gpu_memory = "80G" (or "40G", ...)')
    try:
        plan = plan_manifest(manifest, smallest=resources.gpus == "auto", max_gpus_per_node=resources.node_gpus)
    except UserError as exc:
        raise UserError(f'{where}: resources "auto" needs the planner, which says: {exc}') from None
    if resources.gpus == "auto" and not plan.fits:
        raise UserError(f"{where}: the planner finds no layout that fits {resources.gpu_memory} GPUs "
                        f"({'; '.join(plan.notes[-1:])}); lower batch_size or seq_len, or set gpus and parallel by hand")
    changes: dict[str, Any] = {}
    parallel = manifest.parallel
    if resources.gpus == "auto":
        changes["gpus"] = 1
        parallel = dataclasses.replace(parallel, nodes=plan.layout.nodes, gpus_per_node=plan.layout.gpus_per_node)
    if resources.mem == "auto":
        changes["mem"] = f"{math.ceil(host_memory_bytes(plan) / 1024**3)}G"
    if resources.time == "auto":
        if plan.time is None:
            raise UserError(f'{where}: time = "auto" estimates GPU time; a {manifest.model.device} job needs '
                            "resources.time set by hand")
        changes["time"] = _slurm_time(plan.time.seconds)
    filled = dataclasses.replace(manifest, resources=dataclasses.replace(resources, **changes), parallel=parallel)
    return filled, plan
