"""The memory planner's predicted peak against the measured peak of real ESA jobs (CPU).

For llama, mixtral and gpt2 (the bundled configs scaled down to ~20M and ~80M parameters,
random init, saved with an offline-trained tokenizer like esa/tiny.py's) it runs the real
commands -- `esa baseline`, `esa profile --metric M` for grad_x_weight, grad_squared, act_mag,
super_weight, hutchinson_diag, magnitude, and `esa perturb` -- each in a fresh subprocess, fp32
on the CPU, on a small local text file, and compares the peak with
`esa.planner.plan_job(..., device="cpu")`.

How the peak is measured: the child process wraps `esa.cli.main` in torch's profiler with
`profile_memory=True`; every tensor allocation and free then reports the allocator's running
total of live bytes (`total_allocated` of the profiler's allocation events). The measured peak
is the model's parameter bytes plus the largest running total after the model is loaded (the
weights come from a memory-mapped safetensors file, so they never pass through the allocator).
Weights that do pass through it (Mixtral's fused experts are built from per-expert checkpoint
tensors) are in the total at load time and are counted once. This is the CPU counterpart of
`torch.cuda.max_memory_allocated`: exact, and repeatable to the
byte (same inputs, same allocations). It does not see memory outside torch tensors (numpy
buffers of the statistics, Python objects, allocator slack), so the peak RSS growth after
loading is reported as well, as a cross-check.

    .venv/bin/python benchmarks/bench_planner_memory.py [--jobs 2] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MIB = 1 << 20
METRICS = ("baseline", "grad_x_weight", "grad_squared", "act_mag", "super_weight", "hutchinson_diag", "magnitude",
           "perturb")
# (label, bundled config, scaled sizes, seq_len); batch 2 everywhere.
MODELS: list[tuple[str, str, dict[str, int], int]] = [
    ("llama-20M", "llama-3.1-8b", dict(hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024, vocab=8192), 256),
    ("llama-80M", "llama-3.1-8b", dict(hidden=640, layers=10, heads=10, kv_heads=2, intermediate=1792, vocab=32000), 128),
    ("mixtral-20M", "mixtral-8x7b", dict(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=512, vocab=8192,
                                        experts=4, experts_per_token=2), 256),
    ("mixtral-80M", "mixtral-8x7b", dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1024, vocab=32000,
                                        experts=4, experts_per_token=2), 128),
    ("gpt2-20M", "gpt2", dict(hidden=384, layers=8, heads=6, intermediate=1536, vocab=8192), 256),
    ("gpt2-80M", "gpt2", dict(hidden=768, layers=8, heads=12, intermediate=3072, vocab=32000), 128),
]
BATCH = 2
SAMPLES = 2 * BATCH
DOWN_PROJ = {"llama": "model.layers.0.mlp.down_proj.weight:0,0",
             "mixtral": "model.layers.0.mlp.experts.down_proj:0,0,0",
             "gpt2": "transformer.h.0.mlp.c_proj.weight:0,0"}


# ----------------------------------------------------------------------------- child process
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0) so the peak after this point can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(out: str, argv: list[str]) -> int:
    """Run `esa ARGV` under the profiler and write the measured figures to `out` (JSON)."""
    import torch
    import transformers  # noqa: F401  (imported before measuring)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    import esa.baseline.phase  # noqa: F401
    import esa.cli
    import esa.inputs
    import esa.model.loading
    import esa.perturb.phase  # noqa: F401
    import esa.profile.phase

    torch.set_num_threads(1)
    marks: dict[str, Any] = {}
    load_model = esa.model.loading.load_model

    def load_and_mark(spec: Any) -> Any:
        loaded = load_model(spec)
        marks["load_end"] = time.time_ns()
        marks["weights_bytes"] = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        with torch.no_grad():  # fault the memory-mapped weights in, so the RSS after loading holds them
            for p in loaded.model.parameters():
                float(p.sum())
        marks["rss_reset"] = _reset_peak_rss()
        marks["rss_after_load"] = _proc_status("VmRSS")
        return loaded

    esa.inputs.load_model = load_and_mark  # the phases import load_model by name
    esa.profile.phase.load_model = load_and_mark
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rc = esa.cli.main(argv)
    rss_peak = _proc_status("VmHWM")
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation:
            events.append((ev.start_time_ns, ev.extra_fields.total_allocated))
        stack.extend(ev.children)
    events.sort()
    load_end = marks["load_end"]
    at_load = next((v for t, v in reversed(events) if t <= load_end), 0)
    after = [v for t, v in events if t > load_end]
    result = {"rc": rc, "weights_bytes": marks["weights_bytes"], "allocated_at_load": at_load,
              "peak_allocated_after_load": max(after) if after else at_load,
              "rss_after_load": marks["rss_after_load"], "rss_peak": rss_peak, "rss_reset": marks["rss_reset"]}
    # Weights loaded through the allocator (e.g. Mixtral's experts, fused from per-expert
    # checkpoint tensors) are already in the running total: count every weight once.
    result["measured_peak"] = result["weights_bytes"] + result["peak_allocated_after_load"] - at_load
    Path(out).write_text(json.dumps(result, indent=1))
    return int(rc or 0)


# ----------------------------------------------------------------------------- parent
def build_model(label: str, base: str, sizes: dict[str, int], folder: Path) -> dict[str, Any]:
    """Random-init model from the scaled bundled config, saved with the built-in tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from esa.planner.scaled import scaled_config
    from esa.model.tiny import builtin_tokenizer

    cfg_dict = scaled_config(base, **sizes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg_dict))
    config = AutoConfig.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    builtin_tokenizer(2048).save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def command(metric: str, model: Path, family: str, data: Path, seq: int, out: Path, dtype: str = "fp32") -> list[str]:
    """The esa command line of one case (CPU, batch 2)."""
    common = ["--model", str(model), "--dataset", str(data), "--seq-len", str(seq), "--batch-size", str(BATCH),
              "--dtype", dtype, "--device", "cpu", "--out-dir", str(out), "--quiet"]
    # Two batches: gradient metrics reach a batch whose fp32 sums all exist already.
    samples = ["--max-samples", str(SAMPLES)]
    if metric == "baseline":
        return ["baseline", *common, *samples]
    if metric == "perturb":
        return ["perturb", *common, *samples, "--perturb", "zero", "--target", DOWN_PROJ[family],
                "--controls", "random_k", "--control-repeats", "2"]
    return ["profile", *common, *samples, "--metric", metric, "--topk", "10"]


