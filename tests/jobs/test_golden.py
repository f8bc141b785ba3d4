"""Recorded golden files, as submitit records its sbatch scripts: for every plan in manifests/, the
expanded jobs' ids, one expanded manifest, and the submitit parameters and sbatch script of its
first array. A change to any of them is a change users' runs see; it must be deliberate:

    ESA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/jobs/test_golden.py   # then review the diff
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "plans"
PLANS = sorted(p.relative_to(REPO / "manifests") for p in (REPO / "manifests").rglob("*.toml"))
RUNS = "/golden-runs"  # a fixed runs root: phase-3 manifests name phase-2 results by absolute path
UPDATE = os.environ.get("ESA_UPDATE_GOLDEN") == "1"


def sbatch_text(params: dict, folder: Path, n_tasks: int, monkeypatch) -> str:
    """The sbatch script submitit writes for an array of n_tasks with these parameters."""
    import submitit
    from submitit.slurm import slurm

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    executor.update_parameters(**params)
    inner = executor._executor
    if n_tasks > 1:
        inner.parameters["map_count"] = n_tasks
    text = inner._make_submission_file_text(inner._submitit_command_str, "uid")
    return text.replace(sys.executable, "PYTHON").replace(str(folder), "RUN/submitit")


def record(plan: Path, monkeypatch) -> dict:
    from jobs.plans import load_plan
    from jobs.submit import slurm_arrays

    run = load_plan(REPO / "manifests" / plan, runs=RUNS)
    arrays = slurm_arrays(run, run.jobs, limit=1001)
    first = run.jobs[0].manifest.to_dict()
    return {"plan": str(plan), "n_jobs": len(run.jobs), "ids": [j.id for j in run.jobs],
            "first_manifest": first, "first_id": run.jobs[0].id,
            "arrays": [{"ids": [j.id for j in chunk], "submitit_parameters": params,
                        "sbatch": sbatch_text(params, run.layout.submitit_dir, len(chunk), monkeypatch).splitlines()}
                       for params, _, chunk in arrays]}


@pytest.mark.parametrize("plan", PLANS, ids=[str(p) for p in PLANS])
def test_plan_matches_its_golden_record(plan, monkeypatch):
    path = GOLDEN / (str(plan).replace("/", "__").removesuffix(".toml") + ".json")
    got = json.loads(json.dumps(record(plan, monkeypatch)))
    if UPDATE:
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert path.is_file(), f"no golden record {path.name}: run with ESA_UPDATE_GOLDEN=1 and review it"
    want = json.loads(path.read_text())
    for key in want:
        assert got[key] == want[key], f"{plan}: {key} differs from {path.name}"
    assert set(got) == set(want)
