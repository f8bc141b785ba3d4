"""The GPU benchmark at real size: random-init Llama-3.1-8B (bundled config), bf16, seq 2048.

One prepared script for a session that is lent a GPU (a few minutes on an H100/H200). On the
model built from `esa/model/configs/llama-3.1-8b/config.json` with random weights, each case
runs esa's own code path on one GPU, batch 1 (one window of `--seq` tokens per step):

- bare: forward + backward with gradients left in `.grad` (what a user would write);
- grad_x_weight: esa's metric (`Metric.score` with the phase-2 options, then `finalize` in place);
- hutchinson_diag: one Rademacher probe per window, eager attention (double backward); at
  seq 2048 an 8B model's double-backward graph (~218 GB, planner) fits no single GPU, so this
  case halves the window until the planner says it fits, and reports the seq it ran at;
- evaluation: `esa.baseline.evaluate.evaluate` (phase 1 and every phase-3 evaluation);
- perturbation: `apply_perturbation` of k sign flips + evaluate + restore (one phase-3 draw).

For each case: tokens/s (wall, synchronised; after one warm-up step), MFU = FLOPs / (time x the
GPU's dense bf16 peak), with FLOPs = the planner's count (`esa.planner.flops`: forward FLOPs per
token x forward-pass equivalents of the case), peak memory (`torch.cuda.max_memory_allocated`,
reset per case) and the planner's predicted peak for the same job (`plan_job`, whose total also
holds the CUDA context and allocator margin: both are printed). A case the planner predicts not
to fit is skipped with that reason.

    python benchmarks/gpu_llama8b.py --gpu h100-80g --out gpu.json      # on the GPU machine
    python benchmarks/gpu_llama8b.py --tiny --device cpu                   # the same code path, tiny, CPU

`--tiny` scales the config down (hidden 256, 2 layers, vocabulary 2048; seq 128) so the script
itself can be checked on a laptop; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

CASES = ("bare", "grad_x_weight", "evaluation", "perturbation", "hutchinson_diag")
# The planner job each case is counted as (its FLOPs per token and its memory plan).
PLANNER_METRIC = {"bare": "grad_x_weight", "grad_x_weight": "grad_x_weight", "hutchinson_diag": "hutchinson_diag",
                  "evaluation": "baseline", "perturbation": "baseline"}


def build_config(tiny: bool) -> dict[str, Any]:
    """The bundled Llama-3.1-8B config.json dict (or its tiny scaled copy)."""
    from esa.planner.configs import load_config
    from esa.planner.scaled import scaled_config

    if tiny:
        return scaled_config("llama-3.1-8b", hidden=256, layers=2, heads=8, kv_heads=2, intermediate=512,
                             vocab=2048)
    return load_config("llama-3.1-8b")


def build_model(config: dict[str, Any], device: str, attention: str) -> Any:
    """Random-init model from `config`, built directly on `device` in bf16 (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if not k.startswith("_")})
    cfg._attn_implementation = attention
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attention)
    return model.eval()


