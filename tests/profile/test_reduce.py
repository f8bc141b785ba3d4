"""Data shards: `esa profile --shard i/n` jobs summed by `esa reduce` equal an unsharded run."""

from __future__ import annotations

import numpy as np
import pytest

from esa.cli import main
from esa.results.scorefile import open_score_file, read_scores


def profile(model, out, metric, *extra):
    return main(["profile", "--model", str(model), "--metric", metric, "--mode", "global", "--topk", "20",
                 "--device", "cpu", "--seq-len", "32", "--max-samples", "9", "--batch-size", "2",
                 "--out-dir", str(out), "--quiet", *extra])


@pytest.mark.parametrize("metric", ["grad_x_weight", "grad_squared", "act_mag", "hutchinson_diag"])
def test_three_shards_reduce_to_the_unsharded_scores(tiny_llama, tmp_path, metric):
    assert profile(tiny_llama, tmp_path / "full", metric) == 0
    for i in range(3):
        assert profile(tiny_llama, tmp_path / f"s{i}", metric, "--shard", f"{i}/3") == 0
    assert main(["reduce", *(str(tmp_path / f"s{i}") for i in range(3)), "--out-dir", str(tmp_path / "red"),
                 "--quiet"]) == 0
    full, red = read_scores(tmp_path / "full" / "scores.h5"), read_scores(tmp_path / "red" / "scores.h5")
    assert full.keys() == red.keys()
    for name in full:
        # fp32 sums in another order: near-cancelling sums differ in their last bits only
        np.testing.assert_allclose(red[name], full[name], rtol=2e-5, atol=1e-6 * float(np.abs(full[name]).max()))
    with open_score_file(tmp_path / "full" / "scores.h5") as a, open_score_file(tmp_path / "red" / "scores.h5") as b:
        ta, tb = a.topk(), b.topk()
        assert b.attrs()["shard"] == "reduced:3/3"
    assert set(zip(ta.param, ta.index)) == set(zip(tb.param, tb.index))


def test_reduce_refuses_mixed_jobs_and_repeated_shards(tiny_llama, tmp_path):
    assert profile(tiny_llama, tmp_path / "a0", "grad_x_weight", "--shard", "0/2") == 0
    assert profile(tiny_llama, tmp_path / "b1", "grad_squared", "--shard", "1/2") == 0
    assert main(["reduce", str(tmp_path / "a0"), str(tmp_path / "b1"), "--out-dir", str(tmp_path / "r")]) == 2
    assert main(["reduce", str(tmp_path / "a0"), str(tmp_path / "a0"), "--out-dir", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r" / "scores.h5").exists()


CLI_SMALL = ["--device", "cpu", "--seq-len", "32", "--max-samples", "8", "--quiet"]


def test_reduce_refuses_shards_of_different_splits(tiny_llama, tmp_path):
    for shard, name in (("0/2", "a"), ("1/3", "b")):
        assert main(["profile", "--model", str(tiny_llama), "--metric", "grad_x_weight", "--shard", shard,
                     "--batch-size", "2", "--out-dir", str(tmp_path / name), *CLI_SMALL]) == 0
    assert main(["reduce", str(tmp_path / "a"), str(tmp_path / "b"), "--out-dir", str(tmp_path / "r")]) == 2
