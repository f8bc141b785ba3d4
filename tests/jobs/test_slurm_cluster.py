"""Integration tests against the real single-node Slurm cluster of `make slurm-up`.

They check the cluster's properties the job layer relies on (arrays, accounting, two jobs
at once, MaxArraySize, requeue) and slurm/esa_array.sbatch end to end, with the stand-in
slurm/testing/esa_standin.py in place of `python -m esa run`.

Run:  bash slurm/slurm-up.sh && .venv/bin/python -m pytest -q -m slurm tests/test_slurm_cluster.py
Without a responding cluster every test is skipped, unless ESA_REQUIRE_SLURM=1 (as in
`make test-slurm`), which turns the skip into a failure so CI cannot pass by skipping.
Every wait is bounded; jobs a test submitted are cancelled when it ends.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO / "slurm" / "esa_array.sbatch"
STANDIN = REPO / "slurm" / "testing" / "esa_standin.py"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def _run(args: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def submitted(cluster):
    """A list the test appends its job ids to; they are cancelled at the end, whatever happens."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def sbatch(args: list[str], cwd: Path, submitted: list[str], env: dict | None = None) -> str:
    r = _run(["sbatch", "--parsable", *args], cwd=cwd, env=env)
    assert r.returncode == 0, f"sbatch {args} failed: {r.stderr}"
    job_id = r.stdout.strip().split(";")[0]
    submitted.append(job_id)
    return job_id


def sacct_states(job_id: str, duplicates: bool = False) -> dict[str, list[str]]:
    """{'123_0': ['REQUEUED', 'COMPLETED'], ...}: states per (array) job, oldest first."""
    args = ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"]
    if duplicates:
        args.insert(1, "-D")
    r = _run(args)
    out: dict[str, list[str]] = {}
    if r.returncode != 0:
        return out
    for line in r.stdout.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        if "[" in jid:  # still-pending part of an array, e.g. 12_[1-2]
            continue
        out.setdefault(jid, []).append(state.split()[0])  # "CANCELLED by 0" -> CANCELLED
    return out


def wait_terminal(job_id: str, expected: set[str], timeout: float) -> dict[str, str]:
    """Poll sacct until exactly the `expected` job ids have a terminal final state."""
    deadline = time.monotonic() + timeout
    last: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        last = sacct_states(job_id)
        final = {j: s[-1] for j, s in last.items()}
        if set(final) >= expected and all(final[j] in TERMINAL for j in expected):
            return {j: final[j] for j in expected}
        time.sleep(1)
    squeue = _run(["squeue", "-a"]).stdout
    pytest.fail(f"job {job_id} not finished after {timeout:.0f}s: sacct {last}\nsqueue:\n{squeue}")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def show_config() -> dict[str, str]:
    r = _run(["scontrol", "show", "config"])
    assert r.returncode == 0, r.stderr
    conf = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(\w+)\s+=\s+(.*)$", line)
        if m:
            conf[m.group(1)] = m.group(2).strip()
    return conf


def standin_env() -> dict[str, str]:
    # run the stand-in with this interpreter: it then does not depend on its exec bit
    return {**os.environ, "ESA_PYTHON": f"{sys.executable} {STANDIN}"}


def write_manifests(tmp: Path, specs: list[dict]) -> Path:
    """Manifests under tmp/manifests and an index of paths relative to it; returns the index."""
    mdir = tmp / "manifests"
    mdir.mkdir(parents=True, exist_ok=True)
    lines = []
    for spec in specs:
        (mdir / f"{spec['id']}.json").write_text(json.dumps({"out_dir": str(tmp / "out"), **spec}))
        lines.append(f"{spec['id']}.json")
    index = mdir / "index.txt"
    index.write_text("\n".join(lines) + "\n")
    return index


def expected_acc(steps: int) -> int:  # what the stand-in accumulates over an uninterrupted run
    return sum(i * i + 1 for i in range(steps))


# --------------------------------------------------------------------------------------
# the cluster itself
# --------------------------------------------------------------------------------------

def test_array_of_three_tasks_completes(tmp_path, submitted):
    script = tmp_path / "task.sh"
    script.write_text("#!/bin/bash\necho \"$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID\" "
                      "> \"done_$SLURM_ARRAY_TASK_ID\"\n")
    job = sbatch(["--array=0-2", "--output=arr_%A_%a.out", str(script)], tmp_path, submitted)
    states = wait_terminal(job, {f"{job}_{i}" for i in range(3)}, timeout=120)
    assert set(states.values()) == {"COMPLETED"}, states
    for i in range(3):
        assert (tmp_path / f"done_{i}").read_text().split() == [job, str(i)]


