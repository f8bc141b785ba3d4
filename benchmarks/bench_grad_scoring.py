"""grad_x_weight scoring vs a bare forward+backward loop: time and peak memory.

Each variant runs in its own child process so that peak memory is its own:

- bare: forward + backward per batch, gradients accumulated in `.grad` (a full gradient
  copy lives next to the weights, as in any training loop);
- hooks: esa's grad_x_weight with `keep_accumulators=False` (unsharded runs): each
  gradient folded into one fp32 buffer during backward and freed at once;
- hooks+acc: the same, also returning the accumulators (shard runs: sums + scores);
- after-backward: backward first, then a Python loop folds every `.grad` (the design the
  hooks replace; it holds the full gradient and the sums at once).

Default sizes are GPT-2 small (GPT2Config() defaults, random init), seq 256, batch 2, CPU.
On a GPU: `--device cuda --batch 8 --seq 1024`.

On a CPU the ratio is taken on process CPU time with `--threads 1` (default): on a shared
machine wall time mostly measures the neighbours, CPU time measures the work. Wall times
are printed as well. On a GPU the ratio is on wall time (synchronised).

    .venv/bin/python benchmarks/bench_grad_scoring.py [--steps 4 --repeat 3 ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ["bare", "hooks", "hooks+acc", "after-backward"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _child(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GPT2Config

    from esa.profile.metrics import MetricOptions, get_metric
    from esa.profile.metrics.loss import next_token_nll

    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=args.vocab,
                     n_positions=max(1024, args.seq))
    model = AutoModelForCausalLM.from_config(cfg).to(dev, getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(dev)
               for _ in range(args.steps)]
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def bare(bs: list) -> None:
        for b in bs:
            next_token_nll(model, b).backward()
        model.zero_grad(set_to_none=True)

    def hooks(bs: list, keep: bool) -> None:
        get_metric("grad_x_weight").score(model, bs, MetricOptions(keep_accumulators=keep))

    def after_backward(bs: list) -> None:
        sums: dict = {}
        for b in bs:
            next_token_nll(model, b).backward()
            for n, p in model.named_parameters():
                if n in sums:
                    sums[n].add_(p.grad)
                else:
                    sums[n] = p.grad.float().clone()
                p.grad = None
        for n, p in model.named_parameters():  # the same finalize as the metric
            sums[n].mul_(p.detach()).abs_().div_(len(bs))

    run = {"bare": bare, "hooks": lambda bs: hooks(bs, False), "hooks+acc": lambda bs: hooks(bs, True),
           "after-backward": after_backward}[args.child]
    sync()
    # Baseline: model + batches resident, before any backward; the peak covers every run.
    base = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run(batches[:1])  # warm-up: allocator, kernels, lazy init
    times, cpu_times = [], []
    for _ in range(args.repeat):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        run(batches)
        sync()
        times.append((time.perf_counter() - t0) / len(batches))
        cpu_times.append((time.process_time() - c0) / len(batches))
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_params = sum(p.numel() for p in model.parameters())
    # The ratio is taken on CPU time on a CPU (see the module docstring), wall time on a GPU.
    key = times if cuda else cpu_times
    return {"variant": args.child, "s_per_batch": min(key), "wall": min(times), "all": key, "peak_mib": peak,
            "base_mib": base, "params": n_params, "param_mib": n_params * model.dtype.itemsize / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="batches per timed run")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per variant and process")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of one fresh process per variant, interleaved so that a busy machine "
                         "slows every variant alike; the fastest run of each variant is kept")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    variants = args.variants.split(",")
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--variants")]
    best: dict[str, dict] = {}
    for rnd in range(args.rounds):
        for v in variants:
            out = subprocess.run([sys.executable, __file__, *passthrough, "--child", v],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"round {rnd} {v}: {['%.3f' % t for t in r['all']]} s/batch, peak {r['peak_mib']:.0f} MiB",
                  file=sys.stderr)
            if v not in best or r["s_per_batch"] < best[v]["s_per_batch"]:
                best[v] = r
    rows = [best[v] for v in variants]
    bare = next((r for r in rows if r["variant"] == "bare"), rows[0])
    gpu = args.device.startswith("cuda")
    mem = "GPU allocated" if gpu else "process RSS"
    clock = "wall s" if gpu else f"CPU s ({args.threads or 'default'} thread)"
    machine = platform.processor() or platform.machine()
    print(f"\nGPT-2-style model, {rows[0]['params'] / 1e6:.1f} M parameters ({rows[0]['param_mib']:.0f} MiB "
          f"{args.dtype}), batch {args.batch} x seq {args.seq}, {args.steps} batches per run, "
          f"best of {args.rounds} x {args.repeat} runs; device {args.device} ({machine})\n")
    print(f"| variant | {clock} / batch | wall s / batch | ratio vs bare | peak {mem} (MiB) "
          "| peak − model loaded (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = r["s_per_batch"] / bare["s_per_batch"]
        print(f"| {r['variant']} | {r['s_per_batch']:.3f} | {r['wall']:.3f} | {ratio:.3f} "
              f"| {r['peak_mib']:.0f} | {r['peak_mib'] - r['base_mib']:+.0f} |")


if __name__ == "__main__":
    main()
