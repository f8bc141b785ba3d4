"""Scan a run folder and build the job table: one row per job, its status and key figures.

A *job* is

* every ``RUN/manifests/<id>.json`` (what was planned by the job layer), matched to its
  results by id (``RUN/results/<id>/`` or any job folder whose manifest has that id);
* every directory under RUN that holds ``experiment_manifest.json`` or ``error.json``
  (``esa profile --seeds ... --out-dir X`` folders, the demo's folders);
* a directory holding only ``scores.h5`` (what ``esa reduce`` writes): a phase-2 job whose
  manifest is read from the file's ``manifest_json`` attribute.

Statuses are those of esa.results.state.job_state (``done``, ``failed``, ``preempted``,
``corrupt``, ``incomplete``, ``missing``): the job layer's `make status` gives the same answer.
Only result files are read; nothing imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Any

import pandas as pd

from esa.core.errors import UserError
from esa.core.io import read_json
from esa.results.records import (EvalRecord, PerturbationRecord, ProfileRecord, ResultFileError,
                                 read_record)
from esa.results.scorefile import check_score_file
from esa.results.state import DONE, STATES, job_state
from esa.spec.names import METRICS

__all__ = ["STATUSES", "JOB_COLUMNS", "collect_jobs", "complete_jobs", "problem_jobs",
           "perturbation_label", "canonical_metric"]

STATUSES = STATES
# Public columns, in display order; `dir` (absolute folder) and a few `_`-free helper
# columns follow them (see _EXTRA_COLUMNS).
JOB_COLUMNS = ["id", "phase", "experiment", "model", "metric", "mode", "topk", "seed", "shard",
               "perturbation", "k", "ks", "status", "reason", "path",
               "ppl", "nll", "token_accuracy", "flags", "n_ranked", "n_windows",
               "n_targets", "delta_ppl", "delta_nll", "delta_token_accuracy"]
_EXTRA_COLUMNS = ["dir", "from_scores", "target_mode", "target_metric", "target_job",
                  "has_full_scores", "has_bottomk", "has_super_weights", "has_candidates", "dataset", "seq_len",
                  "model_id", "planted"]
_INT_COLUMNS = ("phase", "topk", "seed", "k", "n_ranked", "n_windows", "n_targets", "seq_len")
_MARKERS = ("experiment_manifest.json", "error.json")
_SKIP_DIRS = {"report", "manifests"}  # at the top of RUN: our own output and the plans


def canonical_metric(name: Any) -> str | None:
    """The canonical metric name (aliases resolved); None when absent."""
    if name in (None, ""):
        return None
    return METRICS.canonical(str(name)) if str(name) in METRICS else str(name)


def perturbation_label(section: dict[str, Any] | None) -> str | None:
    """``name`` or ``name(p=v, ...)`` of a manifest's perturbation section."""
    if not section or not section.get("name"):
        return None
    params = section.get("params") or {}
    inner = ", ".join(f"{k}={params[k]}" for k in sorted(params) if params[k] is not None)
    return f"{section['name']}({inner})" if inner else str(section["name"])


def _empty_row() -> dict[str, Any]:
    return {c: None for c in JOB_COLUMNS + _EXTRA_COLUMNS}


def model_label(model_id: Any) -> Any:
    """What tables and plots call a model: a hub id as it is, a local folder by its name
    (a cache path like /root/.cache/esa/models/tiny-llama-7a3c... would swamp every table)."""
    if not isinstance(model_id, str):
        return model_id
    if model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1:
        return Path(model_id.rstrip("/")).name or model_id
    return model_id


def _manifest_fields(m: dict[str, Any]) -> dict[str, Any]:
    """The job-table fields a manifest determines."""
    model = m.get("model") or {}
    data = m.get("data") or {}
    ranking = m.get("ranking") or {}
    targets = m.get("targets") or {}
    phase = m.get("phase")
    out = {"id": m.get("id"), "phase": int(phase) if str(phase).isdigit() else phase,
           "experiment": m.get("experiment"), "model": model_label(model.get("id")),
           "model_id": model.get("id"),
           "seed": m.get("seed"), "dataset": data.get("dataset"), "seq_len": data.get("seq_len")}
    if out["phase"] == 2:
        out.update(metric=canonical_metric((m.get("metric") or {}).get("name")),
                   mode=ranking.get("mode", "per_layer"), topk=ranking.get("topk"),
                   shard=m.get("shard") or "0/1")
    if out["phase"] == 3:
        k = targets.get("topk")
        # A dose-response job (a list of k) is listed under its largest k; ks names them all.
        out.update(perturbation=perturbation_label(m.get("perturbation")),
                   from_scores=targets.get("from_scores"), target_mode=targets.get("mode"),
                   k=max(k) if isinstance(k, list) and k else k,
                   ks=",".join(str(v) for v in k) if isinstance(k, list) else None)
    return out


