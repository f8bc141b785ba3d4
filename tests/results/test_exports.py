"""Per-tensor statistics, CSV/JSON exports and plots."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

import esa.profile.stats as tensor_stats_mod
from esa.core.errors import UserError
from esa.results.exports import read_topk_csv, write_stats, write_topk_csv
from esa.profile.plots import save_profile_plots
from esa.profile.ranking import rank_scores
from esa.profile.stats import compute_stats, tensor_stats
from esa.results.tables import stats_columns, stats_from_columns

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gini_brute(x: np.ndarray) -> float:
    """Mean absolute difference over all pairs / (2 * mean): the textbook definition."""
    x = x.astype(np.float64)
    return float(np.abs(x[:, None] - x[None, :]).mean() / (2 * x.mean()))


def _scores() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "model.embed_tokens.weight": torch.rand(20, 8, generator=g) ** 4,
        "model.layers.0.self_attn.q_proj.weight": torch.rand(8, 8, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.rand(8, 16, generator=g) ** 2,
        "model.layers.1.self_attn.q_proj.weight": torch.rand(8, 8, generator=g) * 3,
        "model.layers.1.mlp.down_proj.weight": torch.rand(8, 16, generator=g),
        "model.layers.1.post_attention_layernorm.weight": torch.zeros(8),
    }


def test_stats_match_numpy_and_scipy():
    x = torch.rand(37, 29, generator=torch.Generator().manual_seed(0)) ** 3 * 5
    s = tensor_stats("model.layers.4.mlp.up_proj.weight", x, k=13)
    a = x.double().numpy().ravel()
    assert s.numel == a.size and not s.sampled
    assert s.mean == pytest.approx(a.mean(), rel=1e-12)
    assert s.std == pytest.approx(a.std(), rel=1e-12)
    assert s.min == a.min() and s.max == a.max()
    assert s.p99 == pytest.approx(np.quantile(a, 0.99), rel=1e-12)
    assert s.p99_9 == pytest.approx(np.quantile(a, 0.999), rel=1e-12)
    assert s.kurtosis == pytest.approx(scipy.stats.kurtosis(a, fisher=True, bias=True), rel=1e-9)
    assert s.topk_k == 13
    assert s.topk_share == pytest.approx(np.sort(a)[-13:].sum() / a.sum(), rel=1e-12)
    assert s.gini == pytest.approx(_gini_brute(a), rel=1e-9)
    assert s.layer == 4 and s.module_type == "up_proj"


def test_stats_edge_cases():
    ones = tensor_stats("w", torch.ones(10), k=3)
    assert ones.gini == pytest.approx(0.0) and math.isnan(ones.kurtosis) and ones.std == 0
    assert ones.topk_share == pytest.approx(0.3)
    zeros = tensor_stats("w", torch.zeros(5), k=3)
    assert zeros.gini == 0.0 and math.isnan(zeros.topk_share)
    one_hot = torch.zeros(100)
    one_hot[3] = 2.0
    s = tensor_stats("w", one_hot, k=500)  # k capped at numel
    assert s.topk_k == 100 and s.topk_share == 1.0
    assert s.gini == pytest.approx(_gini_brute(one_hot.numpy()))  # (n-1)/n
    assert tensor_stats("w", torch.zeros(0), 3).numel == 0


def test_large_tensor_stats_use_documented_sample(monkeypatch):
    monkeypatch.setattr(tensor_stats_mod, "EXACT_LIMIT", 1000)
    monkeypatch.setattr(tensor_stats_mod, "SAMPLE_SIZE", 4000)
    monkeypatch.setattr(tensor_stats_mod, "_CHUNK", 777)  # several float64 chunks
    x = torch.rand(100, 50, generator=torch.Generator().manual_seed(2)) ** 2
    s = tensor_stats("big", x, k=10)
    a = x.double().numpy().ravel()
    assert s.sampled
    # Moments, extremes and top-k share stay exact (chunked float64).
    assert s.mean == pytest.approx(a.mean(), rel=1e-12)
    assert s.std == pytest.approx(a.std(), rel=1e-12)
    assert s.kurtosis == pytest.approx(scipy.stats.kurtosis(a), rel=1e-9)
    assert s.max == a.max() and s.min == a.min()
    assert s.topk_share == pytest.approx(np.sort(a)[-10:].sum() / a.sum(), rel=1e-12)
    # Order statistics come from the seeded sample: reproducible and close to exact.
    gen = torch.Generator().manual_seed(tensor_stats_mod.SAMPLE_SEED)
    sample = a[torch.randint(0, a.size, (4000,), generator=gen).numpy()]
    assert s.p99 == pytest.approx(np.quantile(sample, 0.99), rel=1e-6)
    assert s.gini == pytest.approx(_gini_brute(sample), rel=1e-6)
    assert abs(s.p99 - np.quantile(a, 0.99)) < 0.02
    assert tensor_stats("big", x, k=10) == s


def test_stats_columns_round_trip():
    stats = compute_stats(_scores(), k=5)
    cols = stats_columns(stats)
    assert cols["numel"].dtype == np.int64 and cols["sampled"].dtype == bool
    assert _same(stats_from_columns(cols), stats)


def _same(a: list, b: list) -> bool:
    """Equality of stats lists where NaN equals NaN."""
    def norm(s):
        return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
                for k, v in s.to_dict().items()}
    return [norm(s) for s in a] == [norm(s) for s in b]


def test_topk_csv_round_trip(tmp_path):
    scores = _scores()
    top = rank_scores(scores, 12, "global", weights=scores)
    path = write_topk_csv(tmp_path / "top_weights.csv", top)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["rank", "param", "layer", "index", "flat_index", "score", "value"]
    for r, p, ix in zip(rows, top.param, top.index):
        assert r["index"] == ",".join(map(str, ix))
        assert r["layer"] == ("" if "layers." not in p else p.split(".")[2])
    back = read_topk_csv(path)
    assert back.param == top.param and back.index == top.index
    np.testing.assert_array_equal(back.flat_index, top.flat_index)
    np.testing.assert_array_equal(back.score, top.score)  # repr keeps full precision
    np.testing.assert_array_equal(back.value, top.value)
    np.testing.assert_array_equal(back.rank, top.rank)
    nan_values = rank_scores(scores, 3, "global")
    back = read_topk_csv(write_topk_csv(tmp_path / "n.csv", nan_values))
    assert np.isnan(back.value).all()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_read_minimal_weight_lists(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text('param,index\nmodel.layers.2.mlp.down_proj.weight,"3968,7003"\nx.bias,5\n')
    got = read_topk_csv(p)
    assert got.param == ["model.layers.2.mlp.down_proj.weight", "x.bias"]
    assert got.index == [(3968, 7003), (5,)]
    assert got.rank.tolist() == [1, 2] and got.flat_index.tolist() == [-1, -1]
    assert np.isnan(got.score).all()
    q = tmp_path / "names.csv"
    q.write_text('weight\nmodel.embed_tokens.weight:128000,3303\n"a.w:1,2,3"\n')
    assert read_topk_csv(q).index == [(128000, 3303), (1, 2, 3)]
    bad = tmp_path / "bad.csv"
    bad.write_text("param,index\nx.w,1;2\n")
    with pytest.raises(UserError, match="malformed"):
        read_topk_csv(bad)
    (tmp_path / "cols.csv").write_text("name\nfoo\n")
    with pytest.raises(UserError, match="needs columns"):
        read_topk_csv(tmp_path / "cols.csv")
    with pytest.raises(UserError, match="does not exist"):
        read_topk_csv(tmp_path / "missing.csv")


def test_write_stats_csv_and_json(tmp_path):
    stats = compute_stats(_scores(), k=4)
    csv_path, json_path = write_stats(tmp_path / "exports", stats)
    assert csv_path.name == "sensitivity_stats.csv"
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == [s.name for s in stats]
    for r, s in zip(rows, stats):
        assert int(r["numel"]) == s.numel
        assert float(r["p99_9"]) == s.p99_9 and float(r["gini"]) == s.gini
        assert r["layer"] == ("" if s.layer is None else str(s.layer))
    doc = json.loads(json_path.read_text())
    by_name = {t["name"]: t for t in doc["tensors"]}
    norm = by_name["model.layers.1.post_attention_layernorm.weight"]
    assert norm["kurtosis"] is None and norm["module_type"] == "post_attention_layernorm"
    assert by_name["model.embed_tokens.weight"]["layer"] is None
    assert by_name["model.layers.0.mlp.down_proj.weight"]["topk_k"] == 4


def test_plots_are_png_files(tmp_path):
    scores = _scores()
    top = rank_scores(scores, 20, "global")
    paths = save_profile_plots(tmp_path / "plots", scores, top, compute_stats(scores, 20))
    assert sorted(p.name for p in paths) == ["per_layer_scores.png", "score_histogram.png",
                                             "topk_heatmap.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert sorted(x.name for x in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)
    # Top-k-only profiles (no scores, no stats) still get the heatmap.
    only = save_profile_plots(tmp_path / "only", None, top, None)
    assert [p.name for p in only] == ["topk_heatmap.png"]
