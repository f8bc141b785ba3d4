"""Time `analysis.build_report` over a fabricated run of about 500 finished jobs.

    .venv/bin/python benchmarks/bench_analysis.py [--models 2] [--seeds 5] [--keep DIR]

Jobs: per model 1 baseline, 4 metrics x 5 seeds of phase 2 (per_layer top-20 of a 10-tensor
miniature model, full scores saved) and 4 metrics x 2 perturbations x 5 k x 5 seeds of
phase 3: 2 x (1 + 20 + 200) = 442 jobs, plus 58 failed ones = 500. Prints the job count, the
fabrication time, the build_report time and the peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import build_report  # noqa: E402
from fixtures.synthetic import fabricate_run, manifest, write_failed_job  # noqa: E402


def main() -> int:
    """Fabricate, build the report, print the timings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--failed", type=int, default=58, help="extra failed jobs")
    ap.add_argument("--keep", default=None, help="fabricate here and keep the folder")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="esa-bench-analysis-"))
    t0 = time.perf_counter()
    n = fabricate_run(root, models=[f"bench-{i}" for i in range(args.models)],
                      seeds=tuple(range(args.seeds)))
    for i in range(args.failed):
        m = manifest(2, model="bench-0", metric="hessian_diag", seed=100 + i)
        write_failed_job(root / "results" / m["id"], m)
    n += args.failed
    t1 = time.perf_counter()
    html = build_report(root)
    t2 = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"jobs: {n}; fabricate: {t1 - t0:.1f} s; build_report: {t2 - t1:.2f} s; "
          f"peak RSS: {peak_mb:.0f} MiB; report: {html}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
