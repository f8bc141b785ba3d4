"""The ablation ground truth: candidates per second with cached block outputs vs a full forward per candidate.

`esa` = the ablation metric (esa.perturb.ablation): candidates grouped by the block that holds them, the
output of the blocks before it computed once per group, each candidate evaluated from there on.
`plain` = what one would otherwise write: perturb the weight, run the whole model on every calibration
window, restore (the same per-window NLL code, so the two give identical ΔNLL, which is checked).

GPT-2-small shapes (124 M parameters, random init), 8 calibration windows of 128 tokens (batch 4), CPU,
one torch thread, process CPU time (on a shared machine wall time measures the neighbours). Candidate
sets: weights of one MLP output projection in block 0 (nothing to skip: the worst case), block 6 and
block 11 (the best case: only block 11, ln_f and the tied 50 257-row head run), and a spread of 2 per
block over all 12 blocks plus 2 of ln_f. Each set is one ablation job, so its time includes the fixed
costs (the unperturbed forward, building the caches: one forward in all, and a one-window check per
block); the marginal cost per candidate is the difference of two set sizes in the same block.

    .venv/bin/python benchmarks/bench_ablation.py [--windows 8 --seq 128 --plain 4]
"""

from __future__ import annotations

import argparse
import platform
import time


def main() -> None:
    """Run the measurement and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--plain", type=int, default=4, help="candidates timed with the plain approach")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from gpt2_small import gpt2_small

    from esa.perturb.cached_forward import CachedForward
    from esa.perturb.perturbations import get_perturbation, perturbed
    from esa.perturb.targets import resolve_targets
    from esa.profile.metrics import MetricOptions, get_metric

    dev = torch.device(args.device)
    model, ids = gpt2_small(device=args.device, windows=args.windows, seq=args.seq, threads=args.threads)
    batches = list(ids.split(args.batch))
    clock = time.process_time if dev.type == "cpu" else time.perf_counter

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def proj(block: int, n: int) -> list[str]:
        return [f"transformer.h.{block}.mlp.c_proj.weight:{i},{3 * i}" for i in range(n)]

    spread = [w for b in range(12) for w in proj(b, 2)] + ["transformer.ln_f.weight:0", "transformer.ln_f.weight:1"]
    sets = {"block 0 (skips nothing)": proj(0, 8), "block 6 (skips 6 of 12)": proj(6, 8),
            "block 6, 24 candidates": proj(6, 24), "block 11 (skips 11 of 12)": proj(11, 8),
            "block 11, 24 candidates": proj(11, 24), "2 per block + 2 of ln_f": spread}
    metric = get_metric("ablation")
    rows = []
    esa_delta: dict[str, float] = {}
    for label, cands in sets.items():
        sync()
        t0 = clock()
        res = metric.score(model, batches, MetricOptions(candidates=cands, seed=0))
        sync()
        seconds = clock() - t0
        esa_delta.update(zip(res.candidates.names(), res.candidates.score))
        rows.append((label, len(cands), seconds))
    # Plain: a full forward per candidate (perturb, evaluate every window, restore).
    fwd = CachedForward(model, batches)
    zero = get_perturbation("zero")
    plain_cands = spread[:: max(1, len(spread) // args.plain)][: args.plain]
    targets = resolve_targets(model, plain_cands)
    predicted = args.seq - 1
    sync()
    t0 = clock()
    plain_delta = {}
    for t in targets:
        with perturbed(model, [t], zero):
            sums = fwd.nll_sums(0)
        plain_delta[t.name] = float(((sums - fwd.baseline) / predicted).mean())
    sync()
    plain_per = (clock() - t0) / len(targets)
    worst = max(abs(plain_delta[n] - esa_delta[n]) / max(abs(plain_delta[n]), 1e-30) for n in plain_delta)

    print(f"GPT-2 small shapes, {args.windows} windows x {args.seq} tokens (batch {args.batch}), {dev}, "
          f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"plain: {plain_per:.3f} s per candidate ({1 / plain_per:.3g} candidates/s) over {len(targets)} "
          f"candidates; largest relative difference of ΔNLL plain vs esa: {worst:.2g}")
    print()
    print("| candidates | n | esa time (s) | esa candidates/s | plain candidates/s | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    times = {label: (n, seconds) for label, n, seconds in rows}
    for label, n, seconds in rows:
        rate = n / seconds
        print(f"| {label} | {n} | {seconds:.2f} | {rate:.3g} | {1 / plain_per:.3g} | **{rate * plain_per:.2f}x** |")
    print()
    for block, small in ((6, "block 6 (skips 6 of 12)"), (11, "block 11 (skips 11 of 12)")):
        (n1, t1), (n2, t2) = times[small], times[f"block {block}, 24 candidates"]
        marginal = (t2 - t1) / (n2 - n1)
        print(f"block {block}: marginal {marginal:.3f} s per candidate = {plain_per / marginal:.2f}x the plain "
              f"full forward; fixed cost of a job {t1 - n1 * marginal:.2f} s")
    assert worst < 1e-5, worst


if __name__ == "__main__":
    main()
