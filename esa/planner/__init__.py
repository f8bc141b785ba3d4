"""Torch-free memory and time planner for ESA jobs (runs on a login node).

`plan_job(config, metric, ...)` predicts the peak memory per GPU of one job, broken down into
named parts, and a time estimate from the FLOP count; `smallest_layout(...)` finds the fewest
GPUs (FSDP2 sharding over nodes x gpus_per_node) on which the job fits. Model configs are
plain `config.json` dictionaries (`load_config` reads bundled short names, local model
folders and hub ids from the local Hugging Face cache). Nothing here imports torch or
transformers; the formulas and how they were checked are described in docs/cluster.md and
docs/benchmarks.md.
"""

from esa.planner.configs import BUNDLED, bundled_config_dir, load_config
from esa.planner.gpus import GPU_PRESETS, GpuSpec, gpu_preset, parse_bytes
from esa.planner.memory import METRICS, Layout, MemoryPlan, plan_job, smallest_layout
from esa.planner.shape import ModelShape, model_shape

__all__ = [
    "BUNDLED", "GPU_PRESETS", "METRICS", "GpuSpec", "Layout", "MemoryPlan", "ModelShape",
    "bundled_config_dir", "gpu_preset", "load_config", "model_shape", "parse_bytes", "plan_job",
    "smallest_layout",
]
