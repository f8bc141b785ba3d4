"""One phase-3 perturbation (apply + evaluate + restore) vs a bare evaluation, and its memory.

The perturbation touches k weights in place and keeps only their k original values, so its
cost over a bare evaluation should be noise and its extra memory O(k), not a model copy.
The plain approach a user would otherwise write (deepcopy the model, perturb the copy,
evaluate it) is measured too.

Default: GPT-2-small shapes (random init), 8 windows of 256 tokens, CPU, process CPU time with
one thread (on a shared machine wall time measures the neighbours); `--device cuda` on a GPU.

    .venv/bin/python benchmarks/bench_perturb.py [--k 1000 --repeat 5]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time


def main() -> None:
    """Run the measurement and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=1000, help="weights perturbed")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from gpt2_small import gpt2_small

    from esa.perturb.controls import random_k
    from esa.baseline.evaluate import evaluate
    from esa.perturb.perturbations import apply_perturbation, cpu_generator, get_perturbation
    from esa.perturb.targets import WeightTarget, flat_to_index

    dev = torch.device(args.device)
    model, windows = gpt2_small(device=args.device, windows=args.windows, seq=args.seq, threads=args.threads)
    params = dict(model.named_parameters())
    seed_targets = [WeightTarget(n, flat_to_index(0, tuple(p.shape)), 0) for n, p in params.items() if p.dim() == 2]
    targets = random_k(model, seed_targets, cpu_generator(0))  # one per 2-D tensor...
    while len(targets) < args.k:  # ...then more, matched per tensor, until k
        targets += random_k(model, targets, cpu_generator(len(targets)))
    targets = targets[: args.k]
    pert = get_perturbation("sign_flip")
    clock = time.process_time if dev.type == "cpu" else time.perf_counter

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        evaluate(model, windows, args.batch)

    def perturbed() -> None:
        applied = apply_perturbation(model, targets, pert, cpu_generator(0))
        evaluate(model, windows, args.batch)
        applied.restore()

    def copy_model() -> None:
        clone = copy.deepcopy(model)
        applied = apply_perturbation(clone, targets, pert, cpu_generator(0))
        evaluate(clone, windows, args.batch)
        del applied, clone

    bare()  # warm-up
    times: dict[str, list[float]] = {"bare": [], "esa": [], "copy": []}
    for _ in range(args.repeat):  # interleaved so drift hits every variant alike
        for name, fn in (("bare", bare), ("esa", perturbed), ("copy", copy_model)):
            sync()
            t0 = clock()
            fn()
            sync()
            times[name].append(clock() - t0)
    best = {k: min(v) for k, v in times.items()}
    applied = apply_perturbation(model, targets, pert, cpu_generator(0))
    kept = sum(g.old.numel() * g.old.element_size() for g in applied.groups)
    applied.restore()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, device {dev}, "
          f"threads {args.threads}; GPT-2 small ({sum(p.numel() for p in params.values()) / 1e6:.0f}M params), "
          f"{args.windows}x{args.seq} tokens, k = {len(targets)}, best of {args.repeat}")
    print("| variant | time (s) | ratio to bare eval | extra memory |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| bare evaluation | {best['bare']:.3f} | 1.000 | 0 |")
    print(f"| esa: apply + eval + restore | {best['esa']:.3f} | {best['esa'] / best['bare']:.3f} | "
          f"{kept:,} B (k originals) |")
    print(f"| deepcopy + perturb + eval | {best['copy']:.3f} | {best['copy'] / best['bare']:.3f} | "
          f"{model_bytes / 2**20:,.0f} MiB (model copy) |")


if __name__ == "__main__":
    main()