def test_two_one_cpu_jobs_run_at_once(tmp_path, submitted):
    cpus = int(_run(["sinfo", "-h", "-N", "-o", "%c"]).stdout.split()[0])
    if cpus < 2:
        pytest.skip(f"the node has {cpus} CPU; two 1-CPU jobs cannot overlap")
    # Each job announces itself and waits (bounded) for the other: both end COMPLETED only
    # if they ran at the same time. No --mem: this checks that DefMemPerCPU leaves room.
    script = tmp_path / "pair.sh"
    script.write_text(
        "#!/bin/bash\n"
        "touch \"started_$1\"\n"
        "for i in $(seq 120); do [ -e \"started_$2\" ] && exit 0; sleep 0.5; done\n"
        "echo \"job $1 never saw job $2 running\" >&2; exit 1\n")
    common = ["-n1", "-c1", "--time=5"]
    a = sbatch([*common, "--output=pair_a.out", str(script), "a", "b"], tmp_path, submitted)
    b = sbatch([*common, "--output=pair_b.out", str(script), "b", "a"], tmp_path, submitted)
    sa = wait_terminal(a, {a}, timeout=120)
    sb = wait_terminal(b, {b}, timeout=120)
    assert sa[a] == sb[b] == "COMPLETED", (
        f"the two 1-CPU jobs did not overlap ({sa}, {sb}); DefMemPerCPU/CPUs of the node?")


def test_max_array_size_is_readable_and_enforced(tmp_path, submitted):
    conf = show_config()
    assert "MaxArraySize" in conf, "scontrol show config has no MaxArraySize"
    max_size = int(conf["MaxArraySize"])
    assert max_size >= 2
    # the limit is on the index: the largest allowed index is MaxArraySize - 1
    r = _run(["sbatch", "--parsable", f"--array={max_size}", "--output=/dev/null",
              "--wrap", "true"], cwd=tmp_path)
    if r.returncode == 0:
        submitted.append(r.stdout.strip().split(";")[0])
    assert r.returncode != 0, f"index {max_size} accepted although MaxArraySize={max_size}"
    job = sbatch([f"--array={max_size - 1}", "--output=/dev/null", "--wrap", "true"],
                 tmp_path, submitted)
    assert wait_terminal(job, {f"{job}_{max_size - 1}"}, timeout=60) == {
        f"{job}_{max_size - 1}": "COMPLETED"}


def test_requeue_and_accounting_are_enabled(cluster):
    conf = show_config()
    assert conf.get("JobRequeue") == "1", conf.get("JobRequeue")
    assert conf.get("AccountingStorageType") == "accounting_storage/slurmdbd"


# --------------------------------------------------------------------------------------
# slurm/esa_array.sbatch with the stand-in
# --------------------------------------------------------------------------------------

def test_esa_array_runs_one_manifest_per_task(tmp_path, submitted):
    index = write_manifests(tmp_path, [
        {"id": "m0", "steps": 3, "step_seconds": 0.1},
        {"id": "m1", "steps": 3, "step_seconds": 0.1},
        {"id": "m2", "steps": 3, "step_seconds": 0.1},
        {"id": "bad", "fail": True},
    ])
    workdir = tmp_path / "submit"  # manifests are found relative to the index file's folder
    workdir.mkdir()
    job = sbatch(["--array=0-3", str(SBATCH_SCRIPT), str(index)], workdir, submitted,
                 env=standin_env())
    states = wait_terminal(job, {f"{job}_{i}" for i in range(4)}, timeout=180)
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED",
                      f"{job}_2": "COMPLETED", f"{job}_3": "FAILED"}, states
    for i in range(3):
        result = json.loads((tmp_path / "out" / f"m{i}.result.json").read_text())
        assert result["array_task"] == str(i)
        assert result["acc"] == expected_acc(3)
        # one log per task, named by %A_%a
        assert f"manifests/m{i}.json" in (workdir / f"esa_{job}_{i}.out").read_text()
    assert "exited with status 3" in (workdir / f"esa_{job}_3.out").read_text()


def test_esa_array_usr1_checkpoints_requeues_and_resumes(tmp_path, submitted):
    steps = 60  # 60 x 0.25 s: long enough to be interrupted, short enough for CI
    index = write_manifests(tmp_path, [{"id": "long", "steps": steps, "step_seconds": 0.25}])
    job = sbatch(["--array=0", str(SBATCH_SCRIPT), str(index)], tmp_path, submitted,
                 env=standin_env())
    task = f"{job}_0"
    progress = tmp_path / "out" / "long.progress"

    def running_a_while():
        try:
            return int(progress.read_text() or 0) >= 4
        except (FileNotFoundError, ValueError):
            return False

    wait_for(running_a_while, 90, f"task {task} to start and make progress")
    # what --signal=B:USR1@120 does before the time limit, sent by hand now
    r = _run(["scancel", "--signal=USR1", "--batch", task])
    assert r.returncode == 0, r.stderr

    result_file = tmp_path / "out" / "long.result.json"
    # requeue round trip ~20 s with cred_expire=10, then ~15 s of remaining work
    wait_for(result_file.exists, 180, f"the requeued task {task} to finish")
    result = json.loads(result_file.read_text())
    assert result["starts"] == 2, result
    assert 0 < result["resumed_from"] < steps, result   # resumed, not restarted from 0
    assert result["acc"] == expected_acc(steps), result  # same as an uninterrupted run

    wait_terminal(job, {task}, timeout=60)
    history = wait_for(lambda: (h := sacct_states(job, duplicates=True).get(task)) and
                       h[-1] in TERMINAL and h, 60, "sacct to record both attempts")
    assert history == ["REQUEUED", "COMPLETED"], history
    log = (tmp_path / f"esa_{job}_0.out").read_text()  # --open-mode=append: both attempts
    assert "requeueing" in log and "restart 1" in log and "resuming from step" in log, log
