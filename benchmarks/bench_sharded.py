"""Sharded scoring (FSDP2): per-rank memory at world size 1, 2, 4, and FSDP's own cost at world size 1.

1. Memory. A ~100 M-parameter Llama (built with `esa tiny-model`, fp32) is scored with
   grad_x_weight by the real launch, `torchrun --standalone --nproc_per_node N -m esa profile ...`,
   for N = 1, 2, 4. Each job records every rank's resident memory at its start and its peak
   (experiment_manifest.json, provenance.memory); the table reports the peak above the start per
   rank, next to the weights + fp32 sums a rank holds by construction (2 x 4 bytes x parameters / N).
   MALLOC_MMAP_THRESHOLD_ makes glibc return freed blocks, so the peak is what was alive.
2. FSDP at world size 1 vs the unsharded path. In one process with a 1-rank gloo group, the same
   model scores the same batches with esa's GradXWeight (the metric code the job runs), once as
   loaded and once wrapped by esa.parallel.fsdp.wrap_model (one FSDP2 unit per block); best of
   `--repeat` timings each, ratio FSDP / unsharded. Before timing, the two score sets are checked
   to be equal. Timed on process CPU time with one torch thread (as the other CPU benchmarks: on
   a shared machine wall time measures the neighbours; CPU time counts gloo's threads too).

Usage: .venv/bin/python benchmarks/bench_sharded.py [--worlds 1 2 4] [--repeat 3] [--keep DIR]
Prints a Markdown table per part (docs/benchmarks.md holds the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MIB = 1024 ** 2


def build_model(folder: Path) -> Path:
    """A Llama of about 100 M parameters (hidden 768, 8 blocks, vocabulary 32,000), random init."""
    out = folder / "llama-100m"
    if not (out / "config.json").exists():
        subprocess.run([PY, "-m", "esa", "tiny-model", "--arch", "llama", "--out", str(out), "--hidden-size", "768",
                        "--layers", "8", "--vocab-size", "32000", "--quiet"], check=True, cwd=REPO)
    return out


def profile_args(model: Path, out: Path, seq_len: int, samples: int, batch: int) -> list[str]:
    return ["-m", "esa", "profile", "--model", str(model), "--metric", "grad_x_weight", "--mode", "global",
            "--topk", "100", "--dtype", "fp32", "--device", "cpu", "--dataset", "builtin", "--split", "train",
            "--seq-len", str(seq_len), "--max-samples", str(samples), "--batch-size", str(batch),
            "--save-scores", "topk", "--no-export-stats", "--out-dir", str(out), "--quiet"]


def memory_part(model: Path, folder: Path, worlds: list[int], seq_len: int, samples: int, batch: int) -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    n_params = None
    rows = []
    for world in worlds:
        out = folder / f"world{world}"
        launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
        t0 = time.perf_counter()
        subprocess.run([PY, *launcher, *profile_args(model, out, seq_len, samples, batch)], check=True, env=env,
                       cwd=REPO)
        wall = time.perf_counter() - t0
        record = json.loads((out / "experiment_manifest.json").read_text())
        n_params = record["summary"].get("n_parameters") or n_params
        ranks = record["provenance"]["memory"]
        held = [r["peak_rss_bytes"] - r["rss_at_start_bytes"] for r in ranks]
        end = [r["rss_bytes"] - r["rss_at_start_bytes"] for r in ranks]
        rows.append((world, held, end, wall))
    if n_params is None:
        from esa.planner import load_config, model_shape

        n_params = model_shape(load_config(str(model))).n_parameters()
    print(f"\nModel: {n_params / 1e6:.1f} M parameters, fp32 ({n_params * 4 / MIB:.0f} MiB of weights); "
          f"grad_x_weight, {samples} windows of {seq_len} tokens, batch {batch}\n")
    print("| ranks | weights + fp32 sums per rank (MiB) | resident at the end above start, per rank (MiB) | "
          "peak above start, per rank (MiB) | peak / 1-rank peak | wall (s) |")
    print("| ---: | ---: | --- | --- | ---: | ---: |")
    base = max(rows[0][1])
    for world, held, end, wall in rows:
        print(f"| {world} | {2 * 4 * n_params / world / MIB:.0f} | {', '.join(f'{e / MIB:.0f}' for e in end)} | "
              f"{', '.join(f'{h / MIB:.0f}' for h in held)} | {max(held) / base:.2f} | {wall:.1f} |")


def fsdp_overhead_part(model_dir: Path, repeat: int, seq_len: int, samples: int, batch: int) -> None:
    import torch
    import torch.distributed as dist

    from esa.model.loading import load_model
    from esa.parallel.fsdp import wrap_model
    from esa.parallel.split import local_batches
    from esa.profile.metrics import MetricOptions, get_metric
    from esa.spec.manifest import ModelSpec

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29611")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    spec = ModelSpec(id=str(model_dir), dtype="fp32", device="cpu")
    windows = torch.randint(0, 1000, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    metric = get_metric("grad_x_weight")

    torch.set_num_threads(1)

    def score(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
        t0 = time.process_time()
        out = metric.score(model, local_batches(windows, batch, torch.device("cpu")), MetricOptions())
        return time.process_time() - t0, out.scores

    plain = load_model(spec).model
    wrapped = wrap_model(load_model(spec).model)
    _, a = score(plain)
    _, b = score(wrapped)
    worst = max(float((a[n] - b[n].full_tensor()).abs().max() / a[n].abs().max().clamp_min(1e-30)) for n in a)
    times = {"unsharded": [], "FSDP2, 1 rank": []}
    for _ in range(repeat):  # interleaved, so that load on the shared machine hits both alike
        times["unsharded"].append(score(plain)[0])
        times["FSDP2, 1 rank"].append(score(wrapped)[0])
    best = {k: min(v) for k, v in times.items()}
    print(f"\ngrad_x_weight scoring of {samples} windows x {seq_len} tokens (batch {batch}), best of {repeat}; "
          f"scores agree to {worst:.1e} (relative to each tensor's largest)\n")
    print("| path | CPU time (s) |")
    print("| --- | ---: |")
    for k, v in best.items():
        print(f"| {k} | {v:.2f} |")
    print(f"| **ratio FSDP2 / unsharded** | **{best['FSDP2, 1 rank'] / best['unsharded']:.3f}** |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128, help="memory part")
    p.add_argument("--overhead-seq-len", type=int, nargs="+", default=[128, 512],
                   help="FSDP-overhead part: tokens per window (more tokens per batch: less relative overhead)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--keep", type=Path, default=None, help="folder for the model and results (default: a temp dir)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    args = p.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="esa-bench-sharded-"))
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(folder)
    if not args.skip_memory:
        memory_part(model, folder, args.worlds, args.seq_len, args.samples, args.batch_size)
    if not args.skip_overhead:
        for seq_len in args.overhead_seq_len:
            fsdp_overhead_part(model, args.repeat, seq_len, args.samples, args.batch_size)


if __name__ == "__main__":
    main()
