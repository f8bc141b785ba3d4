"""Ranking (esa.profile.ranking) and weight names (esa.spec.weights) against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import esa.profile.ranking as ranking
from esa.core.errors import UserError
from esa.profile.ranking import rank_scores, tensor_topk
from esa.results.tables import TopK
from esa.spec.weights import format_weight, layer_of, matches, module_type_of, parse_weight


def _random_scores(seed: int, levels: int | None = None) -> dict[str, torch.Tensor]:
    """1-D, 2-D and 3-D tensors; with `levels`, integer scores so that ties are everywhere."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (6, 5),
        "model.layers.0.self_attn.q_proj.bias": (6,),
        "model.layers.1.mlp.down_proj.weight": (4, 7),
        "model.layers.1.block_sparse_moe.experts.w1": (3, 2, 4),
        "model.norm.weight": (9,),
    }
    out = {}
    for name, shape in shapes.items():
        if levels:
            out[name] = torch.randint(0, levels, shape, generator=g).float()
        else:
            out[name] = torch.rand(shape, generator=g)
    return out


def _brute(scores: dict[str, torch.Tensor], k: int, largest: bool) -> list[tuple]:
    """All (param, flat, score) sorted by (score best first, tensor order, flat index)."""
    rows = []
    for pos, (name, t) in enumerate(scores.items()):
        for flat, v in enumerate(t.reshape(-1).tolist()):
            rows.append(((-v if largest else v), pos, flat, name, v))
    rows.sort()
    return [(r[3], r[2], r[4]) for r in rows[:k]]


@pytest.mark.parametrize("chunk", [1 << 22, 5])  # 5: every tensor read in many slices
@pytest.mark.parametrize("levels", [None, 3])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("k", [1, 7, 40, 1000])
def test_global_equals_brute_force(levels, largest, k, chunk, monkeypatch):
    monkeypatch.setattr(ranking, "_CHUNK", chunk)
    scores = _random_scores(seed=k + (levels or 0), levels=levels)
    got = rank_scores(scores, k, "global", largest=largest)
    want = _brute(scores, k, largest)
    assert list(zip(got.param, got.flat_index.tolist(), got.score.tolist())) == want
    assert got.rank.tolist() == list(range(1, len(want) + 1))
    assert got.mode == "global" and got.largest is largest and got.k == k
    for p, flat, ix in zip(got.param, got.flat_index, got.index):
        assert np.ravel_multi_index(ix, tuple(scores[p].shape)) == flat
        assert len(ix) == scores[p].dim()


@pytest.mark.parametrize("chunk", [1 << 22, 3])
@pytest.mark.parametrize("largest", [True, False])
def test_per_layer_is_brute_force_per_tensor(largest, chunk, monkeypatch):
    monkeypatch.setattr(ranking, "_CHUNK", chunk)
    scores = _random_scores(seed=5, levels=4)
    k = 8
    got = rank_scores(scores, k, "per_layer", largest=largest)
    assert got.mode == "per_layer"
    for name, t in scores.items():
        rows = [i for i, p in enumerate(got.param) if p == name]
        want = _brute({name: t}, k, largest)
        assert [(got.param[i], int(got.flat_index[i]), got.score[i]) for i in rows] == want
        assert got.rank[rows].tolist() == list(range(1, min(k, t.numel()) + 1))
    # Tensors come out in input order, each block contiguous.
    assert list(dict.fromkeys(got.param)) == list(scores)


def test_tie_scan_in_chunks_matches(monkeypatch):
    monkeypatch.setattr(ranking, "_CHUNK", 5)
    t = torch.zeros(53)
    t[[7, 30, 31]] = 1.0
    vals, idx = tensor_topk(t, 10)
    assert idx.tolist() == [7, 30, 31, 0, 1, 2, 3, 4, 5, 6]
    assert vals.tolist() == [1, 1, 1] + [0] * 7
    vals, idx = tensor_topk(t, 4, largest=False)
    assert idx.tolist() == [0, 1, 2, 3]


def test_mixed_dtypes_rank_exactly():
    """A float16 tensor after a float64 one: the pruning threshold must not be rounded."""
    a = torch.tensor([1.0 - 1e-12, 0.5], dtype=torch.float64)  # rounds to 1.0 in float16
    b = torch.tensor([0.25, 1.0, 1.0], dtype=torch.float16)
    got = rank_scores({"a": a, "b": b}, 1, "global")
    assert list(zip(got.param, got.flat_index.tolist())) == [("b", 1)]
    c = torch.tensor([0.5 + 1e-12], dtype=torch.float64)
    d = torch.tensor([0.5, 2.0], dtype=torch.float16)
    got = rank_scores({"c": c, "d": d}, 1, "global", largest=False)
    assert list(zip(got.param, got.flat_index.tolist())) == [("d", 0)]