def _read_phase1(row: dict[str, Any], folder: Path) -> None:
    ev = read_record(EvalRecord, folder)
    row.update(ppl=ev.ppl, nll=ev.nll, token_accuracy=ev.token_accuracy, n_windows=ev.n_windows,
               flags="; ".join(map(str, ev.flags or [])), planted=_planted(ev.model))


def _read_phase2(row: dict[str, Any], folder: Path) -> None:
    info = check_score_file(folder / "scores.h5")
    a = info.attrs
    # The file is the authority for what was ranked (the manifest may name an alias).
    row.update(metric=canonical_metric(a.get("metric")) or row["metric"],
               mode=a.get("mode") or row["mode"], topk=a.get("topk", row["topk"]),
               n_windows=a.get("n_windows"), has_full_scores=info.has_scores,
               has_bottomk=info.has_bottomk, has_candidates=info.has_candidates,
               has_super_weights=(folder / "super_weights.json").is_file())
    if a.get("shard") not in (None, ""):
        row["shard"] = str(a["shard"])
    if row["model"] is None:
        row["model"], row["model_id"] = model_label(a.get("model_name")), a.get("model_name")
    try:
        row["n_ranked"] = read_record(ProfileRecord, folder).n_ranked
    except ResultFileError:
        row["n_ranked"] = None  # profile.json is a convenience copy; scores.h5 is the result


def _read_phase3(row: dict[str, Any], folder: Path) -> None:
    pj = read_record(PerturbationRecord, folder)
    base = pj.baseline or {}
    row.update(delta_ppl=pj.delta_ppl, delta_nll=pj.delta_nll, delta_token_accuracy=pj.delta_token_accuracy,
               n_targets=pj.n_targets, ppl=base.get("ppl"), nll=base.get("nll"),
               token_accuracy=base.get("token_accuracy"), n_windows=pj.n_windows)
    if row["perturbation"] is None:
        row["perturbation"] = perturbation_label(pj.perturbation)
    if row["k"] is None:
        row["k"] = pj.n_targets
    row["planted"] = _planted(pj.model)


def _planted(model: Any) -> str | None:
    """The planted weights a job recorded with its model (a planted positive control), ';'-joined."""
    names = (model or {}).get("planted") if isinstance(model, dict) else None
    return ";".join(map(str, names)) if names else None


_PHASE_READERS = {1: _read_phase1, 2: _read_phase2, 3: _read_phase3}


def _job_from_folder(folder: Path, run: Path) -> dict[str, Any]:
    """One row for a job folder (holding experiment_manifest.json, error.json or scores.h5)."""
    row = _empty_row()
    row["dir"] = str(folder)
    row["path"] = folder.relative_to(run).as_posix() or "."
    state = job_state(folder)
    if state.manifest is not None:
        row.update(_manifest_fields(state.manifest))
    elif state.error is not None:
        row.update(id=state.error.manifest_id, phase=state.error.phase)
    if state.record is None and (folder / "scores.h5").is_file():  # a reduced (or half-written) scores.h5
        row["phase"] = 2
    row["status"] = state.state
    if state.state == DONE:
        try:
            _PHASE_READERS[row["phase"]](row, folder)
        except (ResultFileError, KeyError) as exc:  # verified a moment ago; changed since?
            row.update(status="corrupt", reason=str(exc))
        return row
    detail = state.message if state.state != "failed" else f"{state.reason}: {state.message}".rstrip(": ")
    row["reason"] = detail or state.reason
    return row


def _job_folders(run: Path) -> list[Path]:
    """Every folder under RUN that is a job (see the module docstring), sorted."""
    found = []
    for root, dirs, files in os.walk(run):
        here = Path(root)
        # Hidden folders hold temporaries; RUN/report and RUN/manifests are not jobs.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not (here == run and d in _SKIP_DIRS))
        names = set(files)
        if names & set(_MARKERS) or "scores.h5" in names:
            found.append(here)
    return found


def _planned(run: Path) -> dict[str, tuple[Path, dict[str, Any] | None, str | None]]:
    """id -> (manifest file, manifest or None, error) for RUN/manifests/*.json."""
    out: dict[str, tuple[Path, dict[str, Any] | None, str | None]] = {}
    folder = run / "manifests"
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob("*.json")):
        try:
            m = read_json(p)
        except ResultFileError as exc:
            out[p.stem] = (p, None, str(exc))
            continue
        if not isinstance(m, dict) or "phase" not in m:
            continue  # an index or bookkeeping file of the job layer, not a manifest
        out[str(m.get("id") or p.stem)] = (p, m, None)
    return out


