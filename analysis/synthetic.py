"""Fabricated result folders in the exact layout esa jobs write, for tests and benchmarks.

Nothing here runs a model: score tensors are drawn from a seeded numpy generator, and the
``topk/``, ``bottomk/`` and ``stats/`` groups of ``scores.h5`` are derived from them the way
esa ranks (per_layer: top-k within each tensor, rank 1..k per tensor; global: over all
tensors). The tests check that esa's own reader (esa.scorefile) accepts these files.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = ["TINY_SHAPES", "manifest", "fake_scores", "write_scores_h5", "write_profile_job",
           "write_baseline_job", "write_perturb_job", "write_failed_job", "truncate",
           "fabricate_run", "EXAMPLE_SHAPES", "peaked_scores", "example_run"]

# A miniature llama: parameter name -> shape.
TINY_SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (32, 8),
    **{f"model.layers.{i}.{n}": s for i in range(2) for n, s in (
        ("self_attn.q_proj.weight", (8, 8)), ("mlp.down_proj.weight", (8, 16)),
        ("input_layernorm.weight", (8,)))},
    "lm_head.weight": (32, 8),
}
_STR = h5py.string_dtype("utf-8")


def _id(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def manifest(phase: int, *, model: str = "tiny", seed: int = 0, metric: str | None = None,
             mode: str = "per_layer", topk: int = 3, shard: str = "0/1",
             perturbation: str | None = None, from_scores: str | None = None,
             k: int | None = None, controls: Sequence[str] = (), experiment: str = "test",
             out_dir: str = "") -> dict[str, Any]:
    """A job manifest of the shape esa.runner records (id = hash of the rest)."""
    m: dict[str, Any] = {
        "schema_version": 1, "phase": phase, "experiment": experiment,
        "model": {"id": model, "revision": None, "dtype": "fp32", "device": "cpu",
                  "attention": "auto", "trust_remote_code": False},
        "data": {"dataset": "builtin", "config": None, "split": None, "text_field": "text",
                 "seq_len": 16, "max_samples": 4, "batch_size": 1}, "seed": seed}
    if phase == 2:
        m.update(metric={"name": metric}, ranking={"mode": mode, "topk": topk}, shard=shard)
    if phase == 3:
        m.update(perturbation={"name": perturbation or "zero", "params": {}},
                 targets={"weights": [], "list": None, "from_scores": from_scores, "topk": k,
                          "mode": mode}, controls={"names": list(controls), "repeats": 5})
    m["id"] = _id(m)
    m["outputs"] = {"dir": out_dir}
    return m


def fake_scores(seed: int, shapes: Mapping[str, tuple[int, ...]] = TINY_SHAPES
                ) -> dict[str, np.ndarray]:
    """Non-negative float32 score tensors drawn from ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return {n: rng.random(s).astype(np.float32) for n, s in shapes.items()}


def _rank(scores: Mapping[str, np.ndarray], k: int, mode: str, largest: bool = True
          ) -> list[tuple[str, tuple[int, ...], int, float, int]]:
    """(param, index, flat_index, score, rank) rows as esa ranks them."""
    def order(flat: np.ndarray) -> np.ndarray:
        return np.argsort(-flat if largest else flat, kind="stable")

    rows = []
    if mode == "per_layer":
        for name, t in scores.items():
            flat = t.reshape(-1).astype(np.float64)
            for r, fi in enumerate(order(flat)[:k], start=1):
                rows.append((name, tuple(int(i) for i in np.unravel_index(fi, t.shape)), int(fi),
                             float(flat[fi]), r))
        return rows
    pool = [(name, int(fi), float(v)) for name, t in scores.items()
            for fi, v in enumerate(t.reshape(-1).astype(np.float64))]
    pool.sort(key=lambda x: -x[2] if largest else x[2])
    for r, (name, fi, v) in enumerate(pool[:k], start=1):
        rows.append((name, tuple(int(i) for i in np.unravel_index(fi, scores[name].shape)), fi, v, r))
    return rows


