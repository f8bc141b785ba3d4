"""The planner's result types: a GPU layout and the memory plan of one job on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from esa.planner.flops import TimeEstimate

# Named parts of the per-GPU peak (see esa.planner.stages for what each holds).
PARTS = ("weights", "accumulators", "scores", "activations", "logits", "gradients", "double_backward", "probes",
         "communication", "workspace", "overhead")


@dataclass(frozen=True)
class Layout:
    """GPUs a job runs on: FSDP2 shards weights and fp32 sums over nodes x gpus_per_node."""

    nodes: int = 1
    gpus_per_node: int = 1

    @property
    def world(self) -> int:
        """Total number of GPUs."""
        return self.nodes * self.gpus_per_node

    def to_dict(self) -> dict[str, int]:
        """{'nodes', 'gpus_per_node'}."""
        return {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node}


@dataclass
class MemoryPlan:
    """The planner's answer for one job on one layout."""

    model: str
    n_parameters: int
    metric: str
    settings: dict[str, Any]
    layout: Layout
    per_gpu_bytes: dict[str, int]  # PARTS plus 'total', at the peak stage
    peak_stage: str
    stages: dict[str, int]  # total bytes per GPU of every stage
    gpu_memory_bytes: int | None = None
    time: TimeEstimate | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Predicted peak bytes per GPU."""
        return self.per_gpu_bytes["total"]

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits the GPU memory (None when no memory was given)."""
        return None if self.gpu_memory_bytes is None else self.total_bytes <= self.gpu_memory_bytes

    def to_dict(self) -> dict[str, Any]:
        """The JSON of `esa plan-memory --json`."""
        return {"model": self.model, "n_parameters": self.n_parameters, "metric": self.metric,
                "settings": dict(self.settings), "layout": self.layout.to_dict(),
                "world_size": self.layout.world, "per_gpu_bytes": dict(self.per_gpu_bytes),
                "peak_stage": self.peak_stage, "stages": dict(self.stages),
                "gpu_memory_bytes": self.gpu_memory_bytes, "fits": self.fits,
                "time": None if self.time is None else self.time.to_dict(), "notes": list(self.notes)}
