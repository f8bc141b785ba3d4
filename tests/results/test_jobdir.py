"""Issue #12: an output folder before a job runs (esa.results.jobdir.prepare_job_dir).

A finished result is never redone or un-marked, another job's result is refused, an earlier
attempt's leftovers (exports, plots, stale temporaries, another job's checkpoint) are cleared,
and a folder that cannot be used is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esa.core.errors import UserError
from esa.results.jobdir import prepare_job_dir
from esa.results.state import DONE, job_state
from fixtures.synthetic import fake_scores, manifest, write_failed_job, write_profile_job


def _done(folder: Path, metric: str = "magnitude") -> dict:
    m = manifest(2, metric=metric)
    write_profile_job(folder, m, fake_scores(0))
    return m


def test_a_complete_verified_result_is_kept_and_reported(tmp_path):
    m = _done(tmp_path / "j")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "j").iterdir()}
    state = prepare_job_dir(tmp_path / "j", m["id"])
    assert state is not None and state.state == DONE
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "j").iterdir()} == before  # nothing touched


def test_another_jobs_result_is_refused(tmp_path):
    _done(tmp_path / "j", "grad_x_weight")
    other = manifest(2, metric="magnitude", seed=5)
    with pytest.raises(UserError, match="holds the complete results of another job"):
        prepare_job_dir(tmp_path / "j", other["id"])
    assert job_state(tmp_path / "j").done  # and it stays done


def test_leftovers_of_an_earlier_attempt_are_cleared(tmp_path):
    folder = tmp_path / "j"
    m = manifest(2, metric="magnitude")
    old = manifest(2, metric="grad_x_weight")
    write_failed_job(folder, old, kind="exception")
    for name in ("top_weights.csv", "sensitivity_stats.csv", "sensitivity_stats.json", "scores.h5"):
        (folder / name).write_text("grad_x_weight's")
    (folder / "plots").mkdir()
    (folder / "plots" / "scores_hist.png").write_bytes(b"png")
    (folder / "plots" / ".x.png.abc.tmp").write_bytes(b"t")
    (folder / ".scores.h5.k2j3.tmp").write_bytes(b"\0" * 1024)  # a killed write of the full score file
    (folder / ".checkpoint.tmp").mkdir()
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "state.json").write_text(json.dumps({"manifest_id": old["id"]}))
    (folder / "notes.txt").write_text("mine")  # not esa's: never touched
    assert prepare_job_dir(folder, m["id"]) is None
    left = sorted(p.name for p in folder.iterdir())
    assert left == ["esa.log", "notes.txt"], left


def test_own_checkpoint_is_kept_for_the_resume(tmp_path):
    folder = tmp_path / "j"
    m = manifest(2, metric="magnitude")
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "state.json").write_text(json.dumps({"manifest_id": m["id"]}))
    (folder / "error.json").write_text(json.dumps({"kind": "preempted"}))
    assert prepare_job_dir(folder, m["id"]) is None
    assert (folder / "checkpoint" / "state.json").is_file() and not (folder / "error.json").exists()


def test_a_corrupt_result_of_the_same_job_is_replaced(tmp_path):
    m = _done(tmp_path / "j")
    (tmp_path / "j" / "scores.h5").write_bytes(b"garbage")
    assert prepare_job_dir(tmp_path / "j", m["id"]) is None
    assert not (tmp_path / "j" / "experiment_manifest.json").exists()


def test_unusable_folders_are_one_clear_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="afile is a file, not a folder"):
        prepare_job_dir(tmp_path / "afile", "0" * 12)
    with pytest.raises(UserError, match="lies under .*afile, which is a file"):
        prepare_job_dir(tmp_path / "afile" / "sub" / "deeper", "0" * 12)


def test_a_read_only_folder_is_one_clear_line(readonly_dir):
    with pytest.raises(UserError, match="cannot write into output folder .*(read-only|Permission denied)"):
        prepare_job_dir(readonly_dir / "job", "0" * 12)
    with pytest.raises(UserError, match="cannot write into output folder"):
        prepare_job_dir(readonly_dir, "0" * 12)
