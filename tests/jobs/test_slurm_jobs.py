"""The job layer against the real single-node Slurm cluster of `make slurm-up`.

* the tiny PHASE=2 plan (2 metrics x 3 seeds) goes out as one real array through submitit;
  every task is stopped once after one batch (ESA_STOP_AFTER_BATCHES=1), requeued, resumed,
  and its scores equal an uninterrupted run's; one task made to fail shows as failed in
  `status`, and `resubmit` sends only that one (these tasks leave the requeue to the batch
  script, as inside an image without scontrol);
* `scancel --signal=USR2 <job>` checkpoints, requeues (scontrol from inside) and resumes a
  running task;
* phase 2 -> phase 3 -> aggregation (`python -m analysis RUN`) run in order by dependencies.

The plans' model esa:tiny-llama is mapped to the small fixture model (no 1500-step training).
Run: make test-slurm (starts the cluster if `sinfo` does not answer). Without a cluster these
tests skip, unless ESA_REQUIRE_SLURM=1 (as in make test-slurm). Every wait is bounded, and the
jobs a test submitted are cancelled when it ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "manifests" / "tiny"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


@pytest.fixture
def env(cluster, tmp_path, tiny_llama):
    """Environment for `python -m jobs`: a private runs root; the fixture model for esa:tiny-llama."""
    runs = tmp_path / "runs"
    e = {**os.environ, "ESA_RUNS": str(runs)}
    e.pop("ESA_STOP_AFTER_BATCHES", None)
    e["_MODEL"] = str(tiny_llama)
    yield e
    # cancel whatever this test submitted and left behind
    ids = set()
    for rec in runs.glob("*/submissions/*.json"):
        data = json.loads(rec.read_text())
        ids |= {str(a["job_id"]) for a in data.get("arrays", []) if a.get("job_id")}
        ids |= {str(r["job_id"]) for r in data.get("reduce", []) if r.get("job_id")}
        if data.get("analysis"):
            ids.add(str(data["analysis"]["job_id"]))
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=30)


def jobs_cli(env: dict, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**env, **(extra_env or {})}
    r = subprocess.run([sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True,
                       env=full, timeout=300)
    return r


def submit_tiny(env: dict, phase: int, *extra: str, extra_env: dict | None = None) -> dict:
    r = jobs_cli(env, "submit", "--phase", str(phase), "--tiny", "--executor", "slurm",
                 "--model-map", f"esa:tiny-llama={env['_MODEL']}", *extra, extra_env=extra_env)
    assert r.returncode == 0, f"submit failed:\n{r.stdout}\n{r.stderr}"
    return newest_record(Path(env["ESA_RUNS"]) / "tiny", phase)


def newest_record(run: Path, phase: int) -> dict:
    records = sorted((run / "submissions").glob(f"*-phase{phase}.json"))
    assert records, f"no phase-{phase} submission record in {run}"
    return json.loads(records[-1].read_text())


def sacct(job_ids: list[str], duplicates: bool = False) -> list[tuple[str, str, str, str]]:
    """(JobID, State, Start, End) lines for the given (array) job ids."""
    args = ["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "--format=JobID,State,Start,End"]
    if duplicates:
        args.insert(1, "-D")
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    return [tuple(line.split("|")[:4]) for line in r.stdout.splitlines() if line.count("|") >= 3]


def wait_finished(job_ids: list[str], timeout: float, expect_tasks: int | None = None) -> dict[str, str]:
    """Wait until squeue no longer lists the jobs; returns {JobID: final state} from sacct."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["squeue", "-h", "-o", "%F", "-j", ",".join(job_ids)], capture_output=True,
                           text=True, timeout=30)
        lines = sacct(job_ids)
        states = {j: s.split()[0] for j, s, _, _ in lines if "[" not in j}
        if not set(r.stdout.split()) & set(job_ids) and all(s not in ACTIVE for s in states.values()) \
                and (expect_tasks is None or len(states) >= expect_tasks):
            return states
        time.sleep(2)
    squeue = subprocess.run(["squeue", "-a"], capture_output=True, text=True, timeout=30).stdout
    pytest.fail(f"jobs {job_ids} not finished after {timeout:.0f} s\nsacct: {sacct(job_ids)}\nsqueue:\n{squeue}")


def status_rows(env: dict, run: Path) -> dict[str, dict]:
    r = jobs_cli(env, "status", str(run), "--json")
    assert r.returncode == 0, r.stderr
    return {row["manifest_id"]: row for row in json.loads(r.stdout)}


