"""Global top-k: ESA's streaming per-tensor merge vs torch.cat of all scores + torch.topk.

The score tensors have the real GPT-2 small parameter shapes (~124M fp32 values). Each
method runs in a fresh subprocess so that its peak memory is its own: on CPU the extra
memory is ru_maxrss after the method minus ru_maxrss right after the scores were allocated;
on CUDA it is torch.cuda.max_memory_allocated minus the memory held by the scores.

    .venv/bin/python benchmarks/bench_topk.py [--k 1000 100000] [--device cpu|cuda] [--repeat 3]

Prints a markdown table (time = best of --repeat runs; memory = peak over all runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

D, FF, VOCAB, CTX, LAYERS = 768, 3072, 50257, 1024, 12


def gpt2_small_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (Conv1D weights are [in, out]); lm_head is tied."""
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (VOCAB, D),
                                          "transformer.wpe.weight": (CTX, D)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (D,), p + "ln_1.bias": (D,),
            p + "attn.c_attn.weight": (D, 3 * D), p + "attn.c_attn.bias": (3 * D,),
            p + "attn.c_proj.weight": (D, D), p + "attn.c_proj.bias": (D,),
            p + "ln_2.weight": (D,), p + "ln_2.bias": (D,),
            p + "mlp.c_fc.weight": (D, FF), p + "mlp.c_fc.bias": (FF,),
            p + "mlp.c_proj.weight": (FF, D), p + "mlp.c_proj.bias": (D,),
        })
    shapes.update({"transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,)})
    return shapes


def make_scores(device: str) -> dict[str, torch.Tensor]:
    """Heavy-tailed non-negative scores, like |W * G|, seeded."""
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, shape in gpt2_small_shapes().items():
        t = torch.rand(shape, generator=g, device=device)
        out[name] = t.pow_(8)  # in place: no second copy during set-up
    return out


def concat_topk(scores: dict[str, torch.Tensor], k: int) -> list[tuple[str, int, float]]:
    """The naive method: one flat copy of every score, then torch.topk."""
    names = list(scores)
    flat = torch.cat([t.reshape(-1) for t in scores.values()])
    vals, idx = torch.topk(flat, k)
    sizes = torch.tensor([0] + [t.numel() for t in scores.values()]).cumsum(0)
    idx = idx.cpu()
    which = torch.searchsorted(sizes, idx, right=True) - 1
    return [(names[w], int(i - sizes[w]), float(v))
            for w, i, v in zip(which.tolist(), idx.tolist(), vals.cpu().tolist())]


def streaming_topk(scores: dict[str, torch.Tensor], k: int) -> list[tuple[str, int, float]]:
    """ESA's method (esa.profile.ranking.rank_scores, mode='global')."""
    from esa.profile.ranking import rank_scores

    top = rank_scores(scores, k, "global")
    return list(zip(top.param, top.flat_index.tolist(), top.score.tolist()))


def child(method: str, k: int, device: str, repeat: int) -> None:
    """Run one method in this (fresh) process and print one JSON line."""
    torch.set_grad_enabled(False)
    scores = make_scores(device)
    fn = streaming_topk if method == "streaming" else concat_topk
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(scores, k)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({
        "method": method, "k": k, "seconds": min(times), "extra_bytes": extra,
        "numel": sum(t.numel() for t in scores.values()), "tensors": len(scores),
        "score_set": sorted((p, i) for p, i, _ in result)[:50],
        "score_sum": sum(v for _, _, v in result),
    }))


def run_child(method: str, k: int, device: str, repeat: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, "--k", str(k), "--device", device,
         "--repeat", str(repeat)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--child", choices=["streaming", "concat"])
    args = ap.parse_args()
    if args.child:
        child(args.child, args.k[0], args.device, args.repeat)
        return

    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or \
        platform.machine()
    print(f"device: {args.device} ({dev}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, best of {args.repeat}")
    print()
    print("| k | scores (values / tensors) | method | time (s) | peak extra memory (MiB) |")
    print("| ---: | ---: | --- | ---: | ---: |")
    for k in args.k:
        s = run_child("streaming", k, args.device, args.repeat)
        c = run_child("concat", k, args.device, args.repeat)
        # Same selection (the float sums may differ in the last bits; ties are random-free).
        same = s["score_set"] == c["score_set"] and abs(s["score_sum"] - c["score_sum"]) <= \
            1e-9 * abs(c["score_sum"])
        for r in (s, c):
            name = "streaming merge (esa)" if r["method"] == "streaming" else "torch.cat + topk"
            print(f"| {k:,} | {r['numel']:,} / {r['tensors']} | {name} | {r['seconds']:.3f} | "
                  f"{r['extra_bytes'] / 2**20:.1f} |")
        ratio_t = s["seconds"] / c["seconds"]
        ratio_m = (s["extra_bytes"] / c["extra_bytes"]) if c["extra_bytes"] else float("nan")
        print(f"| {k:,} | | **ratio streaming / concat** | **{ratio_t:.2f}** | "
              f"**{ratio_m:.3f}** |")
        if not same:
            print(f"WARNING: the two methods selected different weights for k={k}")


if __name__ == "__main__":
    main()