def main() -> None:
    """Run every case and print one Markdown table (and write --out JSON)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpu", default="h100-80g", help="planner GPU preset: peak FLOP/s for MFU, memory for fits")
    ap.add_argument("--seq", type=int, default=None, help="tokens per window (default 2048; --tiny: 128)")
    ap.add_argument("--steps", type=int, default=4, help="timed windows per case (after one warm-up)")
    ap.add_argument("--k", type=int, default=1000, help="weights the perturbation touches")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tiny", action="store_true", help="a tiny scaled config: checks the script, not the GPU")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    import torch
    import transformers

    from esa.baseline.evaluate import evaluate
    from esa.core.logs import setup_logging
    from esa.parallel.split import local_batches
    from esa.perturb.controls import random_k
    from esa.perturb.perturbations import apply_perturbation, cpu_generator, get_perturbation
    from esa.perturb.targets import WeightTarget, flat_to_index
    from esa.planner import model_shape
    from esa.planner.flops import forward_flops_per_token, passes
    from esa.planner.gpus import gpu_preset
    from esa.planner.memory import plan_job
    from esa.profile.metrics import MetricOptions, get_metric

    setup_logging(quiet=True)
    transformers.utils.logging.set_verbosity_error()
    seq = args.seq or (128 if args.tiny else 2048)
    dev = torch.device(args.device)
    gpu = gpu_preset(args.gpu)
    config = build_config(args.tiny)
    shape = model_shape(config)
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def reset_peak() -> None:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak() -> int | None:
        return int(torch.cuda.max_memory_allocated()) if cuda else None

    windows = torch.randint(0, shape.vocab, (args.steps + 1, seq), generator=torch.Generator().manual_seed(1))
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}

    def model_for(attention: str) -> Any:
        # One model at a time: the eager one (hutchinson) replaces the sdpa one.
        if attention not in models:
            models.clear()
            if cuda:
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            models[attention] = build_model(config, args.device, attention)
            print(f"built the model ({attention} attention) in {time.perf_counter() - t0:.1f} s", flush=True)
        return models[attention]

    def bare(model: Any, batch: torch.Tensor) -> None:
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()

    def metric_step(name: str, probes: int = 1) -> Callable[[Any, torch.Tensor], None]:
        metric = get_metric(name)

        def step(model: Any, batch: torch.Tensor) -> None:
            options = MetricOptions(probes=probes, seed=0, keep_accumulators=False, finalize=False)
            result = metric.score(model, local_batches(batch, 1, dev), options)
            metric.finalize(result.accumulators, result.counts, model, inplace=True)
        return step

    def eval_step(model: Any, batch: torch.Tensor) -> None:
        evaluate(model, batch, 1)

    perturb_state: dict[str, Any] = {}

    def perturb_step(model: Any, batch: torch.Tensor) -> None:
        if "targets" not in perturb_state:  # drawn once, outside the timing's meaning: one phase-3 draw
            params = dict(model.named_parameters())
            seeds = [WeightTarget(n, flat_to_index(0, tuple(p.shape)), 0) for n, p in params.items() if p.dim() == 2]
            targets = random_k(model, seeds, cpu_generator(0))
            while len(targets) < args.k:
                targets += random_k(model, targets, cpu_generator(len(targets)))
            perturb_state["targets"] = targets[: args.k]
        applied = apply_perturbation(model, perturb_state["targets"], get_perturbation("sign_flip"), cpu_generator(0))
        evaluate(model, batch, 1)
        applied.restore()

    steps = {"bare": ("sdpa", bare), "grad_x_weight": ("sdpa", metric_step("grad_x_weight")),
             "evaluation": ("sdpa", eval_step), "perturbation": ("sdpa", perturb_step),
             "hutchinson_diag": ("eager", metric_step("hutchinson_diag"))}
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case not in steps:
            raise SystemExit(f"unknown case '{case}'; choose from {', '.join(CASES)}")
        attention, fn = steps[case]
        planner_metric = PLANNER_METRIC[case]
        capacity = torch.cuda.get_device_properties(dev).total_memory if cuda else None
        case_seq = seq
        while True:
            plan = plan_job(config, planner_metric, seq_len=case_seq, batch_size=1, dtype="bf16",
                            attention=attention, gpu=gpu.name, samples=args.steps, device="cuda" if cuda else "cpu")
            predicted = plan.per_gpu_bytes["total"]
            if case != "hutchinson_diag" or capacity is None or predicted <= capacity or case_seq <= 128:
                break
            case_seq //= 2
        row: dict[str, Any] = {"case": case, "attention": attention, "seq": case_seq, "predicted_peak_bytes": predicted,
                               "planner_overhead_bytes": plan.per_gpu_bytes.get("overhead", 0)}
        if capacity is not None and predicted > capacity:
            row["skipped"] = f"planner predicts {predicted / 2**30:.1f} GiB, more than this GPU holds"
            rows.append(row)
            print(f"{case}: skipped ({row['skipped']})", flush=True)
            continue
        model = model_for(attention)
        model.zero_grad(set_to_none=True)
        reset_peak()
        fn(model, windows[:1, :case_seq])  # warm-up (kernels, allocator)
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        for i in range(1, args.steps + 1):
            fn(model, windows[i:i + 1, :case_seq])
            if case == "bare":
                model.zero_grad(set_to_none=True)  # as a user's loop would, so .grad does not grow
        sync()
        seconds = time.perf_counter() - t0
        tokens = args.steps * case_seq
        # The perturbation's step is one evaluation (a draw), whatever phase 3's job-level count is.
        flops = forward_flops_per_token(shape, case_seq, attention) * tokens * passes(planner_metric)
        row.update(seconds=seconds, seconds_per_step=seconds / args.steps, tokens=tokens, tokens_per_s=tokens / seconds,
                   mfu=flops / seconds / gpu.peak_flops("bf16") if cuda else None, peak_bytes=peak())
        rows.append(row)
        print(f"{case}: {row['tokens_per_s']:.0f} tokens/s", flush=True)
        model.zero_grad(set_to_none=True)

    props = torch.cuda.get_device_properties(dev) if cuda else None
    head = {"device": props.name if props else platform.processor() or platform.machine(), "torch": torch.__version__,
            "transformers": transformers.__version__, "model": "llama-3.1-8b" + (" (tiny scaled)" if args.tiny else ""),
            "n_parameters": shape.n_parameters(), "dtype": "bf16", "seq": seq, "batch": 1, "steps": args.steps,
            "gpu_preset_for_mfu": gpu.name}
    print(f"\n{head['model']}, {head['n_parameters'] / 1e6:,.1f} M parameters, bf16, seq {seq}, batch 1, "
          f"{args.steps} timed windows per case; {head['device']}, torch {head['torch']}; MFU against "
          f"{gpu.name}'s dense bf16 peak {gpu.peak_flops('bf16') / 1e12:.0f} TFLOP/s\n")
    print("| case | seq | s per window (hutchinson: per probe) | tokens/s | MFU | peak allocated (GiB) | "
          "planner peak (GiB; incl. overhead) | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        pred = r["predicted_peak_bytes"] / 2**30
        if "skipped" in r:
            print(f"| {r['case']} | {r['seq']} | skipped: {r['skipped']} | | | | {pred:.1f} | |")
            continue
        measured = r["peak_bytes"]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (CPU)"
        meas = f"{measured / 2**30:.1f}" if measured else "n/a (CPU)"
        ratio = f"{(r['predicted_peak_bytes'] - r['planner_overhead_bytes']) / measured:.3f}" if measured else ""
        print(f"| {r['case']} | {r['seq']} | {r['seconds_per_step']:.3f} | {r['tokens_per_s']:.0f} | {mfu} | {meas} | "
              f"{pred:.1f} | {ratio} |")
    print("\nratio = planner peak without its overhead term / measured allocator peak")
    if args.out:
        args.out.write_text(json.dumps({**head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