def scores(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        assert f.attrs["complete"]
        return {name: f["scores"][name][()] for name in f["scores"]}


def assert_same_scores_as_uninterrupted(out_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    from esa.runner import run as esa_run

    record = json.loads((out_dir / "experiment_manifest.json").read_text())
    manifest = record["manifest"]
    reference = tmp_path / f"reference-{manifest['id']}"
    esa_run({**manifest, "outputs": {**manifest["outputs"], "dir": str(reference)}})
    got, want = scores(out_dir / "scores.h5"), scores(reference / "scores.h5")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{manifest['id']} {name}")


# ---------------------------------------------------------------------------------------------
def test_phase2_array_preempted_failed_and_resubmitted(env, tmp_path):
    t0 = time.monotonic()
    run = Path(env["ESA_RUNS"]) / "tiny"
    # Expand first (dry run writes nothing) to learn the ids; block one task's output folder with
    # a plain file so that this task fails (esa cannot create its folder), the others not.
    dry = jobs_cli(env, "submit", "--phase", "2", "--tiny", "--dry-run",
                   "--model-map", f"esa:tiny-llama={env['_MODEL']}")
    assert dry.returncode == 0, dry.stderr
    ids = [line.split()[1] for line in dry.stdout.splitlines() if line.strip().startswith("[")]
    assert len(ids) == 6
    victim = ids[4]
    (run / "results").mkdir(parents=True)
    (run / "results" / victim).write_text("not a folder")

    # ESA_SELF_REQUEUE=0: the tasks exit 75 and the batch script's teardown requeues them (the
    # path taken inside an image without scontrol); the USR2 test below covers self-requeue.
    record = submit_tiny(env, 2, extra_env={"ESA_STOP_AFTER_BATCHES": "1", "ESA_SELF_REQUEUE": "0"})
    assert len(record["arrays"]) == 1, "6 tasks must go out as one array"
    array = record["arrays"][0]
    assert [t["index"] for t in array["tasks"]] == list(range(6))
    states = wait_finished([array["job_id"]], timeout=300, expect_tasks=6)
    assert states[f"{array['job_id']}_4"] == "FAILED", states
    assert sum(s == "COMPLETED" for s in states.values()) == 5, states

    # every healthy task stopped after one batch, was requeued and finished on its second start
    history: dict[str, list[str]] = {}
    for jid, state, _, _ in sacct([array["job_id"]], duplicates=True):
        history.setdefault(jid, []).append(state.split()[0])
    for index in (0, 1, 2, 3, 5):
        assert history[f"{array['job_id']}_{index}"] == ["REQUEUED", "COMPLETED"], history

    rows = status_rows(env, run)
    assert rows[victim]["state"] == "failed" and rows[victim]["reason"] == "exception", rows[victim]
    assert sum(r["state"] == "done" for r in rows.values()) == 5
    text = jobs_cli(env, "status", str(run)).stdout
    assert "6 manifests: 5 done, 1 failed" in text

    for mid in (ids[0], ids[3]):  # one of each metric
        assert_same_scores_as_uninterrupted(run / "results" / mid, tmp_path)

    # fix the cause and resubmit: only the failed task goes out again
    (run / "results" / victim).unlink()
    r = jobs_cli(env, "resubmit", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    again = newest_record(run, 2)
    assert [t["manifest_id"] for a in again["arrays"] for t in a["tasks"]] == [victim]
    job = again["arrays"][0]["tasks"][0]["job"]
    wait_finished([again["arrays"][0]["job_id"]], timeout=180, expect_tasks=1)
    rows = status_rows(env, run)
    assert all(r["state"] == "done" for r in rows.values()), rows
    assert rows[victim]["job"] == job
    print(f"phase-2 array + preemption + resubmit: {time.monotonic() - t0:.0f} s")


def test_usr2_signal_checkpoints_requeues_and_resumes(env, tmp_path):
    """A real signal, as Slurm sends it before the time limit or on pre-emption."""
    t0 = time.monotonic()
    run = Path(env["ESA_RUNS"]) / "tiny"
    plans = tmp_path / "plans"
    plans.mkdir()
    for p in TINY.glob("*.toml"):
        (plans / p.name).write_text(p.read_text())
    # one grad_x_weight job of 800 one-window batches (5-20 s): long enough to be caught mid-loop
    text = (plans / "phase2.toml").read_text()
    text = text.replace("seeds = [0, 1, 2]", "seeds = [0]").replace('metrics = ["grad_x_weight", "act_mag"]',
                                                                  'metrics = ["grad_x_weight"]')
    text = text.replace("max_samples = 8", "max_samples = 800").replace("pool_size = 32", "pool_size = 800")
    text = text.replace("batch_size = 4", "batch_size = 1")
    (plans / "phase2.toml").write_text(text)
    r = jobs_cli(env, "submit", "--plan", str(plans / "phase2.toml"), "--executor", "slurm",
                 "--model-map", f"esa:tiny-llama={env['_MODEL']}")
    assert r.returncode == 0, r.stdout + r.stderr
    record = newest_record(run, 2)
    task = record["arrays"][0]["tasks"][0]
    out = run / "results" / task["manifest_id"]
    # esa logs "... calibration windows" just before its batch loop (EsaTask installed its
    # USR1/USR2 handlers before that); signal a moment later, while batches are running
    deadline = time.monotonic() + 120
    while "calibration windows" not in ((out / "esa.log").read_text() if (out / "esa.log").exists() else ""):
        assert time.monotonic() < deadline, "the task never reached its batch loop"
        time.sleep(0.1)
    time.sleep(1.0)
    sig = subprocess.run(["scancel", "--signal=USR2", task["job"]], capture_output=True, text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr
    wait_finished([record["arrays"][0]["job_id"]], timeout=240, expect_tasks=1)
    history = [s.split()[0] for _, s, _, _ in sacct([record["arrays"][0]["job_id"]], duplicates=True)]
    assert history == ["REQUEUED", "COMPLETED"], history
    log = (out / "esa.log").read_text()
    assert "resuming from the checkpoint" in log, log[-2000:]
    assert_same_scores_as_uninterrupted(out, tmp_path)
    print(f"USR2 -> requeue -> resume: {time.monotonic() - t0:.0f} s")


def test_phase2_then_phase3_then_aggregation_by_dependencies(env, tmp_path):
    t0 = time.monotonic()
    run = Path(env["ESA_RUNS"]) / "tiny"
    p2 = submit_tiny(env, 2)
    p3 = submit_tiny(env, 3)  # the phase-2 array is still queued: phase 3 waits for it (afterok)
    p2_id = p2["arrays"][0]["job_id"]
    assert p3["dependency"] == f"afterok:{p2_id}", p3["dependency"]
    p3_id = p3["arrays"][0]["job_id"]
    assert p3.get("analysis"), "phase 3 must be followed by the aggregation job"
    agg_id = p3["analysis"]["job_id"]
    assert p3["analysis"]["dependency"] == f"afterany:{p3_id}"
    wait_finished([p2_id, p3_id, agg_id], timeout=480, expect_tasks=13)
    lines = sacct([p2_id, p3_id, agg_id])
    final = {j: s.split()[0] for j, s, _, _ in lines}
    assert all(s == "COMPLETED" for s in final.values()), final
    p2_end = max(e for j, _, _, e in lines if j.startswith(f"{p2_id}_"))
    p3_start = min(s for j, _, s, _ in lines if j.startswith(f"{p3_id}_"))
    p3_end = max(e for j, _, _, e in lines if j.startswith(f"{p3_id}_"))
    agg_start = next(s for j, _, s, _ in lines if j == agg_id)
    assert p2_end <= p3_start <= p3_end <= agg_start, (p2_end, p3_start, p3_end, agg_start)  # ISO times sort
    rows = status_rows(env, run)
    assert len(rows) == 12 and all(r["state"] == "done" for r in rows.values()), rows
    assert (run / "report" / "report.html").exists(), "the aggregation job wrote no report"
    print(f"phase 2 -> 3 -> aggregation chain: {time.monotonic() - t0:.0f} s")


def test_sharded_plan_runs_as_one_job_of_two_tasks_equal_to_one_rank(env, tmp_path):
    """manifests/tiny/sharded.toml (parallel = 2 ranks per node): `make submit` sends each manifest as
    one Slurm job of 2 tasks that srun starts; the ranks find each other from Slurm's variables, and
    the scores equal the 1-rank run's."""
    import numpy as np

    from esa.runner import run as esa_run

    t0 = time.monotonic()
    run = Path(env["ESA_RUNS"]) / "tiny-sharded"
    r = jobs_cli(env, "submit", "--plan", str(TINY / "sharded.toml"), "--executor", "slurm",
                 "--model-map", f"esa:tiny-llama={env['_MODEL']}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 ranks (1 node(s) x 2)" in r.stdout
    record = newest_record(run, 2)
    array = record["arrays"][0]
    assert array["slurm_parameters"]["tasks_per_node"] == 2 and array["slurm_parameters"]["nodes"] == 1
    states = wait_finished([array["job_id"]], timeout=300, expect_tasks=2)
    assert all(s == "COMPLETED" for s in states.values()), states
    for task in array["tasks"]:
        out = run / "results" / task["manifest_id"]
        job = json.loads((out / "experiment_manifest.json").read_text())
        assert job["provenance"]["launch"] == {"launcher": "slurm", "world_size": 2, "sharded": True}
        # both tasks of the job's step ran (srun writes one log per task)
        logs = sorted((run / "submitit").rglob(f"{task['job']}_*_log.err"))
        assert len(logs) == 2, logs
        manifest = job["manifest"]
        reference = tmp_path / f"one-rank-{manifest['id']}"
        esa_run({**manifest, "outputs": {**manifest["outputs"], "dir": str(reference)}})
        got, want = scores(out / "scores.h5"), scores(reference / "scores.h5")
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-5 * float(np.abs(want[name]).max()),
                                       err_msg=f"{manifest['id']} {name}")
    print(f"sharded plan on Slurm: {time.monotonic() - t0:.0f} s")
