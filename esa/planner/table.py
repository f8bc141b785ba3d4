"""`python -m esa.planner.table`: the planner's table for every bundled model x job.

For each bundled seed model and each job (the seven metrics of the runbook, baseline, perturb; see
TABLE_JOBS) it prints the single-GPU peak and the smallest layout on 40 GB and 80 GB GPUs (a100-40g, a100-80g presets),
as markdown; docs/cluster.md holds its output. Job settings default to the runbook plans
(manifests/phase{1,2,3}.toml): phases 1 and 3 evaluate 200 windows of 2048 tokens (the context
if shorter) in batches of 4, phase 3 with 21 control evaluations (random_k x 20 + bottom_k);
phase 2 scores 200 windows of 512 tokens one at a time (hutchinson_diag: 120, one probe).
"""

from __future__ import annotations

import argparse
from typing import Any

from esa.planner.configs import BUNDLED, load_config
from esa.planner.gpus import gpu_preset
from esa.planner.memory import METRICS, PLANNED_AS, MemoryPlan, plan_job, smallest_layout
from esa.planner.render import duration, gib
from esa.planner.shape import model_shape


# The jobs of the table: obd and fisher_obd are planned as hutchinson_diag and grad_squared (their rows
# would repeat those), ablation by its number of candidates (a property of the job, not of the model).
TABLE_JOBS = tuple(m for m in METRICS if m not in PLANNED_AS and m != "ablation")


def _layout(plan: MemoryPlan) -> str:
    lay = plan.layout
    text = f"{lay.nodes}x{lay.gpus_per_node}"
    return text if plan.fits else f"> {text} (no fit)"


def job_settings(metric: str, context: int, seq_len: int | None = None) -> dict[str, int]:
    """The runbook's seq_len, batch size, windows and control evaluations of a job."""
    if metric in ("baseline", "perturb"):
        seq, batch, samples = 2048, 4, 200
    else:
        seq, batch, samples = 512, 1, 120 if metric == "hutchinson_diag" else 200
    seq = min(seq_len or seq, context)
    return {"seq_len": seq, "batch_size": batch, "samples": samples, "control_evals": 21}


def markdown_table(*, dtype: str = "bf16", seq_len: int | None = None,
                   gpus: tuple[str, str] = ("a100-40g", "a100-80g"), gpus_per_node: int = 8) -> str:
    """One row per bundled model and job, with the runbook's settings (`job_settings`; one
    seq_len for every job when given), `dtype`, sdpa attention (eager for the curvature
    metrics)."""
    specs = [gpu_preset(g) for g in gpus]
    head = ["model", "job", "seq x batch", "1 GPU peak GiB"]
    for spec in specs:
        head += [f"{spec.name}: nodes x GPUs", "GiB/GPU", "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * 2 + " ---: |" * (len(head) - 2)]
    for name in BUNDLED:
        cfg = load_config(name)
        context = int(model_shape(cfg).max_positions or 2048)
        for metric in TABLE_JOBS:
            kw: dict[str, Any] = dict(job_settings(metric, context, seq_len), dtype=dtype, attention="sdpa")
            single = plan_job(cfg, metric, **kw)
            row = [name, metric, f"{kw['seq_len']} x {kw['batch_size']}", gib(single.total_bytes)]
            for spec in specs:
                plan = smallest_layout(cfg, metric, gpu_memory_bytes=spec.memory_bytes, max_gpus_per_node=gpus_per_node,
                                       gpu=spec, **kw)
                t = plan.time.seconds if plan.time is not None else 0.0
                row += [_layout(plan), gib(plan.total_bytes), duration(t) if t and plan.fits else "-"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    """Print the table (options: --dtype, --seq-len, --gpus-per-node)."""
    ap = argparse.ArgumentParser(prog="python -m esa.planner.table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--seq-len", type=int, default=None, help="one seq_len for every job (default: the runbook's)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    args = ap.parse_args()
    print(markdown_table(dtype=args.dtype, seq_len=args.seq_len, gpus_per_node=args.gpus_per_node))


if __name__ == "__main__":
    main()
