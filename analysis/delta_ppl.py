"""Phase-1 baselines and the phase-3 ΔPPL / ΔNLL / Δaccuracy table with control summaries.

Numbers are copied from the result files (``eval.json``, ``perturbation.json``); what this
module computes itself is the summary of each control's distribution of ΔPPL draws
(n, finite n, mean, sample std, min, median, max, 5 % and 95 % quantiles with numpy's linear
interpolation) and the per-condition summary over seeds (mean and sample std, ddof=1).
A ΔPPL written as JSON null was not finite (the damaged model's loss overflowed): it stays
NaN in the tables and is counted in ``n_nonfinite``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.collect import complete_jobs
from esa.results.records import EvalRecord, PerturbationRecord, ResultFileError, read_record

__all__ = ["baseline_table", "distribution_summary", "DeltaResult", "delta_table",
           "condition_summary", "delta_plots", "CONDITION_KEYS"]

# One experimental condition: everything but the seed.
CONDITION_KEYS = ["model", "metric", "mode", "perturbation", "k"]


def baseline_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per complete phase-1 job: PPL, NLL, token accuracy, tokens and sanity flags."""
    rows = []
    for _, job in complete_jobs(jobs, 1).iterrows():
        try:
            ev = read_record(EvalRecord, job["dir"])
        except ResultFileError:
            continue  # collect() already checked it; a file removed since is simply skipped
        rows.append({"model": job["model"], "dataset": job["dataset"], "seq_len": job["seq_len"],
                     "n_windows": ev.n_windows, "n_tokens": ev.n_tokens, "ppl": ev.ppl, "nll": ev.nll,
                     "token_accuracy": ev.token_accuracy, "flags": "; ".join(map(str, ev.flags or [])) or "none",
                     "fingerprint": (ev.data or {}).get("fingerprint"), "id": job["id"], "path": job["path"]})
    return pd.DataFrame(rows)


def _float(v: Any) -> float:
    # JSON null stands for a non-finite number in esa's result files.
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def distribution_summary(values: list[Any]) -> dict[str, float | int]:
    """Summary of control draws: n, n_nonfinite, mean, std (ddof=1), min, q05, median, q95, max.

    None/NaN/±inf values are counted in ``n_nonfinite`` and left out of the other figures;
    std needs two finite values and is NaN otherwise.
    """
    arr = np.array([_float(v) for v in values], dtype=np.float64)
    fin = arr[np.isfinite(arr)]
    out: dict[str, float | int] = {"n": int(arr.size), "n_nonfinite": int(arr.size - fin.size)}
    if fin.size == 0:
        out.update(mean=math.nan, std=math.nan, min=math.nan, q05=math.nan, median=math.nan,
                   q95=math.nan, max=math.nan)
        return out
    q05, median, q95 = np.quantile(fin, [0.05, 0.5, 0.95])
    out.update(mean=float(fin.mean()), std=float(fin.std(ddof=1)) if fin.size > 1 else math.nan,
               min=float(fin.min()), q05=float(q05), median=float(median), q95=float(q95),
               max=float(fin.max()))
    return out


@dataclass
class DeltaResult:
    """The ΔPPL table plus each row's raw control draws (for plots)."""

    table: pd.DataFrame
    control_deltas: list[dict[str, list[float]]] = field(default_factory=list)  # per table row
    controls: list[str] = field(default_factory=list)


