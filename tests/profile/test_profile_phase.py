"""Phase 2 as a job: every setting checked before the work, and the record of a failed rerun."""

from __future__ import annotations

from esa.cli import main

C = ["--device", "cpu", "--seq-len", "32", "--max-samples", "8", "--quiet"]


def test_profile_refuses_a_seq_len_beyond_the_context(tiny_model_factory, tmp_path, capsys):
    model = tiny_model_factory("gpt2")  # context 512 in the test models
    assert main(["profile", "--model", str(model), "--metric", "grad_x_weight", "--device", "cpu",
                 "--seq-len", "600", "--max-samples", "1", "--out-dir", str(tmp_path)]) == 2
    assert "exceeds the model's context of 512" in capsys.readouterr().err


def test_profile_checks_the_perturbation_before_profiling(tiny_llama, tmp_path):
    for bad in (["--perturb", "nonsense"], ["--perturb", "zero", "--controls", "bogus_k"]):
        assert main(["profile", "--model", str(tiny_llama), "--metric", "magnitude", "--topk", "3",
                     "--out-dir", str(tmp_path / "p"), *C, *bad]) == 2
        assert not (tmp_path / "p" / "scores.h5").exists()


def test_another_jobs_result_is_refused_and_a_failed_attempt_cleared(tiny_llama, tmp_path, capsys):
    """Issue #12 item 5: a folder holding another job's complete result is refused (the result stays
    done, no exports of two jobs side by side); what a failed attempt left is cleared by the next job."""
    from esa.results.state import job_state

    out = tmp_path / "p"
    assert main(["profile", "--model", str(tiny_llama), "--metric", "magnitude", "--out-dir", str(out), *C]) == 0
    record = (out / "experiment_manifest.json").read_bytes()
    assert main(["profile", "--model", str(tiny_llama), "--metric", "grad_x_weight", "--device", "cpu",
                 "--seq-len", "32", "--max-samples", "8", "--out-dir", str(out), "--quiet"]) == 2
    assert "holds the complete results of another job" in capsys.readouterr().err
    assert (out / "experiment_manifest.json").read_bytes() == record and job_state(out).done
    failed = tmp_path / "f"
    assert main(["profile", "--model", str(tiny_llama), "--metric", "grad_x_weight", "--device", "cpu",
                 "--seq-len", "32", "--max-samples", "999999", "--out-dir", str(failed), "--quiet"]) == 2
    assert (failed / "error.json").exists() and not (failed / "experiment_manifest.json").exists()
    assert main(["profile", "--model", str(tiny_llama), "--metric", "magnitude", "--out-dir", str(failed), *C]) == 0
    assert job_state(failed).done and not (failed / "error.json").exists()
