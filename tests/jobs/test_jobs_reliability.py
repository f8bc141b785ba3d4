"""Issue #12 in the job layer, without a cluster: never twice (lock, queued manifests), phase 3 chained
per task and checked against its phase-2 inputs, statuses with their reasons, manifests that carry
their id, trust_remote_code behind a flag, and one line when Slurm or a folder cannot be used.
(The same on the real cluster: tests/jobs/test_slurm_reliability.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esa.results.layout import RunLayout
from fixtures.synthetic import fake_scores, write_profile_job
from jobs import status, submit
from jobs.plans import load_plan, write_expanded
from jobs.submit import Options

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "manifests" / "tiny"


def jobs_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The error line of a command that must fail with exactly one line on stderr and no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("ESA_RUNS", str(root))
    monkeypatch.delenv("ESA_STOP_AFTER_BATCHES", raising=False)
    return root


@pytest.fixture
def model_map(tiny_llama) -> dict[str, str]:
    return {"esa:tiny-llama": str(tiny_llama)}


def _record(run: Path, phase: int, tasks: dict[str, str], name: str = "20250101T000000.000000Z") -> None:
    """A Slurm submission record: manifest id -> task id."""
    path = run / "submissions" / f"{name}-phase{phase}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, list] = {}
    for mid, task in tasks.items():
        arrays.setdefault(task.split("_")[0], []).append({"index": int(task.split("_")[1]), "job": task,
                                                          "manifest_id": mid})
    path.write_text(json.dumps({"phase": phase, "executor": "slurm", "arrays": [
        {"job_id": a, "tasks": t} for a, t in arrays.items()]}))


def _fake_queue(monkeypatch, queue: dict[str, tuple[str, str]]) -> None:
    """squeue answers `queue`; sacct knows nothing yet (a fresh submission)."""
    monkeypatch.setattr(submit, "queue_states", lambda ids, timeout=30: dict(queue))
    monkeypatch.setattr(status, "queue_states", lambda ids, timeout=30: dict(queue))
    monkeypatch.setattr(status, "sacct_states", lambda ids, timeout=60: {})


# --------------------------------------------------------------------------- never twice (item 2)
def test_a_second_submission_waits_for_the_lock_then_gives_up_in_one_line(runs, model_map):
    layout = RunLayout(runs / "tiny")
    mm = f"esa:tiny-llama={model_map['esa:tiny-llama']}"
    with layout.submission_lock():
        t0 = time.monotonic()
        r = jobs_cli("submit", "--phase", "1", "--tiny", "--executor", "local", "--model-map", mm,
                     env={"ESA_SUBMIT_LOCK_TIMEOUT": "2"})
    assert time.monotonic() - t0 < 60
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "waiting for another submission" in r.stderr
    assert f"pid {os.getpid()}" in r.stderr.splitlines()[-1] and "still running" in r.stderr.splitlines()[-1]
    assert not (layout.root / "results").exists(), "nothing may run while another submission holds the run"


def test_queued_or_running_manifests_are_not_submitted_again(runs, model_map, monkeypatch):
    plan = load_plan(TINY / "phase2.toml", model_map=model_map)
    write_expanded(plan)
    ids = [j.id for j in plan.jobs]
    _record(plan.layout.root, 2, {ids[0]: "30_0", ids[1]: "30_1"})
    _fake_queue(monkeypatch, {"30_0": ("RUNNING", ""), "30_1": ("PENDING", "Priority")})
    record = submit.submit_jobs(plan, submit.pending_jobs(plan), Options(executor="slurm", dry_run=True, echo=False))
    sent = [t["manifest_id"] for a in record["arrays"] for t in a["tasks"]]
    assert sent == ids[2:] and record["skipped_queued"] == sorted(ids[:2])
    # make resubmit right after a submit: sacct does not know the tasks yet, squeue does -> nothing to send
    sent_again = []
    monkeypatch.setattr(submit, "submit_jobs", lambda run, sel, opts: sent_again.extend(j.id for j in sel[0]) or {})
    rows = {r.manifest_id: r for r in status.collect(plan.layout)}
    assert (rows[ids[0]].state, rows[ids[0]].message) == ("running", "")
    assert (rows[ids[1]].state, rows[ids[1]].message) == ("pending", "Priority")
    submit.resubmit(plan.layout.root, Options(executor="slurm", dry_run=True, echo=False))
    assert ids[0] not in sent_again and ids[1] not in sent_again


# ------------------------------------------------------------------ phase 3 and its inputs (8, 9)
def _phase3_run(runs: Path, model_map, monkeypatch):
    p2 = load_plan(TINY / "phase2.toml", model_map=model_map)
    write_expanded(p2)
    p3 = load_plan(TINY / "phase3.toml", model_map=model_map)
    write_expanded(p3)
    gxw = [j for j in p2.jobs if j.manifest.metric.name == "grad_x_weight"]  # seeds 0, 1, 2: the rankings
    write_profile_job(gxw[0].out_dir, gxw[0].manifest.to_dict(), fake_scores(0))  # done
    _record(p2.layout.root, 2, {gxw[1].id: "77_1", gxw[2].id: "77_2"})  # 1 queued, 2 failed and gone
    _fake_queue(monkeypatch, {"77_1": ("PENDING", "Priority")})
    return p2, p3, gxw


def test_phase3_chains_each_task_on_its_own_ranking_and_names_missing_ones(runs, model_map, monkeypatch):
    p2, p3, gxw = _phase3_run(runs, model_map, monkeypatch)
    record = submit.submit_jobs(p3, submit.pending_jobs(p3), Options(executor="slurm", dry_run=True, echo=False))
    by_dep = {a["dependency"]: sorted(t["manifest_id"] for t in a["tasks"]) for a in record["arrays"]}
    needs = {j.id: j.needs[0] for j in p3.jobs}
    assert by_dep == {None: sorted(m for m, n in needs.items() if n == gxw[0].id),
                      "afterok:77_1": sorted(m for m, n in needs.items() if n == gxw[1].id)}
    assert record["skipped_missing_inputs"] == sorted(m for m, n in needs.items() if n == gxw[2].id)


def test_phase3_without_any_phase2_result_is_refused_before_submitting(runs, model_map):
    mm = f"esa:tiny-llama={model_map['esa:tiny-llama']}"
    for extra in ([], ["--dry-run"]):
        line = one_line_error(jobs_cli("submit", "--phase", "3", "--tiny", "--model-map", mm, "--executor", "local",
                                       *extra))
        assert "need phase-2 results that are neither done nor queued" in line and "grad_x_weight" in line
        assert "make submit PHASE=2" in line
    assert not list(runs.glob("*/submissions/*")), "nothing may be submitted"


def test_phase3_resubmitted_from_files_finds_its_inputs(runs, model_map, monkeypatch):
    """resubmit rebuilds jobs from manifest files (no `needs`): the ranking is found from targets.from_scores."""
    p2, p3, gxw = _phase3_run(runs, model_map, monkeypatch)
    from esa.spec.plan import Job

    rebuilt = [Job(j.manifest, {}) for j in p3.jobs]
    assert [submit.input_ids(j) for j in rebuilt] == [j.needs for j in p3.jobs]


# ------------------------------------------------------------------------- statuses (item 10)
def test_local_outcomes_give_state_and_reason(tmp_path):
    empty = tmp_path / "never-started"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    host = socket.gethostname()
    assert status.classify(empty, None, {"state": "failed", "ok": False, "reason": "killed", "message": "m"}
                           )[:2] == ("failed", "killed")
    assert status.classify(empty, None, {"state": "failed", "ok": False, "reason": "exception"})[:2] == (
        "failed", "exception")
    assert status.classify(empty, None, {"state": "running", "pid": os.getpid(), "host": host})[0] == "running"
    state, reason, message = status.classify(empty, None, {"state": "running", "pid": dead.pid, "host": host})
    assert (state, reason) == ("failed", "killed") and str(dead.pid) in message


def test_a_killed_local_submission_shows_failed_killed(runs, tmp_path, model_map):
    """kill -9 of `make submit EXECUTOR=local` while its job runs: the record written as the job started
    makes status say failed (killed), not missing."""
    plan_dir = tmp_path / "plans"
    plan_dir.mkdir()
    text = (TINY / "phase2.toml").read_text().replace("seeds = [0, 1, 2]", "seeds = [0]")
    text = text.replace('metrics = ["grad_x_weight", "act_mag"]', 'metrics = ["grad_x_weight"]')
    text = text.replace("max_samples = 8", "max_samples = 2000").replace("pool_size = 32", "pool_size = 2000")
    text = text.replace("batch_size = 4", "batch_size = 1").replace("seq_len = 64", "seq_len = 16")
    (plan_dir / "phase2.toml").write_text(text)
    mm = f"esa:tiny-llama={model_map['esa:tiny-llama']}"
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "submit", "--plan", str(plan_dir / "phase2.toml"),
                             "--executor", "local", "--model-map", mm], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = runs / "tiny"
    try:
        deadline = time.monotonic() + 240
        while "calibration windows" not in "".join(p.read_text() for p in run.glob("results/*/esa.log")):
            assert time.monotonic() < deadline and proc.poll() is None, "the job never reached its batch loop"
            time.sleep(0.3)
        (row,) = status.collect(run, use_sacct=False)
        assert row.state == "running" and str(proc.pid) in row.message
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    (row,) = status.collect(run, use_sacct=False)
    assert (row.state, row.reason) == ("failed", "killed"), row
    r = jobs_cli("status", str(run), "--no-sacct")
    assert "failed" in r.stdout and "killed" in r.stdout and "missing" not in r.stdout.split("manifests:")[0]


# ----------------------------------------------------------- manifests that can be trusted (13)
def test_an_edited_manifest_without_its_id_is_refused(runs, model_map):
    plan = load_plan(TINY / "phase1.toml", model_map=model_map)
    write_expanded(plan)
    (job,) = plan.jobs
    path = plan.manifest_path(job)
    doc = json.loads(path.read_text())
    del doc["id"]
    doc["model"]["trust_remote_code"] = True
    path.write_text(json.dumps(doc))
    r = subprocess.run([sys.executable, "-m", "esa", "run", str(path)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "has no id" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not job.out_dir.exists(), "the edited manifest must not run"
    (row,) = status.collect(plan.layout, use_sacct=False)
    assert (row.state, row.reason) == ("corrupt", "invalid_manifest") and "has no id" in row.message
    out = submit.resubmit(plan.layout.root, Options(executor="local", echo=False))
    assert out == [] and not job.out_dir.exists()
    doc["id"] = job.id  # an id that is no longer the content's hash is refused too
    path.write_text(json.dumps(doc))
    (row,) = status.collect(plan.layout, use_sacct=False)
    assert row.reason == "invalid_manifest" and "edited after expansion" in row.message


def test_trust_remote_code_needs_the_flag_at_submit_time(runs, tmp_path, model_map):
    plan_dir = tmp_path / "plans"
    plan_dir.mkdir()
    text = (TINY / "phase1.toml").read_text().replace('device = "cpu"', 'device = "cpu"\ntrust_remote_code = true')
    (plan_dir / "phase1.toml").write_text(text)
    mm = f"esa:tiny-llama={model_map['esa:tiny-llama']}"
    line = one_line_error(jobs_cli("submit", "--plan", str(plan_dir / "phase1.toml"), "--executor", "slurm",
                                   "--dry-run", "--model-map", mm))
    assert "trust_remote_code" in line and "--trust-remote-code" in line
    r = jobs_cli("submit", "--plan", str(plan_dir / "phase1.toml"), "--executor", "slurm", "--dry-run",
                 "--trust-remote-code", "--model-map", mm)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------- one clear line (14)
def _fake_slurm(tmp_path: Path, scontrol: str, sbatch: str) -> dict:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, body in (("scontrol", scontrol), ("sbatch", sbatch), ("squeue", "exit 0"), ("sacct", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_submitting_while_slurmctld_is_down_is_one_line_at_once(runs, tmp_path, model_map):
    env = _fake_slurm(tmp_path, 'echo "Slurmctld(primary) at localhost is DOWN"; exit 1',
                      'sleep 20; echo "sbatch: error: Batch job submission failed: Unable to contact slurm '
                      'controller (connect failure)" >&2; exit 1')
    mm = f"esa:tiny-llama={model_map['esa:tiny-llama']}"
    t0 = time.monotonic()
    line = one_line_error(jobs_cli("submit", "--phase", "1", "--tiny", "--model-map", mm, env=env))
    assert time.monotonic() - t0 < 15
    assert "Slurm controller does not answer" in line and "DOWN" in line


def test_sbatch_refusing_a_submission_is_one_line(runs, tmp_path, model_map):
    env = _fake_slurm(tmp_path, 'echo "Slurmctld(primary) at localhost is UP"',
                      'echo "sbatch: error: Batch job submission failed: Unable to contact slurm controller '
                      '(connect failure)" >&2; exit 1')
    mm = f"esa:tiny-llama={model_map['esa:tiny-llama']}"
    line = one_line_error(jobs_cli("submit", "--phase", "1", "--tiny", "--model-map", mm, env=env))
    assert "sbatch refused the submission: sbatch: error: Batch job submission failed" in line
    assert "nothing was submitted" in line


def test_read_only_runs_root_is_one_line(make_readonly, model_map):
    ro = make_readonly("runs-ro")
    mm = f"esa:tiny-llama={model_map['esa:tiny-llama']}"
    line = one_line_error(jobs_cli("submit", "--phase", "1", "--tiny", "--executor", "local", "--model-map", mm,
                                   env={"ESA_RUNS": str(ro / "runs")}))
    assert str(ro) in line and ("Read-only" in line or "Permission denied" in line)
