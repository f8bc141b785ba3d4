"""The checkpoint of a pre-empted phase-2 job, and its resumption.

When a stop is requested (esa.core.stop), the phase-2 loop notices it at the next batch
boundary, writes the metric's additive accumulators, counts, batch position and RNG state to
OUT/checkpoint/ (safetensors + JSON, never pickle) and raises `Preempted`. The requeued job
finds the checkpoint and resumes from the same batch with the same accumulators, so its
scores equal an uninterrupted run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHECKPOINT_DIR = "checkpoint"


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
    # safetensors stores tensors sorted by name: keep the order the sums had, so a resumed job
    # hands them on exactly as an uninterrupted one.
    order = {acc: list(per_param) for acc, per_param in accumulators.items()}
    (tmp / "state.json").write_text(json.dumps({"manifest_id": manifest_id, "batches_done": batches_done,
                                                "counts": counts, "order": order}))
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
    for acc, names in (state.get("order") or {}).items():
        if acc in accumulators and set(names) == set(accumulators[acc]):
            accumulators[acc] = {name: accumulators[acc][name] for name in names}
    return {"accumulators": accumulators, "counts": state["counts"], "batches_done": state["batches_done"],
            "generator_state": generator_state}


def remove(out: Path) -> None:
    """Delete the checkpoint once the final result is written."""
    import shutil

    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
