"""PNG plots of one sensitivity profile (matplotlib, Agg backend, no display needed).

* ``score_histogram.png`` -- histogram of all scores on log-log axes (log-spaced bins; zero
  scores are counted in the title, since a log axis cannot show them). Tensors larger than
  ``HIST_SAMPLE_PER_TENSOR`` elements contribute a deterministic uniform sample of that size.
* ``per_layer_scores.png`` -- per transformer block: the largest score and the mean score
  (numel-weighted over the block's tensors), log y axis.
* ``topk_heatmap.png`` -- how many of the top-k weights fall in each layer x module type.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless nodes have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from esa.results.tables import TensorStats, TopK  # noqa: E402
from esa.profile.stats import compute_stats  # noqa: E402
from esa.spec.weights import layer_of, module_type_of  # noqa: E402

__all__ = ["ScoreSampler", "save_profile_plots", "HIST_SAMPLE_PER_TENSOR"]

HIST_SAMPLE_PER_TENSOR = 1 << 20
_SEED = 0


class ScoreSampler:
    """What the histogram needs of the scores, taken one tensor at a time: a seeded sample of
    each (at most HIST_SAMPLE_PER_TENSOR values)."""

    def __init__(self) -> None:
        self._gen = torch.Generator().manual_seed(_SEED)
        self.names: list[str] = []
        self.samples: list[np.ndarray] = []
        self.sampled = False

    def add(self, name: str, scores: torch.Tensor) -> None:
        """Sample one tensor (empty tensors are skipped)."""
        self.names.append(name)
        if not scores.numel():
            return
        flat = scores.detach().reshape(-1)
        if flat.numel() > HIST_SAMPLE_PER_TENSOR:
            self.sampled = True
            pos = torch.randint(0, flat.numel(), (HIST_SAMPLE_PER_TENSOR,), generator=self._gen)
            flat = flat[pos.to(flat.device)]
        self.samples.append(flat.float().cpu().numpy().astype(np.float64))


def save_profile_plots(out_dir: str | os.PathLike,
                       scores: Mapping[str, torch.Tensor] | ScoreSampler | None,
                       topk: TopK | None,
                       stats: list[TensorStats] | None) -> list[Path]:
    """Write the profile PNGs into ``out_dir`` and return their paths.

    ``scores`` is the score tensors, or a ScoreSampler that saw them one at a time. Each plot is
    skipped when its input is missing: the histogram needs ``scores``, the per-layer plot needs
    ``stats`` (computed from score tensors when not given) and at least one block-indexed
    parameter, the heatmap needs a non-empty ``topk``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if stats is None and isinstance(scores, Mapping):
        stats = compute_stats(scores, k=len(topk) if topk is not None else 1)
    sampler = scores
    if isinstance(scores, Mapping):
        sampler = ScoreSampler()
        for name, t in scores.items():
            sampler.add(name, t)
    paths: list[Path] = []
    if sampler is not None and sampler.names:
        paths.append(_histogram(out / "score_histogram.png", sampler))
    if stats and any(s.layer is not None for s in stats):
        paths.append(_per_layer(out / "per_layer_scores.png", stats))
    if topk is not None and len(topk):
        # Show every block of the model (empty rows included), not just the ones hit.
        names = sampler.names if sampler is not None else [s.name for s in stats or []]
        all_layers = {lay for lay in map(layer_of, names) if lay is not None}
        paths.append(_heatmap(out / "topk_heatmap.png", topk, all_layers))
    return paths


def _save(fig: plt.Figure, path: Path) -> Path:
    # Write beside the target and rename, so a half-written PNG is never left behind.
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _histogram(path: Path, sampler: ScoreSampler) -> Path:
    values = np.concatenate(sampler.samples or [np.zeros(0)])
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    n_zero = int((finite == 0).sum())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if positive.size:
        lo, hi = positive.min(), positive.max()
        if hi <= lo:
            hi = lo * 10
        bins = np.logspace(np.log10(lo), np.log10(hi), 80)
        ax.hist(positive, bins=bins, color="tab:blue")
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no positive scores", ha="center", va="center",
                transform=ax.transAxes)
    title = f"Score distribution ({values.size:,} {'sampled ' if sampler.sampled else ''}values"
    title += f", {n_zero:,} zero)" if n_zero else ")"
    ax.set_title(title)
    ax.set_xlabel("score (log scale)")
    ax.set_ylabel("number of weights (log scale)")
    return _save(fig, path)


def _per_layer(path: Path, stats: list[TensorStats]) -> Path:
    by_layer: dict[int, list[TensorStats]] = {}
    for s in stats:
        if s.layer is not None and s.numel:
            by_layer.setdefault(s.layer, []).append(s)
    layers = sorted(by_layer)
    maxes = [max(s.max for s in by_layer[lay]) for lay in layers]
    means = [sum(s.mean * s.numel for s in by_layer[lay]) / sum(s.numel for s in by_layer[lay])
             for lay in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 3), 4.5))
    ax.plot(layers, maxes, "o-", label="max score", color="tab:red")
    ax.plot(layers, means, "s-", label="mean score", color="tab:blue")
    if all(v > 0 for v in maxes + means):
        ax.set_yscale("log")
    ax.set_xlabel("layer (transformer block)")
    ax.set_ylabel("score" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title("Score per layer: maximum and mean over the layer's weights")
    ax.set_xticks(layers)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _heatmap(path: Path, topk: TopK, all_layers: set[int]) -> Path:
    layers = sorted(all_layers | {lay for lay in map(layer_of, topk.param) if lay is not None})
    has_outside = any(layer_of(p) is None for p in topk.param)
    row_labels = [str(lay) for lay in layers] + (["other"] if has_outside else [])
    row_of = {lay: i for i, lay in enumerate(layers)}
    types = sorted({module_type_of(p) for p in topk.param})
    col_of = {t: j for j, t in enumerate(types)}
    counts = np.zeros((len(row_labels), len(types)), dtype=np.int64)
    for p in topk.param:
        lay = layer_of(p)
        i = row_of[lay] if lay is not None else len(row_labels) - 1
        counts[i, col_of[module_type_of(p)]] += 1
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(types) + 3),
                                    max(3.5, 0.3 * len(row_labels) + 2)))
    im = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    kind = "top" if topk.largest else "bottom"
    ax.set_title(f"Where the {kind}-{len(topk)} weights are ({topk.mode} ranking)")
    if counts.size <= 400:  # numbers stay legible only on small grids
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                            color="white" if counts[i, j] < counts.max() / 2 else "black",
                            fontsize=8)
    fig.colorbar(im, ax=ax, label="number of weights")
    return _save(fig, path)
