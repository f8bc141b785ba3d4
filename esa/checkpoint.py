"""Pre-emption: a stop request, the checkpoint of a phase-2 job, and its resumption.

A cluster sends a signal (Slurm: USR1/USR2 before the time limit or on pre-emption). The
handler only sets a flag; the phase-2 loop notices it at the next batch boundary, writes the
metric's additive accumulators, counts, batch position and RNG state to OUT/checkpoint/
(safetensors + JSON, never pickle) and raises `Preempted`. `esa run` then exits with
EXIT_PREEMPTED so the job wrapper requeues it; the requeued job finds the checkpoint and
resumes from the same batch with the same accumulators, so its scores equal an
uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
CHECKPOINT_DIR = "checkpoint"
_stop = threading.Event()


class Preempted(Exception):
    """The job saved a checkpoint and stopped; run it again to resume."""


def request_stop(*_: Any) -> None:
    """Ask the running job to checkpoint at the next batch boundary (signal-handler safe)."""
    _stop.set()


def stop_requested() -> bool:
    """Whether a stop was requested (or ESA_STOP_AFTER_BATCHES says so, for tests)."""
    return _stop.is_set()


def clear_stop() -> None:
    """Forget a stop request (a new job in the same process starts clean)."""
    _stop.clear()


def install_stop_signals(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGUSR2)) -> None:
    """Route the cluster's warning signals to `request_stop` (main thread only)."""
    for sig in signals:
        signal.signal(sig, request_stop)


def stop_after_batches() -> int | None:
    """ESA_STOP_AFTER_BATCHES=N makes a job stop itself after N batches (deterministic tests)."""
    value = os.environ.get("ESA_STOP_AFTER_BATCHES")
    return int(value) if value else None


def save(out: Path, manifest_id: str, accumulators: dict[str, dict[str, Any]], counts: dict[str, Any],
         batches_done: int, generator_state: Any | None) -> Path:
    """Write the checkpoint atomically: tensors with safetensors, the rest as JSON."""
    import torch
    from safetensors.torch import save_file

    folder = out / CHECKPOINT_DIR
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {f"{acc}\x1f{param}": t.detach().contiguous().cpu()
               for acc, per_param in accumulators.items() for param, t in per_param.items()}
    if generator_state is not None:
        tensors["__generator_state__"] = torch.as_tensor(generator_state).clone()
    save_file(tensors, str(tmp / "accumulators.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"manifest_id": manifest_id, "batches_done": batches_done,
                                                "counts": counts}))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def load(out: Path, manifest_id: str) -> dict[str, Any] | None:
    """The checkpoint of this job in `out`, or None (another job's checkpoint is ignored)."""
    folder = out / CHECKPOINT_DIR
    state_path = folder / "state.json"
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    if state.get("manifest_id") != manifest_id:
        return None
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "accumulators.safetensors"))
    accumulators: dict[str, dict[str, Any]] = {}
    generator_state = tensors.pop("__generator_state__", None)
    for key, t in tensors.items():
        acc, param = key.split("\x1f", 1)
        accumulators.setdefault(acc, {})[param] = t
    return {"accumulators": accumulators, "counts": state["counts"], "batches_done": state["batches_done"],
            "generator_state": generator_state}


def remove(out: Path) -> None:
    """Delete the checkpoint once the final result is written."""
    import shutil

    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
