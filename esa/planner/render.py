"""Plain-text rendering of a MemoryPlan for people (the JSON is MemoryPlan.to_dict())."""

from __future__ import annotations

from esa.planner.gpus import GIB
from esa.planner.memory import PARTS, MemoryPlan

_PART_HELP = {
    "weights": "parameters in the model dtype (sharded)",
    "accumulators": "fp32 sums (sharded); scores are built inside them",
    "scores": "fp32 score tensors (sharded)",
    "activations": "kept for backward / a block's forward working set",
    "logits": "logits, fp32 upcast, log-softmax and gradients",
    "gradients": "gradients alive at the peak",
    "double_backward": "create_graph backward kept for the HVP",
    "probes": "Rademacher probes and Hessian-vector products",
    "communication": "FSDP2 all-gather / reduce-scatter buffers, NCCL",
    "workspace": "cuBLAS, ranking/statistics and hook temporaries",
    "overhead": "CUDA context + allocator fragmentation margin",
}


def gib(nbytes: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{nbytes / GIB:.2f}"


def duration(seconds: float) -> str:
    """Seconds as a short human duration."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _per_gpu(batch: int, world: int) -> str:
    return f" ({-(-batch // world)} per GPU)" if world > 1 else ""


def format_plan(plan: MemoryPlan, layout_source: str) -> str:
    """A table a person reads: job, layout, per-GPU breakdown in GiB, fit, time estimate."""
    st = plan.settings
    lay = plan.layout
    lines = [
        f"model        {plan.model} ({plan.n_parameters / 1e9:.3f} B parameters)",
        f"job          {plan.metric}: seq_len {st['seq_len']}, batch {st['batch_size']}{_per_gpu(st['batch_size'], plan.layout.world)}, {st['dtype']}, "
        f"{st['attention']} attention" + (", activation checkpointing" if st["activation_checkpointing"] else ""),
        f"layout       {lay.nodes} node(s) x {lay.gpus_per_node} GPU(s) = {lay.world} ({layout_source})",
        f"peak stage   {plan.peak_stage}",
        "",
        f"  {'per GPU':<16}{'GiB':>9}",
    ]
    for part in PARTS:
        value = plan.per_gpu_bytes[part]
        if value:
            lines.append(f"  {part:<16}{gib(value):>9}   {_PART_HELP[part]}")
    lines.append(f"  {'total':<16}{gib(plan.total_bytes):>9}")
    if plan.gpu_memory_bytes is not None:
        verdict = "yes" if plan.fits else "NO"
        lines.append(f"  fits         {verdict} ({gib(plan.gpu_memory_bytes)} GiB per GPU)")
    if plan.time is not None:
        t = plan.time
        if t.flops == 0:
            lines.append("time         no forward passes (memory-bound, seconds)")
        else:
            lines.append(f"time         ~{duration(t.seconds)} for {t.tokens:,} tokens ({st['samples']} windows): "
                         f"{t.flops:.3g} FLOPs on {t.gpus} x {t.gpu} at MFU {t.mfu:.2f} "
                         f"(peak {t.peak_flops_per_gpu / 1e12:.0f} TFLOP/s per GPU); compute only")
    for note in plan.notes:
        lines.append(f"note         {note}")
    return "\n".join(lines)