def _write_ranked(g: h5py.Group, rows: list[tuple[str, tuple[int, ...], int, float, int]],
                  mode: str, k: int, largest: bool) -> None:
    n = len(rows)
    ndim = np.array([len(r[1]) for r in rows], dtype=np.int8)
    index = np.full((n, max(1, int(ndim.max()) if n else 1)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        index[i, : len(r[1])] = r[1]
    g.create_dataset("param", data=np.array([r[0] for r in rows], dtype=object), dtype=_STR)
    g.create_dataset("flat_index", data=np.array([r[2] for r in rows], dtype=np.int64))
    g.create_dataset("index", data=index)
    g.create_dataset("ndim", data=ndim)
    g.create_dataset("score", data=np.array([r[3] for r in rows], dtype=np.float64))
    g.create_dataset("value", data=np.zeros(n, dtype=np.float64))
    g.create_dataset("rank", data=np.array([r[4] for r in rows], dtype=np.int64))
    g.attrs["mode"], g.attrs["k"], g.attrs["largest"] = mode, int(k), bool(largest)


def write_scores_h5(path: Path, scores: Mapping[str, np.ndarray], *, man: dict[str, Any],
                    k: int, mode: str, save_full: bool = True, complete: bool = True) -> Path:
    """A scores.h5 in esa's format from full score tensors (``complete`` False leaves the
    flag unset, as a job killed mid-write would)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", track_order=True) as f:
        a = f.attrs
        a["format"], a["format_version"], a["esa_version"] = "esa-scores", 1, "0.1.0"
        a["metric"], a["manifest_id"] = man["metric"]["name"], man["id"]
        a["manifest_json"] = json.dumps(man, sort_keys=True)
        a["model_name"], a["model_revision"], a["model_dtype"] = man["model"]["id"], "", "fp32"
        a["mode"], a["topk"], a["shard"] = mode, int(k), man.get("shard", "0/1")
        a["n_windows"], a["seed"] = 4, int(man["seed"])
        a["score_dtype"], a["save"] = "float32", "full" if save_full else "topk"
        if save_full:
            g = f.create_group("scores", track_order=True)
            for name, t in scores.items():
                g.create_dataset(name, data=t)
        _write_ranked(f.create_group("topk"), _rank(scores, k, mode), mode, k, True)
        _write_ranked(f.create_group("bottomk"), _rank(scores, k, mode, False), mode, k, False)
        st = f.create_group("stats")
        names = list(scores)
        st.create_dataset("name", data=np.array(names, dtype=object), dtype=_STR)
        for col, fn in (("numel", lambda t: t.size), ("mean", np.mean), ("std", np.std),
                        ("min", np.min), ("max", np.max)):
            st.create_dataset(col, data=np.array([fn(scores[n].astype(np.float64)) for n in names]))
        f.create_dataset("unscored", data=np.array([], dtype=object), dtype=_STR)
        if complete:
            f.attrs["complete"] = True
    return path


def _record(folder: Path, man: dict[str, Any], summary: Mapping[str, Any]) -> None:
    man = {**man, "outputs": {"dir": str(folder)}}
    (folder / "experiment_manifest.json").write_text(json.dumps(
        {"manifest": man, "provenance": {"esa_version": "0.1.0"}, "status": "complete",
         "summary": dict(summary)}, indent=1))
    (folder / "esa.log").write_text("fabricated\n")


def write_profile_job(folder: Path, man: dict[str, Any], scores: Mapping[str, np.ndarray],
                      *, save_full: bool = True,
                      super_weights: list[dict[str, Any]] | None = None) -> Path:
    """A finished phase-2 job folder: scores.h5, profile.json, experiment_manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    k, mode = int(man["ranking"]["topk"]), man["ranking"]["mode"]
    write_scores_h5(folder / "scores.h5", scores, man=man, k=k, mode=mode, save_full=save_full)
    n_ranked = len(_rank(scores, k, mode))
    (folder / "profile.json").write_text(json.dumps({"metric": man["metric"]["name"], "mode": mode,
                                                     "topk": k, "n_ranked": n_ranked}))
    if super_weights is not None:
        (folder / "super_weights.json").write_text(json.dumps(super_weights))
    _record(folder, man, {"metric": man["metric"]["name"], "n_ranked": n_ranked})
    return folder


def write_baseline_job(folder: Path, man: dict[str, Any], *, ppl: float, nll: float,
                       accuracy: float, flags: Sequence[str] = ()) -> Path:
    """A finished phase-1 job folder (eval.json + experiment_manifest.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    ev = {"ppl": ppl, "nll": nll, "token_accuracy": accuracy, "n_tokens": 60, "n_windows": 4,
          "flags": list(flags), "per_window_nll": [nll] * 4, "per_window_accuracy": [accuracy] * 4,
          "model": man["model"], "data": {"n_windows": 4, "seq_len": 16, "fingerprint": "f00"},
          "manifest_id": man["id"]}
    (folder / "eval.json").write_text(json.dumps(ev))
    _record(folder, man, {"ppl": ppl})
    return folder


def write_perturb_job(folder: Path, man: dict[str, Any], *, base_ppl: float, delta_ppl: float | None,
                      controls: Mapping[str, Sequence[float | None]], n_targets: int,
                      p_values: Mapping[str, float] | None = None) -> Path:
    """A finished phase-3 job folder; ΔNLL = log(1 + ΔPPL / PPL) as esa's figures imply.

    ``delta_ppl`` None stands for a non-finite result (JSON null), as esa writes it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base_nll = float(np.log(base_ppl))
    pert_ppl = None if delta_ppl is None else base_ppl + delta_ppl
    dnll = None if pert_ppl is None else float(np.log(pert_ppl)) - base_nll
    ctrl = {}
    for name, deltas in controls.items():
        fin = np.array([d for d in deltas if d is not None], dtype=float)
        ctrl[name] = {"deltas": list(deltas), "n": len(deltas), "n_nan": 0,
                      "mean": float(fin.mean()) if fin.size else None,
                      "std": float(fin.std(ddof=1)) if fin.size > 1 else None,
                      "p_value": (p_values or {}).get(name, 0.5), "z": 1.0, "draws": len(deltas),
                      "nll": {"mean": 0.0, "p_value": 0.5}}
    pj = {"perturbation": man["perturbation"], "n_targets": n_targets, "targets": [],
          "applied": [], "baseline": {"ppl": base_ppl, "nll": base_nll, "token_accuracy": 0.5},
          "perturbed": {"ppl": pert_ppl, "nll": None if dnll is None else base_nll + dnll,
                        "token_accuracy": 0.4},
          "delta_ppl": delta_ppl, "delta_nll": dnll, "delta_token_accuracy": -0.1,
          "delta_nll_ci": None if dnll is None else {"low": dnll - 0.01, "high": dnll + 0.01,
                                                     "alpha": 0.05, "n_boot": 100,
                                                     "method": "paired"},
          "controls": ctrl, "baseline_per_window_nll": [base_nll] * 4,
          "perturbed_per_window_nll": [base_nll] * 4, "n_windows": 4, "n_tokens": 60,
          "seconds": 0.1, "data": {}, "model": man["model"], "manifest_id": man["id"]}
    (folder / "perturbation.json").write_text(json.dumps(pj))
    _record(folder, man, {"delta_ppl": delta_ppl})
    return folder


def write_failed_job(folder: Path, man: dict[str, Any], *, kind: str = "out_of_memory",
                     message: str = "CUDA out of memory") -> Path:
    """A job folder holding only error.json and a log, as esa.runner leaves a failed job."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.json").write_text(json.dumps({
        "manifest_id": man["id"], "phase": man["phase"], "kind": kind, "type": "RuntimeError",
        "message": message, "traceback": [], "start_time": "", "end_time": ""}))
    (folder / "esa.log").write_text("failed\n")
    return folder


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to a fraction of its size (a job killed while copying it)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def fabricate_run(root: Path, *, models: Sequence[str] = ("tiny-a", "tiny-b"),
                  metrics: Sequence[str] = ("grad_x_weight", "magnitude", "act_mag", "grad_squared"),
                  seeds: Sequence[int] = (0, 1, 2, 3, 4), ks: Sequence[int] = (1, 2, 5, 10, 20),
                  perturbations: Sequence[str] = ("zero", "sign_flip"),
                  shapes: Mapping[str, tuple[int, ...]] = TINY_SHAPES) -> int:
    """A job-layer run folder (manifests/ + results/<id>/) with every phase; returns the job
    count. Phase-3 jobs use seed 0's ranking of each metric and perturb with every seed."""
    root = Path(root)
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    n = 0

    def plan(m: dict[str, Any]) -> Path:
        nonlocal n
        n += 1
        (root / "manifests" / f"{m['id']}.json").write_text(json.dumps(m))
        return root / "results" / m["id"]

    for mi, model in enumerate(models):
        man = manifest(1, model=model)
        write_baseline_job(plan(man), man, ppl=20.0 + mi, nll=float(np.log(20.0 + mi)), accuracy=0.3)
        sources = {}
        for si, metric in enumerate(metrics):
            for seed in seeds:
                man = manifest(2, model=model, metric=metric, seed=seed, topk=max(ks))
                # Seeds of one metric share most of their scores: realistic partial overlap.
                base = fake_scores(1000 * mi + si, shapes)
                noise = fake_scores(1000 * mi + 100 * si + seed + 1, shapes)
                scores = {p: 0.8 * base[p] + 0.2 * noise[p] for p in base}
                folder = plan(man)
                write_profile_job(folder, man, scores)
                if seed == seeds[0]:
                    sources[metric] = os.path.relpath(folder / "scores.h5", root)
        for metric in metrics:
            for pert in perturbations:
                for k in ks:
                    for seed in seeds:
                        man = manifest(3, model=model, seed=seed, perturbation=pert, k=k,
                                       from_scores=sources[metric], controls=("random_k",))
                        rng = np.random.default_rng(zlib.crc32(f"{model}|{metric}|{pert}|{k}|{seed}".encode()))
                        write_perturb_job(plan(man), man, base_ppl=20.0 + mi,
                                          delta_ppl=float(k * rng.uniform(1, 2)),
                                          controls={"random_k": rng.uniform(0, 1, 5).tolist()},
                                          n_targets=k * len(shapes))
    return n


# ------------------------------------------------------------------ the example run
# A small run whose every statistic can be worked out by hand (the tests do).

EXAMPLE_SHAPES: dict[str, tuple[int, ...]] = {
    "model.layers.0.mlp.down_proj.weight": (2, 3),
    "model.layers.1.mlp.down_proj.weight": (2, 3),
    "lm_head.weight": (2, 2),
}
_L0, _L1, _HEAD = EXAMPLE_SHAPES


def peaked_scores(tops: Mapping[str, tuple[int, ...]],
                  shapes: Mapping[str, tuple[int, ...]] = EXAMPLE_SHAPES) -> dict[str, np.ndarray]:
    """Scores 0.01 * (flat index + 1) everywhere except 1.0 at each tensor's chosen top.

    Only the tensors named in ``tops`` are scored (as a metric that scores a subset would).
    """
    out = {}
    for name, top in tops.items():
        t = (0.01 * (np.arange(int(np.prod(shapes[name]))) + 1)).reshape(shapes[name])
        t[top] = 1.0
        out[name] = t.astype(np.float32)
    return out


def example_run(root: Path) -> dict[str, Any]:
    """Write the example run (job-layer layout) and return facts the tests check.

    Phase 1: one baseline. Phase 2 (per_layer, k=1): grad_x_weight seeds 0, 1, 2 and data
    shards 0/2, 1/2 of seed 0; magnitude seeds 0, 1 (identical); super_weight seed 0 (down
    projections only) with one candidate; grad_squared seed 0 with a TRUNCATED scores.h5;
    act_mag seed 0 FAILED (error.json). Phase 3 from grad_x_weight seed 0: zero at k=1
    (seeds 0, 1; ΔPPL 10 and 14) and k=2 (seed 0; ΔPPL 30), sign_flip from magnitude at k=1
    with a non-finite ΔPPL, and one planned job that never ran (MISSING).
    """
    root = Path(root)
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {"ids": {}}

    def plan(name: str, m: dict[str, Any]) -> Path:
        (root / "manifests" / f"{m['id']}.json").write_text(json.dumps(m))
        facts["ids"][name] = m["id"]
        return root / "results" / m["id"]

    m = manifest(1)
    write_baseline_job(plan("baseline", m), m, ppl=20.0, nll=float(np.log(20.0)), accuracy=0.3125)
    grad_tops = {0: {_L0: (0, 0), _L1: (0, 0), _HEAD: (0, 0)},
                 1: {_L0: (0, 0), _L1: (0, 1), _HEAD: (0, 0)},
                 2: {_L0: (1, 0), _L1: (0, 0), _HEAD: (0, 0)}}
    for seed, tops in grad_tops.items():
        m = manifest(2, metric="grad_x_weight", seed=seed, topk=1)
        write_profile_job(plan(f"grad_seed{seed}", m), m, peaked_scores(tops))
    for i, tops in enumerate(({_L0: (0, 0), _L1: (0, 0), _HEAD: (0, 0)},
                              {_L0: (0, 1), _L1: (0, 0), _HEAD: (0, 0)})):
        m = manifest(2, metric="grad_x_weight", seed=0, topk=1, shard=f"{i}/2")
        write_profile_job(plan(f"grad_shard{i}", m), m, peaked_scores(tops))
    for seed in (0, 1):
        m = manifest(2, metric="magnitude", seed=seed, topk=1)
        write_profile_job(plan(f"mag_seed{seed}", m), m,
                          peaked_scores({_L0: (0, 0), _L1: (1, 2), _HEAD: (1, 1)}))
    m = manifest(2, metric="super_weight", seed=0, topk=1)
    cand = {"rank": 0, "layer": 1, "param": _L1, "expert": None, "row": 1, "col": 2,
            "index": [1, 2], "weight": f"{_L1}:1,2", "input_spike": 5.0, "output_spike": -40.0,
            "weight_value": 0.25}
    write_profile_job(plan("super_weight", m), m, peaked_scores({_L0: (1, 2), _L1: (1, 2)}),
                      super_weights=[cand])
    m = manifest(2, metric="grad_squared", seed=0, topk=1)
    folder = write_profile_job(plan("truncated", m), m, peaked_scores(grad_tops[0]))
    truncate(folder / "scores.h5")
    m = manifest(2, metric="act_mag", seed=0, topk=1)
    write_failed_job(plan("failed", m), m)
    source = f"results/{facts['ids']['grad_seed0']}/scores.h5"
    controls = {"random_k": [1.0, 2.0, 3.0, 4.0], "bottom_k": [0.5]}
    for name, seed, k, delta in (("zero_k1_s0", 0, 1, 10.0), ("zero_k1_s1", 1, 1, 14.0),
                                 ("zero_k2_s0", 0, 2, 30.0)):
        m = manifest(3, seed=seed, perturbation="zero", from_scores=source, k=k,
                     controls=list(controls))
        write_perturb_job(plan(name, m), m, base_ppl=20.0, delta_ppl=delta, controls=controls,
                          n_targets=3 * k, p_values={"random_k": 0.2, "bottom_k": 0.5})
    m = manifest(3, perturbation="sign_flip", k=1, controls=["random_k"],
                 from_scores=f"results/{facts['ids']['mag_seed0']}/scores.h5")
    write_perturb_job(plan("sign_flip_inf", m), m, base_ppl=20.0, delta_ppl=None,
                      controls={"random_k": [1.0, None, 3.0]}, n_targets=3)
    m = manifest(3, seed=7, perturbation="zero", from_scores=source, k=5)
    plan("missing", m)
    return facts
