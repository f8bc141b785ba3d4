"""The demo pipeline, local and offline: built-in tiny model -> phase 1 -> phase 2 (two metrics
x two seeds) -> phase 3 (zero and sign_flip against controls) -> the offline analysis report.

Every step is a manifest run through esa.runner, exactly as an array task on a cluster runs
it; the run folder has the job layer's layout (RUN/results/<job>/), so `make analyze` works
on it too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from esa.logs import get_logger
from esa.manifest import SCHEMA_VERSION, manifest_id
from esa.runner import run
from esa.tiny import BUILTIN_TRAIN_STEPS

log = get_logger("demo")

METRICS = ("grad_x_weight", "act_mag")
SEEDS = (0, 1)
PERTURBATIONS = ({"name": "zero", "params": {}}, {"name": "sign_flip", "params": {"scale": 1.0}})


def runs_root() -> Path:
    """$ESA_RUNS, else ./runs."""
    return Path(os.environ.get("ESA_RUNS") or "runs")


def _job(root: Path, phase: int, model: dict[str, Any], data: dict[str, Any], seed: int,
         **sections: Any) -> dict[str, Any]:
    manifest = {"schema_version": SCHEMA_VERSION, "phase": phase, "experiment": "demo", "model": model,
                "data": data, "seed": seed, **sections, "outputs": {"dir": ""}}
    job_id = manifest_id(manifest)
    manifest["outputs"] = {**sections.pop("outputs", {}), "dir": str(root / "results" / job_id)}
    return manifest


def run_demo(out_dir: str | None = None, train_steps: int = BUILTIN_TRAIN_STEPS, seq_len: int = 128,
             max_samples: int = 64, topk: int = 8, control_repeats: int = 20) -> Path:
    """Run the whole pipeline into the run folder; returns the path of report.html."""
    from esa.tiny import builtin_tiny_model

    root = Path(out_dir) if out_dir else runs_root() / "demo"
    model_dir = builtin_tiny_model("llama", train_steps=train_steps)
    model = {"id": str(model_dir), "revision": None, "dtype": "fp32", "device": "cpu",
             "attention": "auto", "trust_remote_code": False}
    evaluation = {"dataset": "builtin", "config": None, "split": "validation", "text_field": "text",
                  "seq_len": seq_len, "max_samples": max_samples, "batch_size": 8}
    calibration = {**evaluation, "split": "train", "max_samples": 16, "pool_size": 256, "batch_size": 4}

    log.info("demo 1/4: baseline")
    baseline = _job(root, 1, model, evaluation, 0)
    run(baseline)
    eval_json = str(Path(baseline["outputs"]["dir"]) / "eval.json")

    log.info("demo 2/4: profiling (%s x seeds %s)", ", ".join(METRICS), SEEDS)
    profiles = []
    for metric in METRICS:
        for seed in SEEDS:
            job = _job(root, 2, model, calibration, seed, metric={"name": metric, "probes": 1},
                       ranking={"mode": "global", "topk": topk}, shard="0/1",
                       outputs={"export_topk_csv": True, "export_stats": True, "save_plots": False})
            run(job)
            profiles.append(job)

    log.info("demo 3/4: perturbation of the top-%d weights against random_k and bottom_k", topk)
    for job in (p for p in profiles if p["seed"] == SEEDS[0]):
        scores = str(Path(job["outputs"]["dir"]) / "scores.h5")
        for pert in PERTURBATIONS:
            run(_job(root, 3, model, evaluation, job["seed"], perturbation=pert,
                     targets={"weights": [], "list": None, "from_scores": scores, "topk": topk, "mode": "global"},
                     controls={"names": ["random_k", "bottom_k"], "repeats": control_repeats},
                     baseline={"eval_json": eval_json}, outputs={"save_plots": True}))

    log.info("demo 4/4: offline analysis")
    from analysis import build_report

    return build_report(root)
