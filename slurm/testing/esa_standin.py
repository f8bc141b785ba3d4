#!/usr/bin/env python3
"""A stand-in for `python -m esa run MANIFEST`, for testing slurm/esa_array.sbatch.

Set ESA_PYTHON to this file; the sbatch script then runs `esa_standin.py -m esa run M`.
It behaves like a checkpointable ESA job without needing torch or a model:

* the manifest is JSON: {"id": str, "out_dir": str, "steps": int (default 5),
  "step_seconds": float (default 0.2), "fail": bool (default false)}
* it counts `steps` steps, `step_seconds` each, accumulating a deterministic value,
  and writes <out_dir>/<id>.progress (the current step) as it goes;
* on SIGUSR1 it writes <out_dir>/<id>.ckpt.json (step + accumulator, atomically) and exits 0;
* on the next start it resumes from that checkpoint;
* at the end it writes <out_dir>/<id>.result.json atomically: the accumulated value (equal to
  an uninterrupted run's), the step it resumed from, and how many times it was started;
* "fail": true makes it exit with status 3 before doing anything (a failing task);
* a manifest whose result exists is skipped (exit 0), like esa run on finished work.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def atomic_write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if argv[:3] != ["-m", "esa", "run"] or len(argv) != 4:
        print("usage: esa_standin.py -m esa run MANIFEST", file=sys.stderr)
        return 2
    manifest = json.loads(Path(argv[3]).read_text())
    job_id = manifest["id"]
    out = Path(manifest["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    steps = int(manifest.get("steps", 5))
    step_seconds = float(manifest.get("step_seconds", 0.2))
    result = out / f"{job_id}.result.json"
    ckpt = out / f"{job_id}.ckpt.json"
    starts_file = out / f"{job_id}.starts"

    with starts_file.open("a") as f:
        f.write(f"{os.getpid()} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
    starts = len(starts_file.read_text().splitlines())
    print(f"standin {job_id}: start #{starts}", flush=True)

    if manifest.get("fail"):
        print(f"standin {job_id}: failing on purpose", file=sys.stderr, flush=True)
        return 3
    if result.exists():
        print(f"standin {job_id}: already complete", flush=True)
        return 0

    stop = {"requested": False}

    def on_usr1(signum, frame):  # only set a flag: the loop checkpoints at a step boundary
        stop["requested"] = True

    signal.signal(signal.SIGUSR1, on_usr1)

    step, acc = 0, 0
    if ckpt.exists():
        state = json.loads(ckpt.read_text())
        step, acc = state["step"], state["acc"]
        print(f"standin {job_id}: resuming from step {step}", flush=True)
    resumed_from = step

    while step < steps:
        deadline = time.monotonic() + step_seconds
        while time.monotonic() < deadline and not stop["requested"]:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if stop["requested"]:
            atomic_write(ckpt, {"step": step, "acc": acc})
            print(f"standin {job_id}: SIGUSR1, checkpoint at step {step}", flush=True)
            return 0
        acc += step * step + 1
        step += 1
        (out / f"{job_id}.progress").write_text(str(step))

    atomic_write(result, {"id": job_id, "steps": steps, "acc": acc,
                          "resumed_from": resumed_from, "starts": starts,
                          "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                          "array_task": os.environ.get("SLURM_ARRAY_TASK_ID")})
    ckpt.unlink(missing_ok=True)
    print(f"standin {job_id}: done, acc={acc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