def test_include_exclude_filters():
    scores = _random_scores(seed=1)
    got = rank_scores(scores, 100, "global", include=["mlp", "*q_proj*"], exclude="*.bias")
    assert set(got.param) == {"model.layers.1.mlp.down_proj.weight",
                              "model.layers.0.self_attn.q_proj.weight"}
    assert len(got) == 30 + 28
    with pytest.raises(UserError, match="no scored parameter"):
        rank_scores(scores, 3, "global", include="nothing_like_this")


def test_values_filled_from_weights():
    scores = _random_scores(seed=2)
    weights = {n: torch.randn(t.shape) for n, t in scores.items()}
    # A non-contiguous weight view must read the right coordinates too.
    weights["model.layers.1.mlp.down_proj.weight"] = torch.randn(7, 4).t()
    got = rank_scores(scores, 25, "global", weights=weights)
    for p, ix, v in zip(got.param, got.index, got.value):
        assert v == pytest.approx(float(weights[p][ix]))
    no_values = rank_scores(scores, 3, "global")
    assert np.isnan(no_values.value).all()
    with pytest.raises(UserError, match="no weight tensor"):
        rank_scores(scores, 25, "global", weights={})


@pytest.mark.parametrize("mode", ["global", "per_layer"])
@pytest.mark.parametrize("largest", [True, False])
def test_nan_is_refused_with_tensor_name(mode, largest):
    scores = _random_scores(seed=3)
    scores["model.norm.weight"][4] = float("nan")  # last tensor: reached with k already full
    with pytest.raises(UserError, match="model.norm.weight"):
        rank_scores(scores, 3, mode, largest=largest)


def test_bad_arguments():
    scores = _random_scores(seed=4)
    with pytest.raises(UserError, match="mode"):
        rank_scores(scores, 3, "everywhere")
    for k in (0, -1, 2.5, True):
        with pytest.raises(UserError, match="positive integer"):
            rank_scores(scores, k, "global")


def test_tied_parameter_counted_once():
    t = torch.tensor([3.0, 1.0, 2.0])
    got = rank_scores({"embed.weight": t, "lm_head.weight": t}, 10, "global")
    assert got.param == ["embed.weight"] * 3


def test_topk_records_and_names():
    scores = _random_scores(seed=6)
    got = rank_scores(scores, 4, "global")
    recs = got.to_records()
    assert len(recs) == len(got) == 4
    assert recs[0]["rank"] == 1 and recs[0]["score"] == got.score[0]
    assert got.names()[0] == f"{got.param[0]}:{','.join(map(str, got.index[0]))}"
    assert sum(got.counts_by_param().values()) == 4
    assert len(TopK.empty()) == 0


# --------------------------------------------------------------------------- esa.spec.weights


def test_weight_name_round_trip():
    name = format_weight("model.embed_tokens.weight", (128000, 3303))
    assert name == "model.embed_tokens.weight:128000,3303"
    assert parse_weight(name) == ("model.embed_tokens.weight", (128000, 3303))
    assert parse_weight("x.bias:7") == ("x.bias", (7,))
    assert parse_weight(" a.w:1, 2 ,3 ") == ("a.w", (1, 2, 3))


@pytest.mark.parametrize("bad", ["", "noindex", ":1,2", "p:", "p:1,x", "p:1,,2", "p:-1"])
def test_parse_weight_rejects_malformed(bad):
    with pytest.raises(UserError):
        parse_weight(bad)


@pytest.mark.parametrize("name,layer,mtype", [
    ("model.layers.3.mlp.down_proj.weight", 3, "down_proj"),
    ("transformer.h.11.attn.c_attn.weight", 11, "c_attn"),
    ("gpt_neox.layers.0.mlp.dense_4h_to_h.bias", 0, "dense_4h_to_h"),
    ("model.layers.2.block_sparse_moe.experts.5.w1.weight", 2, "w1"),
    ("model.embed_tokens.weight", None, "embed_tokens"),
    ("transformer.wte.weight", None, "wte"),
    ("lm_head.weight", None, "lm_head"),
    ("model.highway.weight", None, "highway"),
])
def test_layer_and_module_type(name, layer, mtype):
    assert layer_of(name) == layer
    assert module_type_of(name) == mtype


def test_matches_glob_and_substring():
    n = "model.layers.1.mlp.down_proj.weight"
    assert matches(n)
    assert matches(n, include="mlp")
    assert not matches(n, include="mlp.up")
    assert matches(n, include="*.weight")
    assert not matches(n, include="mlp*")  # a glob matches the whole name
    assert matches(n, include="model.layers.[0-2].*")
    assert not matches(n, include="mlp", exclude="down_proj")
    assert not matches(n, exclude=["bias", "*.weight"])