def _add_planned(rows: list[dict[str, Any]], run: Path) -> None:
    """Add a row for each planned manifest without a job folder (missing / incomplete)."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_id.setdefault(str(r["id"]), []).append(r)
    for job_id, (mpath, manifest, error) in _planned(run).items():
        if job_id in by_id:
            # A failed job's folder may only know its id: take the rest from the plan.
            for r in by_id[job_id]:
                for key, val in _manifest_fields(manifest or {}).items():
                    if r.get(key) is None:
                        r[key] = val
            continue
        row = _empty_row()
        if manifest is not None:
            row.update(_manifest_fields(manifest))
        row["id"] = job_id
        results = run / "results" / job_id
        row["dir"] = str(results)
        row["path"] = results.relative_to(run).as_posix()
        if error is not None:
            row.update(status="corrupt", reason=f"planned manifest {mpath.name}: {error}")
        elif results.is_dir():
            row.update(status="incomplete", reason="results folder has no experiment_manifest.json "
                                                   "(still running, or killed)")
        else:
            row.update(status="missing", reason="planned in manifests/ but no results folder")
        rows.append(row)


def _link_targets(df: pd.DataFrame, run: Path) -> None:
    """Resolve each phase-3 job's ``from_scores`` to the phase-2 job (and metric) it used.

    Paths in manifests are relative to wherever the command ran, so a job matches when the
    path names its folder: same absolute file, its manifest id as a path component, or its
    run-relative folder as the path's tail (the longest such tail wins).
    """
    p2 = df[(df["phase"] == 2) & (df["status"] == DONE)]
    cands = [(Path(d), PurePath(p).parts if p != "." else (), i, m)
             for d, p, i, m in zip(p2["dir"], p2["path"], p2["id"], p2["metric"])]
    mode_of = dict(zip(p2["id"], p2["mode"]))
    for idx in df.index[df["phase"] == 3]:
        src = df.at[idx, "from_scores"]
        if not src:
            continue
        sp = PurePath(str(src))
        best: tuple[int, Any, Any] | None = None
        for folder, rel, jid, metric in cands:
            score = -1
            if sp.is_absolute() and Path(sp) == folder / "scores.h5":
                score = 10_000
            elif jid and jid in sp.parts[:-1]:
                score = 5_000
            elif sp.parts[-len(rel) - 1:] == rel + ("scores.h5",) and len(sp.parts) > len(rel):
                score = len(rel)
            if score >= 0 and (best is None or score > best[0]):
                best = (score, jid, metric)
        if best is not None and (best[0] > 0 or len(cands) == 1):
            df.at[idx, "target_job"], df.at[idx, "target_metric"] = best[1], best[2]
            if df.at[idx, "target_mode"] is None:  # no --mode given: the ranking's own mode
                df.at[idx, "target_mode"] = mode_of.get(best[1])
        else:
            df.at[idx, "target_metric"] = _metric_of_file(sp, run)


def _metric_of_file(path: PurePath, run: Path) -> str | None:
    """Metric attribute of a score file found at `path` (absolute, or relative to a few bases)."""
    bases = [Path()] if path.is_absolute() else [Path.cwd(), run, run.parent]
    for base in bases:
        p = base / path
        try:
            return canonical_metric(check_score_file(p).attrs.get("metric"))
        except ResultFileError:
            continue
    return None


def _as_int(col: pd.Series) -> pd.Series:
    """Integer columns as pandas' nullable Int64 (so 20 prints as 20, not 20.0)."""
    num = pd.to_numeric(col, errors="coerce")
    if num.notna().sum() != col.notna().sum() or not (num.dropna() % 1 == 0).all():
        return col  # something non-integer in there: leave it as it came
    return num.astype("Int64")


def collect_jobs(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Scan RUN and return the job table (columns JOB_COLUMNS + helpers), sorted by
    phase, model, metric, mode, seed and path. Raises UserError when RUN is not a folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist or is not a folder")
    run = run.resolve()
    rows = [_job_from_folder(f, run) for f in _job_folders(run)]
    _add_planned(rows, run)
    df = pd.DataFrame(rows, columns=JOB_COLUMNS + _EXTRA_COLUMNS)
    if df.empty:
        return df
    # Phase-3 rows whose source was a user list or explicit weights keep target_metric None.
    _link_targets(df, run)
    # A phase-3 job is "about" the metric and mode of the ranking it perturbed.
    p3 = df["phase"] == 3
    df.loc[p3, "metric"] = df.loc[p3, "target_metric"]
    df.loc[p3, "mode"] = df.loc[p3, "target_mode"]
    for col in _INT_COLUMNS:
        df[col] = _as_int(df[col])
    keys = {f"_{c}": df[c].map(lambda v: "" if v is None else str(v))
            for c in ("phase", "model", "metric", "mode", "perturbation")}
    keys["_seed"] = pd.to_numeric(df["seed"], errors="coerce")
    order = df.assign(**keys).sort_values(list(keys) + ["k", "path"], na_position="last")
    return order.drop(columns=list(keys)).reset_index(drop=True)


def complete_jobs(jobs: pd.DataFrame, phase: int) -> pd.DataFrame:
    """The complete jobs of one phase."""
    if jobs.empty:
        return jobs
    return jobs[(jobs["status"] == DONE) & (jobs["phase"] == phase)]


def problem_jobs(jobs: pd.DataFrame) -> pd.DataFrame:
    """Jobs that are not complete (missing, failed, incomplete, corrupt) with their reasons."""
    if jobs.empty:
        return jobs
    return jobs[jobs["status"] != DONE]
