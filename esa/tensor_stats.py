"""Per-tensor summary statistics of sensitivity scores.

Moments (mean, std, excess kurtosis), min, max and the share of score mass in the top-k are
always exact: they are computed in float64, chunk by chunk, so no full-size temporary is
built. Order statistics (p99, p99.9) and the Gini coefficient need the sorted values: they
are exact for tensors of at most ``EXACT_LIMIT`` elements (2**24, about 16.8M -- the same
size as torch.quantile's limit) and, beyond that, are computed on a deterministic uniform
subsample of ``SAMPLE_SIZE`` elements drawn with replacement by a torch.Generator seeded
with ``SAMPLE_SEED`` (the same positions for the same tensor size on every run).
``TensorStats.sampled`` says which case applied.

Definitions: std is the population standard deviation (ddof=0); kurtosis is Fisher's excess
kurtosis m4/m2**2 - 3 with biased central moments (scipy.stats.kurtosis defaults), NaN for
a constant tensor; quantiles interpolate linearly between order statistics (numpy's default
method); Gini = sum_i (2i - n - 1) x_(i) / (n sum x) over ascending x, 0 for an all-zero
tensor (meaningful for non-negative scores, which every ESA metric produces).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from esa.ranking import tensor_topk
from esa.weights import layer_of, module_type_of

__all__ = ["TensorStats", "tensor_stats", "compute_stats", "stats_columns",
           "stats_from_columns", "EXACT_LIMIT", "SAMPLE_SIZE", "SAMPLE_SEED"]

EXACT_LIMIT = 1 << 24
SAMPLE_SIZE = 1 << 24
SAMPLE_SEED = 0
_CHUNK = 1 << 22  # elements converted to float64 at a time


@dataclass
class TensorStats:
    """Summary of one score tensor (see the module docstring for the definitions)."""

    name: str
    numel: int
    mean: float
    std: float
    min: float
    max: float
    p99: float
    p99_9: float
    kurtosis: float
    topk_k: int
    topk_share: float
    gini: float
    sampled: bool

    @property
    def layer(self) -> int | None:
        """Block index of the parameter, None outside the blocks."""
        return layer_of(self.name)

    @property
    def module_type(self) -> str:
        """Module kind of the parameter (q_proj, c_attn, embed_tokens, ...)."""
        return module_type_of(self.name)

    def to_dict(self) -> dict[str, object]:
        """Plain dict with layer and module_type added (NaN kept as float NaN)."""
        d = asdict(self)
        d["layer"] = self.layer
        d["module_type"] = self.module_type
        return d


STAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TensorStats))


def tensor_stats(name: str, scores: torch.Tensor, k: int) -> TensorStats:
    """Statistics of one score tensor; ``k`` sets the top-k used for ``topk_share``."""
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        nan = float("nan")
        return TensorStats(name, 0, nan, nan, nan, nan, nan, nan, nan, 0, nan, nan, False)
    total, m2, m3, m4 = _moments(flat)
    mean = total / n
    kurt = m4 / (m2 * m2) - 3.0 if m2 > 0 else float("nan")
    kk = max(0, min(int(k), n))
    if math.isnan(total):
        share = float("nan")  # NaN scores: the ranking refuses them, the stats show them
    else:
        # Chunked top-k (esa.ranking): torch.topk on a whole CPU tensor would copy it.
        top_sum = float(tensor_topk(flat, kk, name=name)[0].sum()) if kk else 0.0
        share = top_sum / total if total != 0 else float("nan")
    sample, sampled = _order_sample(flat)
    p99, p999 = np.quantile(sample, [0.99, 0.999])
    return TensorStats(
        name=name, numel=n, mean=mean, std=math.sqrt(m2), min=float(flat.min()),
        max=float(flat.max()), p99=float(p99), p99_9=float(p999), kurtosis=kurt,
        topk_k=kk, topk_share=share, gini=_gini_sorted(sample), sampled=sampled,
    )


def _moments(flat: torch.Tensor) -> tuple[float, float, float, float]:
    """Sum and 2nd-4th central moments (divided by n), two chunked float64 passes."""
    n = flat.numel()
    total = 0.0
    for s in range(0, n, _CHUNK):
        total += float(flat[s:s + _CHUNK].double().sum())
    mean = total / n
    m2 = m3 = m4 = 0.0
    for s in range(0, n, _CHUNK):
        d = flat[s:s + _CHUNK].double() - mean
        d2 = d * d
        m2 += float(d2.sum())
        m3 += float((d2 * d).sum())
        m4 += float((d2 * d2).sum())
    return total, m2 / n, m3 / n, m4 / n


def _order_sample(flat: torch.Tensor) -> tuple[np.ndarray, bool]:
    """Sorted float64 values: all of them up to EXACT_LIMIT, else the documented sample."""
    n = flat.numel()
    if n <= EXACT_LIMIT:
        vals = flat
        sampled = False
    else:
        gen = torch.Generator().manual_seed(SAMPLE_SEED)
        pos = torch.randint(0, n, (SAMPLE_SIZE,), generator=gen)
        vals = flat[pos.to(flat.device)]
        sampled = True
    if vals.device.type != "cpu":
        # Sort on the accelerator (fast), then bring the sorted values over once.
        return torch.sort(vals.float()).values.cpu().numpy().astype(np.float64), sampled
    out = vals.float().numpy().astype(np.float64)  # one float64 copy, sorted in place
    out.sort()
    return out, sampled


def _gini_sorted(x: np.ndarray) -> float:
    """Gini coefficient of ascending values x."""
    n = x.size
    total = float(x.sum())
    if n == 0 or total == 0.0:
        return 0.0
    weights = 2.0 * np.arange(1, n + 1, dtype=np.float64) - n - 1
    return float(np.dot(weights, x) / (n * total))


def compute_stats(scores: Mapping[str, torch.Tensor], k: int) -> list[TensorStats]:
    """Statistics of every tensor in ``scores`` (input order), top-k share with ``k``."""
    return [tensor_stats(name, t, k) for name, t in scores.items()]


def stats_columns(stats: list[TensorStats]) -> dict[str, np.ndarray | list[str]]:
    """Column form of a stats list (``name`` as list[str], the rest as numpy arrays)."""
    cols: dict[str, np.ndarray | list[str]] = {"name": [s.name for s in stats]}
    for f in fields(TensorStats):
        if f.name == "name":
            continue
        vals = [getattr(s, f.name) for s in stats]
        if f.name in ("numel", "topk_k"):
            cols[f.name] = np.asarray(vals, dtype=np.int64)
        elif f.name == "sampled":
            cols[f.name] = np.asarray(vals, dtype=bool)
        else:
            cols[f.name] = np.asarray(vals, dtype=np.float64)
    return cols


def stats_from_columns(cols: Mapping[str, object]) -> list[TensorStats]:
    """Inverse of :func:`stats_columns`; columns missing from ``cols`` become NaN / 0."""
    names = [str(n) for n in cols["name"]]  # type: ignore[union-attr]
    out = []
    for i, name in enumerate(names):
        kw: dict[str, object] = {"name": name}
        for f in fields(TensorStats):
            if f.name == "name":
                continue
            col = cols.get(f.name)
            if col is None:
                kw[f.name] = 0 if f.name in ("numel", "topk_k") else (
                    False if f.name == "sampled" else float("nan"))
                continue
            v = col[i]  # type: ignore[index]
            if f.name in ("numel", "topk_k"):
                kw[f.name] = int(v)
            elif f.name == "sampled":
                kw[f.name] = bool(v)
            else:
                kw[f.name] = float(v)
        out.append(TensorStats(**kw))  # type: ignore[arg-type]
    return out
