"""The phase-3 plot: the target's ΔPPL against each control's distribution."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_perturbation_plot(path: str | Path, target_delta: float, controls: dict[str, Any]) -> Path:
    """Strip plot of each control's ΔPPL draws with the target's ΔPPL as a red line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(controls)
    for i, name in enumerate(names):
        deltas = [d for d in controls[name]["deltas"] if d is not None and math.isfinite(d)]
        jitter = [i + 0.15 * ((j * 0.618) % 1 - 0.5) for j in range(len(deltas))]
        ax.scatter(jitter, deltas, s=10, alpha=0.6, label=f"{name} (n={len(deltas)}, p={controls[name]['p_value']:.3g})")
    if math.isfinite(target_delta):
        ax.axhline(target_delta, color="red", lw=2, label=f"targets ΔPPL = {target_delta:.4g}")
    else:
        ax.set_title("targets: ΔPPL = inf (loss not finite)")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ΔPPL")
    if all(math.isfinite(x) for name in names for x in controls[name]["deltas"] if x is not None) and \
            math.isfinite(target_delta) and target_delta > 0:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(ax.get_title() or "perturbation: targets vs controls")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
