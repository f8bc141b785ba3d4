"""Phase 3 as a job: baseline reuse only for the same model, dtype and data."""

from __future__ import annotations

import json

from esa.cli import main

C = ["--device", "cpu", "--seq-len", "32", "--max-samples", "8", "--quiet"]


def test_a_baseline_of_another_dtype_is_not_reused(tiny_llama, tmp_path):
    assert main(["baseline", "--model", str(tiny_llama), "--dtype", "bf16", "--out-dir", str(tmp_path / "b16"), *C]) == 0
    assert main(["perturb", "--model", str(tiny_llama), "--dtype", "fp32", "--perturb", "scale", "--perturb-scale", "1.0",
                 "--target", "model.norm.weight:3", "--baseline-eval", str(tmp_path / "b16" / "eval.json"),
                 "--out-dir", str(tmp_path / "q"), *C]) == 0
    res = json.loads((tmp_path / "q" / "perturbation.json").read_text())
    assert res["delta_ppl"] == 0.0  # scaling by 1.0 changes nothing when the baseline is the same model


def test_a_k_sweep_equals_one_job_per_k(tiny_llama, tmp_path):
    """--topk 1,3,6: each k's entry of by_k is what a job of that k alone writes (same targets, same
    control draws, same numbers); the single-k fields hold the largest k; a single k writes no by_k."""
    assert main(["profile", "--model", str(tiny_llama), "--metric", "magnitude", "--mode", "global", "--topk", "6",
                 "--out-dir", str(tmp_path / "p"), *C]) == 0
    common = ["perturb", "--model", str(tiny_llama), "--perturb", "gauss_noise", "--perturb-scale", "3",
              "--from-scores", str(tmp_path / "p" / "scores.h5"), "--controls", "random_k,bottom_k",
              "--control-repeats", "3", *C]
    assert main([*common, "--topk", "6,1,3", "--out-dir", str(tmp_path / "sweep")]) == 0
    sweep = json.loads((tmp_path / "sweep" / "perturbation.json").read_text())
    manifest = json.loads((tmp_path / "sweep" / "experiment_manifest.json").read_text())["manifest"]
    assert manifest["targets"]["topk"] == [1, 3, 6]
    assert [e["k"] for e in sweep["by_k"]] == [1, 3, 6]
    for entry in sweep["by_k"]:
        k = entry["k"]
        assert main([*common, "--topk", str(k), "--out-dir", str(tmp_path / f"k{k}")]) == 0
        single = json.loads((tmp_path / f"k{k}" / "perturbation.json").read_text())
        assert "by_k" not in single
        assert entry["targets"] == single["targets"] and entry["n_targets"] == k
        for key in ("delta_ppl", "delta_nll", "delta_token_accuracy", "perturbed", "delta_nll_ci", "applied"):
            assert entry[key] == single[key], (k, key)
        for name in ("random_k", "bottom_k"):
            assert entry["controls"][name]["deltas"] == single["controls"][name]["deltas"]
            assert entry["controls"][name]["p_value"] == single["controls"][name]["p_value"]
    largest = sweep["by_k"][-1]
    assert sweep["delta_ppl"] == largest["delta_ppl"] and sweep["n_targets"] == 6
    assert sweep["controls"] == largest["controls"]
    assert set(single) | {"by_k"} == set(sweep)  # the single-k keys, plus by_k
