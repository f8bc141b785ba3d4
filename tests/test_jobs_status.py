"""jobs.status: the status table from fabricated result folders and sacct lines; resubmit selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import status
from jobs.status import FAILED, MISSING, PENDING, PREEMPTED, RUNNING, DONE


def _manifest(run: Path, mid: str, phase: int = 2, seed: int = 0) -> dict:
    m = {"id": mid, "phase": phase, "model": {"id": "esa:tiny-llama"}, "metric": {"name": "magnitude"},
         "seed": seed, "data": {"dataset": "builtin"}, "outputs": {"dir": str(run / "results" / mid)}}
    (run / "manifests").mkdir(parents=True, exist_ok=True)
    (run / "manifests" / f"{mid}.json").write_text(json.dumps(m))
    return m


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def run(tmp_path) -> Path:
    """A run with one manifest in every state the files alone can show."""
    run = tmp_path / "runs" / "exp"
    for mid in ("done", "exc", "oom", "ckpt", "missing", "usererr"):
        _manifest(run, mid)
    res = run / "results"
    _write(res / "done" / "experiment_manifest.json", {"status": "complete"})
    _write(res / "exc" / "error.json", {"kind": "exception", "type": "RuntimeError", "message": "boom"})
    _write(res / "oom" / "error.json", {"kind": "out_of_memory", "type": "OutOfMemoryError", "message": "CUDA out of memory"})
    (res / "ckpt" / "checkpoint").mkdir(parents=True)
    _write(res / "ckpt" / "error.json", {"kind": "preempted", "type": "Preempted", "message": "stopped"})
    _write(res / "usererr" / "error.json", {"kind": "user_error", "type": "UserError", "message": "bad metric"})
    (run / "manifests" / "index-phase2.txt").write_text("ignored\n")
    return run


def test_status_from_result_files_only(run):
    rows = {r.manifest_id: r for r in status.collect(run, use_sacct=False)}
    assert set(rows) == {"done", "exc", "oom", "ckpt", "missing", "usererr"}  # the index file is not a manifest
    assert (rows["done"].state, rows["done"].reason) == (DONE, "")
    assert (rows["exc"].state, rows["exc"].reason) == (FAILED, "exception")
    assert "RuntimeError: boom" in rows["exc"].message
    assert (rows["oom"].state, rows["oom"].reason) == (FAILED, "out_of_memory")
    assert (rows["ckpt"].state, rows["ckpt"].reason) == (PREEMPTED, "preempted")
    assert (rows["usererr"].state, rows["usererr"].reason) == (FAILED, "user_error")
    assert rows["missing"].state == MISSING
    table = status.format_table(list(rows.values()))
    assert "out_of_memory" in table and "6 manifests: 1 done, 1 preempted, 3 failed, 1 missing" in table
    assert "magnitude seed=0" in table


def test_status_with_slurm_records(run, monkeypatch):
    # the newest submission of each manifest counts; sacct answers are faked
    _write(run / "submissions" / "20250101T000000.000000Z-phase2.json", {
        "phase": 2, "executor": "slurm", "arrays": [{"job_id": "10", "tasks": [
            {"index": i, "manifest_id": m} for i, m in enumerate(["exc", "missing", "ckpt", "oom", "done"])]}]})
    _write(run / "submissions" / "20250102T000000.000000Z-phase2.json", {
        "phase": 2, "executor": "slurm", "arrays": [{"job_id": "20", "tasks": [
            {"index": 0, "manifest_id": "exc", "job": "20_0"}, {"index": 1, "manifest_id": "usererr", "job": "20_1"}]}]})
    sacct = ("10_0|FAILED|1:0|None\n10_1|TIMEOUT|0:15|None\n10_2|REQUEUED|0:0|None\n10_3|OUT_OF_MEMORY|0:125|None\n"
             "10_4|COMPLETED|0:0|None\n20_0|RUNNING|0:0|None\n20_[1-3%2]|PENDING|0:0|JobArrayTaskLimit\n")
    asked = []

    def fake_sacct(ids, timeout=60):
        asked.append(sorted(ids))
        return status.parse_sacct(sacct)

    monkeypatch.setattr(status, "sacct_states", fake_sacct)
    rows = {r.manifest_id: r for r in status.collect(run)}
    assert asked and "20_0" in asked[0] and "10_1" in asked[0]
    assert (rows["exc"].state, rows["exc"].job) == (RUNNING, "20_0")  # the resubmitted job runs: old error.json is stale
    assert (rows["usererr"].state, rows["usererr"].message) == (PENDING, "JobArrayTaskLimit")
    assert (rows["missing"].state, rows["missing"].reason) == (FAILED, "timeout")
    assert (rows["ckpt"].state, rows["ckpt"].reason) == (PENDING, "preempted, will resume")
    assert (rows["oom"].state, rows["oom"].reason) == (FAILED, "out_of_memory")
    assert rows["done"].state == DONE


def test_slurm_kill_reason_wins_over_a_generic_error(tmp_path):
    out = tmp_path / "r"
    _write(out / "error.json", {"kind": "interrupted", "type": "KeyboardInterrupt", "message": ""})
    assert status.classify(out, ("CANCELLED", "0:15", "None"))[:2] == (FAILED, "cancelled")
    assert status.classify(out, ("TIMEOUT", "0:15", "None"))[:2] == (FAILED, "timeout")
    empty = tmp_path / "e"
    assert status.classify(empty, ("COMPLETED", "0:0", "None"))[:2] == (FAILED, "no_result")
    assert status.classify(empty, ("NODE_FAIL", "0:0", "None"))[:2] == (FAILED, "node_fail")
    assert status.classify(empty, None)[0] == MISSING


def test_parse_sacct_expands_pending_arrays():
    parsed = status.parse_sacct("5_[0-2,7%3]|PENDING|0:0|Priority\n6|CANCELLED by 0|0:0|None\nbad line\n")
    assert sorted(parsed) == ["5_0", "5_1", "5_2", "5_7", "6"]
    assert parsed["6"][0] == "CANCELLED"


def test_resubmit_selects_only_failed_and_missing(run):
    rows = status.collect(run, use_sacct=False)
    chosen = sorted(r.manifest_id for r in rows if status.needs_resubmit(r))
    assert chosen == ["ckpt", "exc", "missing", "oom", "usererr"]


def test_resubmit_sends_only_those(run, monkeypatch):
    from jobs import submit

    sent = []
    monkeypatch.setattr(submit, "submit_tasks",
                        lambda plan, sel, opts: sent.append((plan.phase, [t.manifest_id for t in sel[0]])) or {})
    submit.resubmit(run, submit.Options(executor="local", echo=False))
    assert sent == [(2, ["ckpt", "exc", "missing", "oom", "usererr"])]


def test_not_a_run_folder_is_one_clear_error(tmp_path):
    from esa.errors import UserError

    with pytest.raises(UserError, match="no manifests/ folder"):
        status.collect(tmp_path)
