"""Regression tests for bugs found in review: each used to give a wrong result or a traceback."""

from __future__ import annotations

import json

import pytest

from esa.cli import main

C = ["--device", "cpu", "--seq-len", "32", "--max-samples", "8", "--quiet"]


def test_a_baseline_of_another_dtype_is_not_reused(tiny_llama, tmp_path):
    assert main(["baseline", "--model", str(tiny_llama), "--dtype", "bf16", "--out-dir", str(tmp_path / "b16"), *C]) == 0
    assert main(["perturb", "--model", str(tiny_llama), "--dtype", "fp32", "--perturb", "scale", "--perturb-scale", "1.0",
                 "--target", "model.norm.weight:3", "--baseline-eval", str(tmp_path / "b16" / "eval.json"),
                 "--out-dir", str(tmp_path / "q"), *C]) == 0
    res = json.loads((tmp_path / "q" / "perturbation.json").read_text())
    assert res["delta_ppl"] == 0.0  # scaling by 1.0 changes nothing when the baseline is the same model


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


def test_reduce_refuses_shards_of_different_splits(tiny_llama, tmp_path):
    for shard, name in (("0/2", "a"), ("1/3", "b")):
        assert main(["profile", "--model", str(tiny_llama), "--metric", "grad_x_weight", "--shard", shard,
                     "--batch-size", "2", "--out-dir", str(tmp_path / name), *C]) == 0
    assert main(["reduce", str(tmp_path / "a"), str(tmp_path / "b"), "--out-dir", str(tmp_path / "r")]) == 2


def test_a_failed_rerun_does_not_keep_the_old_complete_record(tiny_llama, tmp_path):
    out = tmp_path / "p"
    assert main(["profile", "--model", str(tiny_llama), "--metric", "magnitude", "--out-dir", str(out), *C]) == 0
    assert (out / "experiment_manifest.json").exists()
    assert main(["profile", "--model", str(tiny_llama), "--metric", "grad_x_weight", "--device", "cpu",
                 "--seq-len", "32", "--max-samples", "999999", "--out-dir", str(out), "--quiet"]) == 2
    assert not (out / "experiment_manifest.json").exists() and (out / "error.json").exists()


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_hessian_candidates_rank_only_computed_coordinates(tiny_llama, tmp_path, mode):
    wanted = {"model.norm.weight:3", "model.layers.0.mlp.down_proj.weight:1,2"}
    args = ["profile", "--model", str(tiny_llama), "--metric", "hessian_diag", "--mode", mode, "--topk", "3",
            "--export-topk-csv", "--out-dir", str(tmp_path), *C]
    for w in wanted:
        args += ["--candidates", w]
    assert main(args) == 0
    rows = (tmp_path / "top_weights.csv").read_text().splitlines()[1:]
    got = {f"{r.split(',')[1]}:{r.split(chr(34))[1] if chr(34) in r else r.split(',')[3]}" for r in rows}
    assert got == wanted
    extras = json.loads((tmp_path / "profile.json").read_text())["metric_extras"]
    assert {c["weight"] for c in extras["candidates"]} == wanted
