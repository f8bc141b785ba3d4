"""Cross-seed stability of phase-2 rankings read from each seed's scores.h5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esa.core.io import atomic_write_json
from esa.results.overlap import stability_from_sets
from esa.results.scorefile import read_topk


def write_seed_stability(folders: dict[int, Path], out: Path, by: str = "parameter") -> dict[str, Any]:
    """Jaccard over all pairs of seeds and rank correlation over the union; writes `out`."""
    sets = {}
    for seed, folder in folders.items():
        topk = read_topk(Path(folder) / "scores.h5")
        sets[seed] = [(p, i, float(s)) for p, i, s in zip(topk.param, topk.index, topk.score)]
    summary = stability_from_sets(sets, by=by)
    summary["folders"] = {str(s): str(f) for s, f in folders.items()}
    atomic_write_json(out, summary)
    return summary