def run_case(case: dict[str, Any], work: Path) -> dict[str, Any]:
    """One measured subprocess."""
    out = work / "results" / f"{case['model']}-{case['metric']}-{case['plan'].settings['dtype']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ESA_CACHE_DIR": str(work / "cache"),
           # fixed mmap threshold: freed large blocks go back to the OS, so RSS follows live data
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(out), "--", *case["argv"]], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{case['model']} {case['metric']} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(out.read_text()), "seconds": seconds}


def main() -> None:
    """Build the models, run every case, print (and optionally write) the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="folder for models, data and results (default: a temp dir)")
    ap.add_argument("--jobs", type=int, default=2, help="cases run in parallel (each uses one torch thread)")
    ap.add_argument("--models", default=None, help="comma-separated subset of the model labels")
    ap.add_argument("--metrics", default=None, help="comma-separated subset of the metrics")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model dtype of every case")
    ap.add_argument("--out", default=None, help="also write the markdown table (and a .json) here")
    args = ap.parse_args()

    from esa.data.corpus import builtin_documents
    from esa.core.logs import setup_logging
    from esa.planner import model_shape, plan_job

    setup_logging(quiet=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="esa-planner-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.txt"
    if not data.exists():  # ~100k tokens of held-out built-in text: a small, offline dataset
        data.write_text("\n\n".join(builtin_documents("validation", max_bytes=400_000)), encoding="utf-8")
    chosen = [m for m in MODELS if not args.models or m[0] in args.models.split(",")]
    metrics = [m for m in METRICS if not args.metrics or m in args.metrics.split(",")]
    t_start = time.perf_counter()
    cases = []
    for label, base, sizes, seq in chosen:
        folder = work / "models" / label
        cfg = (json.loads((folder / "config.json").read_text()) if (folder / "model.safetensors").exists()
               else build_model(label, base, sizes, folder))
        family = model_shape(cfg).family
        for metric in metrics:
            plan = plan_job(cfg, metric, seq_len=seq, batch_size=BATCH, dtype=args.dtype, attention="sdpa",
                            samples=SAMPLES, device="cpu", name=label)
            cases.append({"model": label, "metric": metric, "plan": plan, "seq": seq,
                          "argv": command(metric, folder, family, data, seq, work / "out" / label / metric,
                                          args.dtype)})
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        measured = list(pool.map(lambda c: run_case(c, work), cases))
    rows = []
    for case, meas in zip(cases, measured):
        plan = case["plan"]
        pred, real = plan.total_bytes, meas["measured_peak"]
        rss_growth = meas["rss_peak"] - meas["rss_after_load"]
        rows.append({"model": case["model"], "n_parameters": plan.n_parameters, "metric": case["metric"],
                     "seq_len": case["seq"], "batch_size": BATCH, "peak_stage": plan.peak_stage,
                     "predicted_bytes": pred, "measured_bytes": real, "ratio": pred / real,
                     "rss_growth_bytes": rss_growth, "predicted_growth_bytes": pred - plan.per_gpu_bytes["weights"],
                     "seconds": meas["seconds"]})
    total = time.perf_counter() - t_start
    table = render(rows, total)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


def render(rows: list[dict[str, Any]], total_seconds: float) -> str:
    """Markdown table: predicted, measured, ratio; RSS growth after loading as a cross-check."""
    lines = ["| model (params) | job | seq x batch | peak stage (planner) | predicted MiB | measured MiB | ratio | "
             "RSS growth MiB (predicted) |", "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['n_parameters'] / 1e6:.1f}M) | {r['metric']} | {r['seq_len']} x {r['batch_size']} "
                     f"| {r['peak_stage']} | {r['predicted_bytes'] / MIB:.1f} | {r['measured_bytes'] / MIB:.1f} "
                     f"| **{r['ratio']:.3f}** | {r['rss_growth_bytes'] / MIB:.1f} ({r['predicted_growth_bytes'] / MIB:.1f}) |")
    ratios = [r["ratio"] for r in rows]
    within = sum(1 for x in ratios if 0.85 <= x <= 1.15)
    lines.append("")
    lines.append(f"{within}/{len(rows)} within ±15 %; ratio range {min(ratios):.3f}-{max(ratios):.3f}; "
                 f"{total_seconds / 60:.1f} min in all.")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sep = sys.argv.index("--")
        raise SystemExit(child(sys.argv[2], sys.argv[sep + 1:]))
    main()
