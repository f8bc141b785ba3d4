"""analysis.collect: job discovery, statuses and reasons, figures copied from result files;
the analysis package never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.collect import collect_jobs, problem_jobs
from esa.results.records import ResultFileError
from esa.results.scorefile import check_score_file
from fixtures.synthetic import example_run, fake_scores, manifest, write_failed_job, write_profile_job
from esa.core.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return root, example_run(root)


def _row(jobs, job_id):
    rows = jobs[jobs["id"] == job_id]
    assert len(rows) == 1, job_id
    return rows.iloc[0]


def test_analysis_never_imports_torch():
    code = ("import sys, analysis, analysis.report, fixtures.synthetic, esa.cli.analyze\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'transformers' not in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_statuses_and_reasons(run):
    root, facts = run
    jobs = collect_jobs(root)
    ids = facts["ids"]
    assert len(jobs) == len(ids)
    problems = problem_jobs(jobs).set_index("id")
    assert set(problems.index) == {ids["truncated"], ids["failed"], ids["missing"]}
    assert problems.loc[ids["truncated"], "status"] == "corrupt"
    assert "truncated" in problems.loc[ids["truncated"], "reason"]
    assert problems.loc[ids["failed"], "status"] == "failed"
    assert problems.loc[ids["failed"], "reason"] == "out_of_memory: RuntimeError: CUDA out of memory"
    # The failed folder holds only error.json: its metric comes from the planned manifest.
    assert problems.loc[ids["failed"], "metric"] == "act_mag"
    assert problems.loc[ids["missing"], "status"] == "missing"
    assert "no results folder" in problems.loc[ids["missing"], "reason"]


def test_figures_equal_source_files(run):
    root, facts = run
    jobs = collect_jobs(root)
    ids = facts["ids"]
    base = _row(jobs, ids["baseline"])
    ev = json.loads((root / "results" / ids["baseline"] / "eval.json").read_text())
    assert (base["ppl"], base["nll"], base["token_accuracy"]) == (ev["ppl"], ev["nll"], ev["token_accuracy"])
    p3 = _row(jobs, ids["zero_k2_s0"])
    pj = json.loads((root / "results" / ids["zero_k2_s0"] / "perturbation.json").read_text())
    assert p3["delta_ppl"] == pj["delta_ppl"] == 30.0
    assert p3["delta_nll"] == pj["delta_nll"]
    assert p3["k"] == 2 and p3["n_targets"] == 6
    # from_scores "results/<id>/scores.h5" links the job to the ranking it perturbed.
    assert p3["target_job"] == ids["grad_seed0"]
    assert p3["metric"] == "grad_x_weight" and p3["mode"] == "per_layer"
    assert _row(jobs, ids["sign_flip_inf"])["metric"] == "magnitude"
    shard = _row(jobs, ids["grad_shard1"])
    assert shard["shard"] == "1/2" and shard["topk"] == 1 and shard["n_ranked"] == 3


def test_any_folder_tree_and_stale_manifest(tmp_path):
    # An `esa profile --seeds` style tree (no manifests/ folder), nested jobs included.
    m0 = manifest(2, metric="magnitude", seed=0)
    write_profile_job(tmp_path / "P" / "seed_0", m0, fake_scores(0))
    m1 = manifest(2, metric="magnitude", seed=1)
    write_profile_job(tmp_path / "P" / "seed_1", m1, fake_scores(1))
    # A rerun that failed after an earlier success: error.json is newer and wins.
    time.sleep(0.01)
    write_failed_job(tmp_path / "P" / "seed_1", m1, kind="exception", message="boom")
    later = time.time() + 5
    os.utime(tmp_path / "P" / "seed_1" / "error.json", (later, later))
    # The opposite order: an old error.json, then a success (the runner removes it, but a
    # copy of the folder may still carry it).
    m2 = manifest(2, metric="magnitude", seed=2)
    write_failed_job(tmp_path / "P" / "seed_2", m2)
    os.utime(tmp_path / "P" / "seed_2" / "error.json", (1, 1))
    write_profile_job(tmp_path / "P" / "seed_2", m2, fake_scores(2))
    # scores.h5 present but complete never set, and no experiment_manifest.json.
    m3 = manifest(2, metric="magnitude", seed=3)
    write_profile_job(tmp_path / "P" / "seed_3", m3, fake_scores(3))
    (tmp_path / "P" / "seed_3" / "experiment_manifest.json").unlink()
    jobs = collect_jobs(tmp_path).set_index("path")
    assert jobs.loc["P/seed_0", "status"] == "done"
    assert jobs.loc["P/seed_1", "status"] == "failed"
    assert jobs.loc["P/seed_1", "reason"] == "exception: RuntimeError: boom"
    assert jobs.loc["P/seed_1", "metric"] == "magnitude"  # from the stale manifest
    assert jobs.loc["P/seed_2", "status"] == "done"
    assert jobs.loc["P/seed_3", "status"] == "incomplete"


def test_incomplete_flag_and_experiment_manifest_status(tmp_path):
    m = manifest(2, metric="magnitude")
    folder = write_profile_job(tmp_path / "a", m, fake_scores(0))
    import h5py

    with h5py.File(folder / "scores.h5", "r+") as f:
        del f.attrs["complete"]
    m1 = manifest(1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "experiment_manifest.json").write_text(json.dumps({"manifest": m1, "status": "running"}))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "experiment_manifest.json").write_text("{not json")
    jobs = collect_jobs(tmp_path).set_index("path")
    assert jobs.loc["a", "status"] == "corrupt" and "complete=True" in jobs.loc["a", "reason"]
    assert jobs.loc["b", "status"] == "incomplete" and "'running'" in jobs.loc["b", "reason"]
    assert jobs.loc["c", "status"] == "corrupt" and "not valid JSON" in jobs.loc["c", "reason"]
    with pytest.raises(ResultFileError, match="complete=True"):
        check_score_file(folder / "scores.h5")


def test_missing_run_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        collect_jobs(tmp_path / "nope")


def test_synthetic_score_files_match_esa_reader(tmp_path):
    """The fabricated files (esa's writer) read back as the brute-force ranking they were built from."""
    from esa.results.scorefile import open_score_file
    from fixtures.synthetic import _rank

    m = manifest(2, metric="grad_x_weight", mode="global", topk=7)
    folder = write_profile_job(tmp_path / "j", m, fake_scores(5))
    ours = _rank(fake_scores(5), 7, "global")
    with open_score_file(folder / "scores.h5") as sf:
        theirs = sf.topk()
        assert sf.manifest()["id"] == m["id"]
    assert theirs.mode == ours.mode == "global" and theirs.k == ours.k == 7
    assert list(theirs.param) == ours.param and list(theirs.index) == ours.index
    assert list(theirs.score) == list(ours.score) and list(theirs.rank) == list(ours.rank)
