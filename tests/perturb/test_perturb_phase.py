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
