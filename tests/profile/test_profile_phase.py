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


def test_a_failed_rerun_does_not_keep_the_old_complete_record(tiny_llama, tmp_path):
    out = tmp_path / "p"
    assert main(["profile", "--model", str(tiny_llama), "--metric", "magnitude", "--out-dir", str(out), *C]) == 0
    assert (out / "experiment_manifest.json").exists()
    assert main(["profile", "--model", str(tiny_llama), "--metric", "grad_x_weight", "--device", "cpu",
                 "--seq-len", "32", "--max-samples", "999999", "--out-dir", str(out), "--quiet"]) == 2
    assert not (out / "experiment_manifest.json").exists() and (out / "error.json").exists()
