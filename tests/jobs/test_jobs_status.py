"""jobs.status: the status table from fabricated result folders and sacct lines; resubmit selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esa.spec.manifest import Manifest
from fixtures.synthetic import fake_scores, write_profile_job
from jobs import status
from jobs.slurm import parse_sacct
from jobs.status import DONE, FAILED, MISSING, PENDING, PREEMPTED, RUNNING


NAMES = ("done", "exc", "oom", "ckpt", "missing", "usererr")


def _manifest(run: Path, name: str, seed: int) -> str:
    """A real phase-2 manifest (its content hash as id) in RUN/manifests; returns the id."""
    m = Manifest.from_dict({"phase": 2, "model": {"id": "esa:tiny-llama"}, "metric": {"name": "magnitude"},
                            "seed": seed, "outputs": {"dir": "."}}, partial=True).with_id()
    m = m.with_outputs(dir=str(run / "results" / m.id))
    _write(run / "manifests" / f"{m.id}.json", m.to_dict())
    return str(m.id)


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def run(tmp_path) -> tuple[Path, dict[str, str]]:
    """A run with one manifest in every state the files alone can show (name -> id)."""
    run = tmp_path / "runs" / "exp"
    ids = {name: _manifest(run, name, seed) for seed, name in enumerate(NAMES)}
    res = run / "results"
    done = json.loads((run / "manifests" / f"{ids['done']}.json").read_text())
    write_profile_job(res / ids["done"], done, fake_scores(0))
    _write(res / ids["exc"] / "error.json", {"kind": "exception", "type": "RuntimeError", "message": "boom"})
    _write(res / ids["oom"] / "error.json", {"kind": "out_of_memory", "type": "OutOfMemoryError",
                                             "message": "CUDA out of memory"})
    (res / ids["ckpt"] / "checkpoint").mkdir(parents=True)
    _write(res / ids["ckpt"] / "error.json", {"kind": "preempted", "type": "Preempted", "message": "stopped"})
    _write(res / ids["usererr"] / "error.json", {"kind": "user_error", "type": "UserError", "message": "bad metric"})
    (run / "manifests" / "index-phase2.txt").write_text("ignored\n")
    return run, ids


def _rows(run, **kw) -> dict:
    root, ids = run
    name_of = {v: k for k, v in ids.items()}
    return {name_of[r.manifest_id]: r for r in status.collect(root, **kw)}


def test_status_from_result_files_only(run):
    rows = _rows(run, use_sacct=False)
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
    root, ids = run
    _write(root / "submissions" / "20250101T000000.000000Z-phase2.json", {
        "phase": 2, "executor": "slurm", "arrays": [{"job_id": "10", "tasks": [
            {"index": i, "manifest_id": ids[m]} for i, m in enumerate(["exc", "missing", "ckpt", "oom", "done"])]}]})
    _write(root / "submissions" / "20250102T000000.000000Z-phase2.json", {
        "phase": 2, "executor": "slurm", "arrays": [{"job_id": "20", "tasks": [
            {"index": 0, "manifest_id": ids["exc"], "job": "20_0"},
            {"index": 1, "manifest_id": ids["usererr"], "job": "20_1"}]}]})
    sacct = ("10_0|FAILED|1:0|None\n10_1|TIMEOUT|0:15|None\n10_2|REQUEUED|0:0|None\n10_3|OUT_OF_MEMORY|0:125|None\n"
             "10_4|COMPLETED|0:0|None\n20_0|RUNNING|0:0|None\n20_[1-3%2]|PENDING|0:0|JobArrayTaskLimit\n")
    asked = []

    def fake_sacct(job_ids, timeout=60):
        asked.append(sorted(job_ids))
        return parse_sacct(sacct)

    monkeypatch.setattr(status, "sacct_states", fake_sacct)
    monkeypatch.setattr(status, "queue_states", lambda ids, timeout=30: None)  # squeue not there to ask
    rows = _rows(run)
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
    parsed = parse_sacct("5_[0-2,7%3]|PENDING|0:0|Priority\n6|CANCELLED by 0|0:0|None\nbad line\n")
    assert sorted(parsed) == ["5_0", "5_1", "5_2", "5_7", "6"]
    assert parsed["6"][0] == "CANCELLED"


def test_resubmit_selects_only_failed_and_missing(run):
    rows = _rows(run, use_sacct=False)
    chosen = sorted(name for name, r in rows.items() if status.needs_resubmit(r))
    assert chosen == ["ckpt", "exc", "missing", "oom", "usererr"]


def test_resubmit_sends_only_those(run, monkeypatch):
    from jobs import submit

    root, ids = run
    sent = []
    monkeypatch.setattr(submit, "submit_jobs",
                        lambda plan, sel, opts: sent.append((plan.phase, sorted(j.id for j in sel[0]))) or {})
    submit.resubmit(root, submit.Options(executor="local", echo=False))
    assert sent == [(2, sorted(ids[n] for n in ("ckpt", "exc", "missing", "oom", "usererr")))]


def test_not_a_run_folder_is_one_clear_error(tmp_path):
    from esa.core.errors import UserError

    with pytest.raises(UserError, match="no manifests/ folder"):
        status.collect(tmp_path)
