"""`esa plan-memory`: predict a job's peak GPU memory and time without loading the model.

Torch-free: it reads the model's config.json (bundled name, local folder or the local Hugging
Face cache) and the manifest JSON, and runs esa.planner, so it works on a login node.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from esa.cli.options import HELP_FORMATTER, positive_int

_METRICS = ("magnitude", "grad_x_weight", "grad_squared", "hessian_diag", "hutchinson_diag", "act_mag",
            "activation_magnitude", "super_weight", "obd", "fisher_obd", "ablation", "baseline", "perturb")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("plan-memory", help="predict peak GPU memory, the GPUs needed and the time of a job",
                       formatter_class=HELP_FORMATTER,
                       description="Predict a job's peak memory per GPU (broken down into parts), whether it "
                       "fits, the smallest FSDP2 layout that does (1, 2, 4, 8 GPUs per node, then nodes) and a "
                       "compute-time estimate. Reads a manifest JSON or the flags; flags override the manifest. "
                       "Never imports torch.")
    p.add_argument("manifest", nargs="?", default=None, help="a job manifest JSON (model, data, metric, phase)")
    p.add_argument("--model", default=None,
                   help="bundled name (llama-3.1-8b, mistral-7b, phi-3-mini-4k, mixtral-8x7b, pythia-1.4b, gpt2), "
                        "a local model folder, or a hub id in the local Hugging Face cache")
    p.add_argument("--revision", default=None, help="hub revision of a cached model")
    p.add_argument("--metric", default=None, metavar="NAME",
                   help=f"one of {', '.join(_METRICS)} (baseline = phase 1, perturb = phase 3)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per window; default min(2048, context)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="the job's batch (data.batch_size): windows per step, split over the GPUs of a sharded "
                        "layout (default 1 for metrics, 4 for baseline/perturb)")
    p.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp16", "fp32"], help="model dtype (default bf16)")
    p.add_argument("--attention", default=None, choices=["auto", "eager", "sdpa", "flash_attention_2"],
                   help="attention kernel (default sdpa; second-order metrics use eager)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="plan with activation checkpointing of the decoder blocks (first-order metrics)")
    p.add_argument("--gpu", default=None, help="GPU preset: a100-40g, a100-80g, h100-80g, l40s, h200 (default a100-80g)")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="memory per GPU, e.g. 80G or 40960M (binary units); overrides the preset's")
    p.add_argument("--gpus", type=positive_int, default=None,
                   help="force this many GPUs (instead of searching the smallest layout that fits)")
    p.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per node at your site")
    p.add_argument("--mfu", type=float, default=0.35, help="model-FLOPs utilisation assumed by the time estimate")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="windows processed, for the time estimate (default: the manifest's max_samples, else 128)")
    p.add_argument("--probes", type=positive_int, default=None, help="hutchinson_diag probes per batch (default 1)")
    p.add_argument("--control-evals", type=int, default=None,
                   help="perturb: evaluations of control draws (default: from the manifest's controls, else 20)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run, log_level="WARNING", quiet=True)


def _read_manifest(path: str) -> dict[str, Any]:
    from esa.core.errors import UserError

    if path.endswith(".toml"):
        raise UserError(f"{path} is a plan (many jobs); pass one expanded manifest, e.g. RUN/manifests/<id>.json")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"manifest '{path}' does not exist") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read manifest '{path}': {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"manifest '{path}' is not a JSON object")
    return data


def _control_evals(manifest: dict[str, Any]) -> int:
    controls = manifest.get("controls") or {}
    names = list(controls.get("names") or [])
    repeats = int(controls.get("repeats") or 20)
    return sum(1 if name == "bottom_k" else repeats for name in names)


def job_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Merge manifest and flags into plan_job's arguments (flags win)."""
    from esa.core.errors import UserError

    m = _read_manifest(args.manifest) if args.manifest else {}
    model, data, metric = m.get("model") or {}, m.get("data") or {}, m.get("metric") or {}
    phase = m.get("phase")
    name = args.metric or {1: "baseline", 3: "perturb"}.get(phase if isinstance(phase, int) else 0) or metric.get("name")
    model_id = args.model or model.get("id")
    if not model_id:
        raise UserError("say which model: --model ID_OR_DIR, or a manifest with model.id")
    if not name:
        raise UserError("say which job: --metric NAME (a phase-2 metric, baseline or perturb), or a manifest")
    default_batch = 4 if name in ("baseline", "perturb") else 1
    return {
        "model": model_id, "revision": args.revision or model.get("revision"), "metric": name,
        "seq_len": args.seq_len or data.get("seq_len"), "batch_size": args.batch_size or data.get("batch_size") or default_batch,
        "dtype": args.dtype or model.get("dtype") or "bf16", "attention": args.attention or model.get("attention") or "sdpa",
        "samples": args.samples or data.get("max_samples"), "probes": args.probes or metric.get("probes") or 1,
        "control_evals": args.control_evals if args.control_evals is not None else (
            _control_evals(m) if m.get("controls") else 20),
    }


def _forced_layout(gpus: int, per_node: int) -> tuple[int, int]:
    from esa.core.errors import UserError

    if gpus <= per_node:
        return 1, gpus
    if gpus % per_node:
        raise UserError(f"--gpus {gpus} is not a whole number of nodes of {per_node} GPUs (--gpus-per-node)")
    return gpus // per_node, per_node


def run(args: argparse.Namespace) -> int:
    """Plan and print (table or JSON)."""
    from esa.core.errors import UserError
    from esa.planner import (
        gpu_preset,
        load_config,
        model_shape,
        parse_bytes,
        plan_job,
        smallest_layout,
    )
    from esa.planner.render import format_plan

    job = job_settings(args)
    cfg = load_config(job["model"], job["revision"])
    shape = model_shape(cfg)
    if job["seq_len"] is None:
        job["seq_len"] = min(2048, int(shape.max_positions or 2048))
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    spec = gpu_preset(args.gpu or "a100-80g")
    memory = parse_bytes(args.gpu_memory) if args.gpu_memory else spec.memory_bytes
    kwargs = dict(seq_len=job["seq_len"], batch_size=job["batch_size"], dtype=job["dtype"],
                  attention=job["attention"], activation_checkpointing=args.activation_checkpointing,
                  gpu=spec, mfu=args.mfu, samples=job["samples"], probes=job["probes"],
                  control_evals=job["control_evals"], name=job["model"])
    if args.gpus:
        nodes, per_node = _forced_layout(args.gpus, args.gpus_per_node)
        plan = plan_job(cfg, job["metric"], nodes=nodes, gpus_per_node=per_node, gpu_memory_bytes=memory, **kwargs)
        source = "forced by --gpus"
    else:
        plan = smallest_layout(cfg, job["metric"], gpu_memory_bytes=memory, max_gpus_per_node=args.gpus_per_node,
                               **kwargs)
        source = "smallest that fits" if plan.fits else "largest tried; nothing fits"
    if args.json:
        out = plan.to_dict()
        out["gpu"] = spec.name
        out["layout_source"] = source
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, source))
    return 0