def _row(job: pd.Series, pj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    ci = pj.get("delta_nll_ci") or {}
    base, pert = pj.get("baseline") or {}, pj.get("perturbed") or {}
    row: dict[str, Any] = {
        "model": job["model"], "metric": job["metric"] if job["metric"] is not None else "(list)",
        "mode": job["mode"], "perturbation": job["perturbation"], "k": job["k"],
        "n_targets": pj.get("n_targets"), "seed": job["seed"],
        "baseline_ppl": _float(base.get("ppl")), "perturbed_ppl": _float(pert.get("ppl")),
        "delta_ppl": _float(pj.get("delta_ppl")), "delta_nll": _float(pj.get("delta_nll")),
        "delta_nll_ci_low": _float(ci.get("low")), "delta_nll_ci_high": _float(ci.get("high")),
        "ci_alpha": _float(ci.get("alpha")),
        "delta_token_accuracy": _float(pj.get("delta_token_accuracy")),
        "n_windows": pj.get("n_windows"), "n_tokens": pj.get("n_tokens"),
    }
    draws: dict[str, list[float]] = {}
    for name, c in sorted((pj.get("controls") or {}).items()):
        c = c or {}
        deltas = [_float(v) for v in c.get("deltas") or []]
        draws[name] = deltas
        summary = distribution_summary(deltas)
        for key in ("n", "n_nonfinite", "mean", "std", "min", "q05", "median", "q95", "max"):
            row[f"{name}_{key}"] = summary[key]
        row[f"{name}_p_value"] = _float(c.get("p_value"))
        row[f"{name}_z"] = _float(c.get("z"))
        nll = c.get("nll") or {}
        row[f"{name}_nll_mean"] = _float(nll.get("mean"))
        row[f"{name}_nll_p_value"] = _float(nll.get("p_value"))
    row.update(id=job["id"], path=job["path"])
    return row, draws


def _with_k(job: pd.Series, k: int) -> pd.Series:
    job["k"] = k
    return job


def delta_table(jobs: pd.DataFrame) -> DeltaResult:
    """One row per complete phase-3 job, and per k of a dose-response job (the content of delta_ppl.csv).

    Columns: the condition (model, metric, mode, perturbation, k), n_targets, seed, baseline
    and perturbed PPL, ΔPPL, ΔNLL and its CI, Δ token accuracy, then per control ``c``:
    ``c_n, c_n_nonfinite, c_mean, c_std, c_min, c_q05, c_median, c_q95, c_max`` (of the ΔPPL
    draws), ``c_p_value``, ``c_z`` (as recorded by the job), ``c_nll_mean``,
    ``c_nll_p_value``; finally id and path.
    """
    rows, draws = [], []
    for _, job in complete_jobs(jobs, 3).iterrows():
        try:
            pj = read_record(PerturbationRecord, job["dir"]).to_dict()
        except ResultFileError:
            continue
        # A dose-response job gives one row per k (its by_k entries), each like a single-k job.
        for entry in pj.get("by_k") or [None]:
            part = pj if entry is None else {**pj, **entry}
            row, d = _row(job if entry is None else _with_k(job.copy(), entry["k"]), part)
            rows.append(row)
            draws.append(d)
    if not rows:
        return DeltaResult(pd.DataFrame(), [], [])
    controls = sorted({c for d in draws for c in d})
    table = pd.DataFrame(rows)
    # Put id/path last whatever controls each row had.
    cols = [c for c in table.columns if c not in ("id", "path")] + ["id", "path"]
    return DeltaResult(table[cols], draws, controls)


def condition_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per condition (all but the seed): seeds, mean and sample std (ddof=1) of ΔPPL and
    ΔNLL over the finite values, and the count of non-finite ΔPPL."""
    if table.empty:
        return pd.DataFrame()
    rows = []
    keyed = table.assign(**{c: table[c].astype(object).where(table[c].notna(), "")
                            for c in CONDITION_KEYS})
    for key, part in keyed.groupby(CONDITION_KEYS, sort=True):
        row = dict(zip(CONDITION_KEYS, key))
        row["seeds"] = len(part)
        for col in ("delta_ppl", "delta_nll", "delta_token_accuracy"):
            s = distribution_summary(part[col].tolist())
            row[f"{col}_mean"], row[f"{col}_std"] = s["mean"], s["std"]
        row["n_nonfinite"] = int((~np.isfinite(part["delta_ppl"].to_numpy(dtype=float))).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def delta_plots(result: DeltaResult, plots_dir: Path) -> list[tuple[Path, str]]:
    """Per (model, metric, mode, perturbation): ΔPPL against k with control bands when the
    condition was run at several k, otherwise targets beside controls at its one k.

    Returns ``(png path, caption)`` pairs.
    """
    from analysis.plots import plot_delta_vs_k, plot_targets_vs_controls, slug

    table = result.table
    if table.empty:
        return []
    out = []
    keys = ["model", "metric", "mode", "perturbation"]
    keyed = table.assign(**{c: table[c].astype(object).where(table[c].notna(), "") for c in keys})
    for key, part in keyed.groupby(keys, sort=True):
        label = " · ".join(str(v) for v in key if v != "")
        target: dict[float, list[float]] = {}
        controls: dict[str, dict[float, list[float]]] = {}
        for i, row in part.iterrows():
            k = float(row["k"]) if pd.notna(row["k"]) else math.nan
            target.setdefault(k, []).append(float(row["delta_ppl"]))
            for name, draws in result.control_deltas[table.index.get_loc(i)].items():
                controls.setdefault(name, {}).setdefault(k, []).extend(draws)
        ks = sorted(k for k in target if math.isfinite(k))
        name = slug("delta_ppl", *key)
        if len(ks) >= 2:
            path = plot_delta_vs_k(ks, target, controls, f"ΔPPL vs k: {label}",
                                   plots_dir / f"{name}.png")
            out.append((path, f"ΔPPL against k for {label}; bands: 5–95 % of control draws"))
        else:
            k = ks[0] if ks else next(iter(target))
            flat = {c: v.get(k, []) for c, v in controls.items()}
            kk = "?" if not math.isfinite(k) else f"{k:g}"
            path = plot_targets_vs_controls(target[k], flat, f"ΔPPL at k = {kk}: {label}",
                                            plots_dir / f"{name}.png")
            out.append((path, f"ΔPPL of the targets (one dot per seed) and of each control's "
                              f"draws at k = {kk} for {label}"))
    return out
