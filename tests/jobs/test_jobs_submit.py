"""jobs.submit without a cluster: dry runs, validation first, skip-complete, array splitting,
the local and debug executors, and resumption after a (simulated) pre-emption."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from esa.core.errors import UserError
from esa.spec.manifest import Resources
from jobs import slurm, submit
from jobs.plans import load_plan
from jobs.submit import Options

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "manifests" / "tiny"


def jobs_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m jobs ARGS` from the repository root, as `make submit` runs it."""
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("ESA_RUNS", str(root))
    monkeypatch.delenv("ESA_STOP_AFTER_BATCHES", raising=False)
    monkeypatch.delenv("ESA_MAX_ARRAY_SIZE", raising=False)
    return root


@pytest.fixture
def model_map(tiny_llama) -> dict[str, str]:
    """Plans name esa:tiny-llama; the tests use the small fixture model instead (no training)."""
    return {"esa:tiny-llama": str(tiny_llama)}


def write_plan(folder: Path, source: Path, edit=None) -> Path:
    """Copy a tiny plan (and its phase-2 sibling, for phase 3) into `folder`, optionally edited."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in TINY.glob("*.toml"):
        (folder / p.name).write_text(p.read_text())
    target = folder / source.name
    if edit:
        target.write_text(edit(target.read_text()))
    return target


def one_job_phase2(text: str) -> str:
    """tiny/phase2.toml cut down to one grad_x_weight job (2 calibration batches)."""
    text = re.sub(r"seeds = \[.*\]", "seeds = [0]", text)
    return re.sub(r"metrics = \[.*\]", 'metrics = ["grad_x_weight"]', text)


# ---------------------------------------------------------------------------------------------
def test_split_arrays_keeps_every_index_below_the_limit():
    chunks = slurm.split_arrays(list(range(10)), 4)
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert sum(chunks, []) == list(range(10))
    assert slurm.split_arrays([], 4) == []
    with pytest.raises(UserError):
        slurm.split_arrays([1], 0)


def test_max_array_size_from_scontrol_env_and_override(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text("#!/bin/sh\necho 'Configuration data as of now'\necho 'MaxArraySize            = 7'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("ESA_MAX_ARRAY_SIZE", raising=False)
    assert slurm.max_array_size() == 7
    monkeypatch.setenv("ESA_MAX_ARRAY_SIZE", "3")
    assert slurm.max_array_size() == 3
    assert slurm.max_array_size(override=5) == 5


def test_slurm_parameters_from_plan_resources():
    params = slurm.slurm_parameters(Resources(gpus=0, cpus=2, mem="500M", time="1-02:00:00", partition="gpu",
                                              account="proj", qos=None),
                                    "esa-p2", dependency="afterok:12:13", parallelism=4)
    assert params["timeout_min"] == 26 * 60 and params["cpus_per_task"] == 2
    assert "gpus_per_node" not in params  # no GPU request on CPU partitions
    assert params["mem_gb"] == pytest.approx(500 / 1024)
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "proj" and "slurm_qos" not in params
    assert params["slurm_array_parallelism"] == 4
    assert params["slurm_additional_parameters"]["dependency"] == "afterok:12:13"
    assert params["slurm_additional_parameters"]["requeue"] is True
    teardown = "\n".join(params["slurm_teardown"])  # exit 75 inside an image -> the host requeues
    assert '-eq 75' in teardown and 'scontrol requeue "${esa_task:-$SLURM_JOB_ID}"' in teardown
    assert slurm.slurm_parameters(Resources(gpus=2), "x")["gpus_per_node"] == 2
    assert "slurm_srun_args" not in params


def test_slurm_parameters_of_a_sharded_job():
    """2 nodes x 4 ranks of one GPU each: srun starts 8 tasks, and a rank that dies ends the others."""
    from esa.spec.manifest import Parallel

    params = slurm.slurm_parameters(Resources(gpus=1, cpus=8), "x", parallel=Parallel(nodes=2, gpus_per_node=4))
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)
    assert params["slurm_srun_args"] == ["--kill-on-bad-exit=1"]
    with pytest.raises(UserError, match="auto"):
        slurm.slurm_parameters(Resources(gpus="auto"), "x")


def test_the_runbook_plans_size_every_job_with_the_planner():
    """manifests/phase{1,2,3}.toml leave gpus/mem/time to the planner at 80 GB: Mixtral-8x7B is sharded over
    GPUs of one node, the 7-8B models get one GPU each, and every job fits."""
    from jobs.plans import load_plan
    from jobs.submit import slurm_arrays

    for phase in (1, 2, 3):
        run = load_plan(REPO / "manifests" / f"phase{phase}.toml", runs="/tmp/esa-plan-check")
        models = {j.manifest.model.id for j in run.jobs}
        assert len(models) == 6, models
        for job in run.jobs:
            res, par = job.manifest.resources, job.manifest.parallel
            assert not res.auto and res.gpus == 1 and res.mem.endswith("G")
            mixtral = "Mixtral" in job.manifest.model.id
            assert (par.world_size > 1) == mixtral, (job.manifest.model.id, par)
            assert par.nodes == 1
        arrays = slurm_arrays(run, run.jobs, 1001)
        assert sum(len(chunk) for _, _, chunk in arrays) == len(run.jobs)
        sharded = [(params, par) for params, par, _ in arrays if par.world_size > 1]
        assert sharded and all(p["tasks_per_node"] == par.gpus_per_node == p["gpus_per_node"] for p, par in sharded)
    assert slurm.slurm_python("/img/esa.sif") == "apptainer exec --nv /img/esa.sif python"
    assert "--cleanenv" not in slurm.slurm_python("/img/esa.sif")
    assert slurm.slurm_python(None) is None


def test_dry_run_prints_the_arrays_and_writes_nothing(runs, model_map):
    r = jobs_cli("submit", "--phase", "2", "--tiny", "--executor", "slurm", "--dry-run",
                 "--model-map", f"esa:tiny-llama={model_map['esa:tiny-llama']}", env={"ESA_MAX_ARRAY_SIZE": "4"})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "6 manifests" in out and "6 to run" in out
    assert "DRY RUN: would submit 2 array(s) (MaxArraySize 4)" in out
    assert "--array=0-3%2 (4 tasks, 1 rank)" in out and "--array=0-1%2 (2 tasks, 1 rank)" in out  # each starts at 0
    assert "timeout_min=10" in out
    job_lines = [line for line in out.splitlines() if line.strip().startswith("[")]
    assert len(job_lines) == 6 and all("planner: " in line and "GiB per rank" in line for line in job_lines)
    assert not runs.exists(), "a dry run must not write manifests or records"


def test_phase3_dry_run_waits_for_after_and_plans_the_aggregation(runs, model_map):
    r = jobs_cli("submit", "--phase", "3", "--tiny", "--dry-run", "--after", "123",
                 "--model-map", f"esa:tiny-llama={model_map['esa:tiny-llama']}")
    assert r.returncode == 0, r.stderr
    assert "'dependency': 'afterok:123'" in r.stdout
    assert "aggregation job (afterany): python -m analysis" in r.stdout
    bad = jobs_cli("submit", "--phase", "3", "--tiny", "--dry-run", "--after", "12;rm")
    assert bad.returncode == 2 and "AFTER must be Slurm job ids" in bad.stderr


def test_invalid_plan_submits_nothing(runs, tmp_path):
    plan = write_plan(tmp_path / "plans", TINY / "phase2.toml",
                      lambda t: t.replace('"act_mag"', '"grad_x_wieght"'))
    r = jobs_cli("submit", "--plan", str(plan), "--executor", "local")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one clear line, no traceback
    assert "grad_x_wieght" in r.stderr
    assert not runs.exists(), "nothing may be written or run when any manifest is invalid"


def test_submit_without_slurm_says_what_to_do(runs, monkeypatch, tmp_path):
    monkeypatch.setattr(submit, "have_slurm", lambda: False)
    with pytest.raises(UserError, match="EXECUTOR=local"):
        submit.submit(TINY / "phase1.toml", Options(executor="slurm"))
    assert not runs.exists()


def _finished(job, status: str = "complete") -> None:
    """Give a planned phase-2 job the files of a finished one (its scores.h5 made by esa's writer)."""
    from fixtures.synthetic import fake_scores, write_profile_job

    write_profile_job(job.out_dir, job.manifest.to_dict(), fake_scores(0))
    if status != "complete":
        record = json.loads((job.out_dir / "experiment_manifest.json").read_text())
        (job.out_dir / "experiment_manifest.json").write_text(json.dumps({**record, "status": status}))


def test_skip_complete_manifests(runs, model_map):
    plan = load_plan(TINY / "phase2.toml", model_map=model_map)
    assert len(plan.jobs) == 6
    for job in plan.jobs[:2]:
        _finished(job)
    _finished(plan.jobs[2], status="running")
    todo, done = submit.pending_jobs(plan)
    assert [j.id for j in done] == [j.id for j in plan.jobs[:2]]
    assert [j.id for j in todo] == [j.id for j in plan.jobs[2:]]
    record = submit.submit_jobs(plan, (todo, done), Options(executor="slurm", dry_run=True, echo=False))
    assert record["skipped_complete"] == [j.id for j in plan.jobs[:2]]
    assert sum(len(a["tasks"]) for a in record["arrays"]) == 4


def test_sharded_plan_has_reduce_groups_and_skips_reduced_jobs(runs, tmp_path, model_map):
    plan_path = write_plan(tmp_path / "plans", TINY / "phase2.toml",
                           lambda t: one_job_phase2(t).replace("[grid]", "[grid]\nshards = 2"))
    plan = load_plan(plan_path, model_map=model_map)
    assert len(plan.jobs) == 2 and len(plan.reduce) == 1
    assert {s.manifest.shard for s in plan.reduce[0].shards} == {"0/2", "1/2"}
    step = plan.reduce[0]
    from fixtures.synthetic import fake_scores, write_profile_job

    write_profile_job(step.out_dir, step.shards[0].manifest.to_dict(), fake_scores(0))
    todo, done = submit.pending_jobs(plan)
    assert todo == [] and len(done) == 2  # the reduced result exists: its shards need not run


@pytest.mark.slow
def test_local_executor_runs_the_tiny_phase1_plan(runs, model_map):
    mm = f"esa:tiny-llama={model_map['esa:tiny-llama']}"
    r = jobs_cli("submit", "--phase", "1", "--tiny", "--executor", "local", "--model-map", mm)
    assert r.returncode == 0, r.stdout + r.stderr
    run = runs / "tiny"
    results = list((run / "results").glob("*/eval.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())["ppl"] > 1.5
    records = list((run / "submissions").glob("*-phase1.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["executor"] == "local" and rec["local"][0]["ok"] is True and "commit" in rec["git"]
    st = jobs_cli("status", str(run))
    assert st.returncode == 0 and "1 manifests: 1 done" in st.stdout
    again = jobs_cli("submit", "--phase", "1", "--tiny", "--executor", "local", "--model-map", mm)
    assert again.returncode == 0 and "nothing to submit" in again.stdout


@pytest.mark.slow
def test_debug_executor_runs_in_process(runs, model_map):
    record = submit.submit(TINY / "phase1.toml", Options(executor="debug", model_map=model_map, echo=False))
    assert record["debug"] and all(o["ok"] for o in record["debug"])
    assert list((runs / "tiny" / "results").glob("*/eval.json"))


def _scores(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        assert f.attrs["complete"]
        return {name: f["scores"][name][()] for name in f["scores"]}


def _assert_stopped_once_and_resumed(record: dict, job) -> None:
    """The local submission record and the job's log say: stopped once, restarted, resumed, finished."""
    assert record["local"][0]["ok"] is True, record
    assert record["local"][0]["attempts"] == 2, "the job should have stopped once and resumed"
    assert "resuming from the checkpoint" in (job.out_dir / "esa.log").read_text()


@pytest.mark.slow
def test_local_run_resumes_after_preemption_and_matches(runs, tmp_path, model_map, monkeypatch):
    """ESA_STOP_AFTER_BATCHES=1 stops the 2-batch job after one batch (checkpoint, exit 144); the
    local executor's controller starts it again, it resumes, and its scores equal an uninterrupted run's."""
    import numpy as np

    from esa.runner import run as esa_run

    plan_path = write_plan(tmp_path / "plans", TINY / "phase2.toml", one_job_phase2)
    plan = load_plan(plan_path, model_map=model_map)
    submit.write_expanded(plan)
    (job,) = plan.jobs
    monkeypatch.setenv("ESA_STOP_AFTER_BATCHES", "1")
    record = submit.submit_jobs(plan, submit.pending_jobs(plan), Options(executor="local", echo=False))
    _assert_stopped_once_and_resumed(record, job)
    assert not (job.out_dir / "checkpoint").exists()
    monkeypatch.delenv("ESA_STOP_AFTER_BATCHES")
    reference = tmp_path / "uninterrupted"
    esa_run(job.manifest.with_outputs(dir=str(reference)))
    got, want = _scores(job.out_dir / "scores.h5"), _scores(reference / "scores.h5")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow
def test_local_executor_runs_a_sharded_plan_as_two_ranks_and_resumes(runs, tmp_path, model_map, monkeypatch):
    """manifests/tiny/sharded.toml with EXECUTOR=local: submitit's local controller starts 2 tasks per job;
    stopped after one batch, both ranks checkpoint their halves (exit 144), the controller restarts them,
    they resume, and the scores equal the uninterrupted 1-rank run's."""
    import numpy as np

    from esa.runner import run as esa_run

    plan = load_plan(TINY / "sharded.toml", model_map=model_map)
    submit.write_expanded(plan)
    job = plan.jobs[0]
    monkeypatch.setenv("ESA_STOP_AFTER_BATCHES", "1")
    record = submit.submit_jobs(plan, ([job], []), Options(executor="local", echo=False))
    _assert_stopped_once_and_resumed(record, job)
    launch = json.loads((job.out_dir / "experiment_manifest.json").read_text())["provenance"]["launch"]
    assert launch == {"launcher": "submitit-local", "world_size": 2, "sharded": True}
    monkeypatch.delenv("ESA_STOP_AFTER_BATCHES")
    reference = tmp_path / "one-rank"
    esa_run(job.manifest.with_outputs(dir=str(reference)))
    got, want = _scores(job.out_dir / "scores.h5"), _scores(reference / "scores.h5")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-5 * float(np.abs(want[name]).max()),
                                   err_msg=name)


@pytest.mark.slow
def test_esatask_in_process_hands_the_preemption_to_its_caller(runs, tmp_path, model_map, monkeypatch):
    """Without a scheduler to restart it, a pre-empted task raises Preempted (the caller exits 75);
    running it again resumes from the checkpoint."""
    from esa.core.stop import Preempted
    from jobs.task import EsaTask

    plan_path = write_plan(tmp_path / "plans", TINY / "phase2.toml", one_job_phase2)
    plan = load_plan(plan_path, model_map=model_map)
    submit.write_expanded(plan)
    (job,) = plan.jobs
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SUBMITIT_EXECUTOR",
                "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ESA_STOP_AFTER_BATCHES", "1")
    with pytest.raises(Preempted):
        EsaTask(plan.manifest_path(job))()
    assert (job.out_dir / "checkpoint").is_dir()
    monkeypatch.delenv("ESA_STOP_AFTER_BATCHES")
    result = EsaTask(job.manifest)()
    assert result["status"] == "complete"
    assert "resuming from the checkpoint" in (job.out_dir / "esa.log").read_text()
    assert (job.out_dir / "scores.h5").exists() and not (job.out_dir / "checkpoint").exists()
    assert isinstance(EsaTask(job.manifest).checkpoint(), __import__("submitit").helpers.DelayedSubmission)


def test_makefile_cluster_targets():
    text = (REPO / "Makefile").read_text()
    for target in ("submit", "status", "resubmit", "analyze", "test-slurm"):
        m = re.search(rf"^{re.escape(target)}:([^#\n]*)", text, re.MULTILINE)
        assert m and "$(STAMP)" in m.group(1), f"make {target} must depend on $(STAMP)"
    for target in ("image", "slurm-up", "slurm-down"):
        assert re.search(rf"^{re.escape(target)}:", text, re.MULTILINE), f"make {target} missing"
    r = subprocess.run(["make", "-n", "-C", str(REPO), "submit", "PHASE=2", "TINY=1", "DRY_RUN=1",
                        f"STAMP={REPO / 'Makefile'}"], capture_output=True, text=True, timeout=60)
    assert "-m jobs submit --plan manifests/tiny/phase2.toml --phase 2 --executor slurm --dry-run" in r.stdout
    r = subprocess.run(["make", "-n", "-C", str(REPO), "submit", "PHASE=3", "AFTER=77", "EXECUTOR=local",
                        f"STAMP={REPO / 'Makefile'}"], capture_output=True, text=True, timeout=60)
    assert "--plan manifests/phase3.toml --phase 3 --executor local --after 77" in " ".join(r.stdout.split())
    r = subprocess.run(["make", "-n", "-C", str(REPO), "submit", "PHASE=2", "TRUST_REMOTE_CODE=1",
                        f"STAMP={REPO / 'Makefile'}"], capture_output=True, text=True, timeout=60)
    assert "--trust-remote-code" in r.stdout
    r = subprocess.run(["make", "-n", "-C", str(REPO), "analyze", "RUN=runs/x", "STRICT=1",
                        f"STAMP={REPO / 'Makefile'}"], capture_output=True, text=True, timeout=60)
    assert "-m analysis runs/x --strict" in r.stdout
