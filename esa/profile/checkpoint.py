"""The checkpoint of a pre-empted phase-2 job, and its resumption.

When a stop is requested (esa.core.stop), the phase-2 loop notices it at the next batch
boundary (all ranks at the same one), writes the metric's additive accumulators, counts, batch
position and RNG state to OUT/checkpoint/ (safetensors + JSON, never pickle) and raises
`Preempted`. The requeued job finds the checkpoint and resumes from the same batch with the same
accumulators, so its scores equal an uninterrupted run's.

A sharded job writes one file per rank (`accumulators.rank<r>.safetensors`, that rank's part of
each sum) and records its world size: it resumes only with the same number of ranks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from esa.core.errors import UserError
from esa.parallel.env import barrier, is_rank0, rank, world_size

CHECKPOINT_DIR = "checkpoint"


def _tensor_file(r: int, world: int) -> str:
    return "accumulators.safetensors" if world == 1 else f"accumulators.rank{r}.safetensors"


def save(out: Path, manifest_id: str, accumulators: dict[str, dict[str, Any]], counts: dict[str, Any],
         batches_done: int, generator_state: Any | None) -> Path:
    """Write the checkpoint atomically: tensors with safetensors (this rank's part), the rest as JSON.
    Every rank of a sharded job calls it; the folder appears only once all ranks have written."""
    import torch
    from safetensors.torch import save_file

    from esa.parallel.fsdp import local_data

    folder = out / CHECKPOINT_DIR
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    world = world_size()
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()  # the others wait until the folder exists
    tensors = {f"{acc}\x1f{param}": local_data(t).detach().contiguous().cpu()
               for acc, per_param in accumulators.items() for param, t in per_param.items()}
    if generator_state is not None:
        tensors["__generator_state__"] = torch.as_tensor(generator_state).clone()
    save_file(tensors, str(tmp / _tensor_file(rank(), world)))
    counts_of = _all_counts(counts)
    barrier()  # every rank's file is written
    if is_rank0():
        (tmp / "state.json").write_text(json.dumps({"manifest_id": manifest_id, "batches_done": batches_done,
                                                    "world_size": world, "counts": counts_of}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    barrier()
    return folder


def _all_counts(counts: dict[str, Any]) -> Any:
    """Counts as saved: one dict unsharded, every rank's dict (in rank order) when sharded (per-rank
    counts such as act_mag's tokens differ between ranks)."""
    from esa.parallel.env import all_gather_objects

    return counts if world_size() == 1 else all_gather_objects(counts)


def load(out: Path, manifest_id: str) -> dict[str, Any] | None:
    """This rank's part of the job's checkpoint in `out`, or None (another job's checkpoint is ignored)."""
    folder = out / CHECKPOINT_DIR
    state_path = folder / "state.json"
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    if state.get("manifest_id") != manifest_id:
        return None
    saved_world, world = int(state.get("world_size", 1)), world_size()
    if saved_world != world:
        raise UserError(f"{folder} was written by a job of {saved_world} rank(s); resume it with "
                        f"{saved_world} rank(s), or delete the folder to start over with {world}")
    from safetensors.torch import load_file

    tensors = load_file(str(folder / _tensor_file(rank(), world)))
    accumulators: dict[str, dict[str, Any]] = {}
    generator_state = tensors.pop("__generator_state__", None)
    for key, t in tensors.items():
        acc, param = key.split("\x1f", 1)
        accumulators.setdefault(acc, {})[param] = t
    counts = state["counts"] if world == 1 else state["counts"][rank()]
    return {"accumulators": accumulators, "counts": counts, "batches_done": state["batches_done"],
            "generator_state": generator_state}


def remove(out: Path) -> None:
    """Delete the checkpoint once the final result is written (rank 0)."""
    if is_rank0():
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
