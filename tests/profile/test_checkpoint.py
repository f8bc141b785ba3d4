"""Pre-emption: a phase-2 job stopped part-way checkpoints, and the resumed job's scores equal
an uninterrupted run's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from esa.core.stop import EXIT_PREEMPTED
from esa.cli import main
from esa.results.scorefile import read_scores


def profile_args(model, out, metric, *extra):
    return ["profile", "--model", str(model), "--metric", metric, "--topk", "5", "--device", "cpu",
            "--seq-len", "32", "--max-samples", "6", "--batch-size", "1", "--out-dir", str(out), "--quiet", *extra]


@pytest.mark.parametrize("metric,extra", [("grad_x_weight", []), ("act_mag", []),
                                          ("hutchinson_diag", ["--probes", "2"]), ("grad_squared", [])])
def test_resumed_scores_equal_an_uninterrupted_run(tiny_llama, tmp_path, monkeypatch, metric, extra):
    assert main(profile_args(tiny_llama, tmp_path / "full", metric, *extra)) == 0
    monkeypatch.setenv("ESA_STOP_AFTER_BATCHES", "2")
    assert main(profile_args(tiny_llama, tmp_path / "cut", metric, *extra)) == EXIT_PREEMPTED
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["batches_done"] == 2
    assert not (tmp_path / "cut" / "scores.h5").exists()  # nothing marked complete
    assert json.loads((tmp_path / "cut" / "error.json").read_text())["kind"] == "preempted"
    assert main(profile_args(tiny_llama, tmp_path / "cut", metric, *extra)) == EXIT_PREEMPTED  # 2 more
    monkeypatch.delenv("ESA_STOP_AFTER_BATCHES")
    assert main(profile_args(tiny_llama, tmp_path / "cut", metric, *extra)) == 0
    full, resumed = read_scores(tmp_path / "full" / "scores.h5"), read_scores(tmp_path / "cut" / "scores.h5")
    assert full.keys() == resumed.keys()
    for name in full:
        assert np.array_equal(full[name], resumed[name]), name  # same sums in the same order: bit-equal
    assert not (tmp_path / "cut" / "checkpoint").exists() and not (tmp_path / "cut" / "error.json").exists()


def test_a_checkpoint_of_another_job_is_ignored(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ESA_STOP_AFTER_BATCHES", "1")
    assert main(profile_args(tiny_llama, tmp_path, "grad_x_weight")) == EXIT_PREEMPTED
    monkeypatch.delenv("ESA_STOP_AFTER_BATCHES")
    # A different job (other seed -> other manifest id) in the same folder starts from scratch.
    assert main(profile_args(tiny_llama, tmp_path, "grad_x_weight", "--seed", "5")) == 0
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["n_windows"] == 6
