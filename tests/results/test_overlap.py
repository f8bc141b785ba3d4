"""Tests of esa.results.overlap: hand-computed overlap statistics and scipy cross-checks."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from esa.core.errors import UserError
from esa.results.overlap import (
    aggregate,
    jaccard,
    load_ranked_list,
    overlap_coefficient,
    overlap_matrix,
    overlap_report,
    overlap_stats,
    pairwise_overlap,
    rank_correlations,
    ranked_list_from_items,
    stability_from_sets,
    union_score_vectors,
    write_overlap_report,
    write_stability_summary,
)

COLUMNS = ["rank", "param", "layer", "index", "flat_index", "score", "value"]
DOWN0 = "model.layers.0.mlp.down_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
UP2 = "model.layers.2.mlp.up_proj.weight"
EMB = "model.embed_tokens.weight"
HEAD = "lm_head.weight"

# (param, layer, index, score); layer None -> empty cell
LIST_A = [
    (DOWN0, 0, (1, 2), 5.0),
    (DOWN0, 0, (3, 4), 4.0),
    (Q1, 1, (0, 0), 3.0),
    (EMB, None, (7, 7), 2.0),
]
LIST_B = [
    (UP2, 2, (9, 9), 7.0),
    (DOWN0, 0, (1, 2), 6.0),
    (Q1, 1, (5, 5), 2.0),
    (Q1, 1, (0, 0), 1.0),
    (HEAD, None, (1, 1), 0.5),
]


def write_csv(path: Path, rows, columns=COLUMNS) -> Path:
    """Write rows in the top_weights.csv format (csv module quotes "3,17")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for rank, (param, layer, index, score) in enumerate(rows, start=1):
            rec = {"rank": rank, "param": param, "layer": "" if layer is None else layer,
                   "index": ",".join(map(str, index)), "flat_index": 0, "score": score,
                   "value": 0.1}
            w.writerow([rec[c] for c in columns])
    return path


@pytest.fixture
def ab(tmp_path):
    a = write_csv(tmp_path / "a" / "top_weights.csv", LIST_A)
    b = write_csv(tmp_path / "b" / "top_weights.csv", LIST_B)
    return a, b


def items(name, rows):
    return ranked_list_from_items(name, [(p, i, s) for p, _, i, s in rows])


# ----------------------------------------------------------------- loading


def test_load_reads_all_fields(ab):
    lst = load_ranked_list(ab[0])
    assert lst.name == str(ab[0])
    assert len(lst) == 4
    first = lst.items[0]
    assert first.key == f"{DOWN0}:1,2"
    assert (first.index, first.score, first.layer, first.rank) == ((1, 2), 5.0, 0, 1)
    assert lst.items[3].layer is None  # embedding: empty layer cell


def test_load_accepts_run_folder(ab):
    assert load_ranked_list(ab[0].parent).items == load_ranked_list(ab[0]).items


def test_load_without_layer_column_derives_it(tmp_path):
    p = write_csv(tmp_path / "t.csv", LIST_A, columns=["param", "index", "score"])
    assert [it.layer for it in load_ranked_list(p).items] == [0, 0, 1, None]


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ("rank,param,layer,flat_index,value\n1,w,0,0,1\n", "lacks column(s) index, score"),
    ('param,index,score\nw,"1,2",abc\n', "not a number"),
    ('param,index,score\nw,"1,2",\n', "not a number"),
    ('param,index,score\nw,"1,2",nan\n', "not a usable number"),
    ('param,index,score\nw,"1,x",1\n', "malformed index"),
    ('param,index,score\nw,"1,2",1\nw,"1,2",2\n', "appears twice"),
    ('param,layer,index,score\nw,first,"1,2",1\n', "not a block index"),
])
def test_load_errors(tmp_path, content, message):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(UserError, match=re.escape(message)):
        load_ranked_list(p)


def test_load_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_ranked_list(tmp_path / "nope.csv")


def test_unknown_granularity(ab):
    with pytest.raises(UserError, match="parameter, tensor, layer"):
        overlap_report(ab, by="module")


# ------------------------------------------------------- hand-computed sets


def test_aggregate_sums_scores_per_key(ab):
    a = load_ranked_list(ab[0])
    assert aggregate(a, "tensor") == {DOWN0: 9.0, Q1: 3.0, EMB: 2.0}
    assert aggregate(a, "layer") == {"0": 9.0, "1": 3.0, "other": 2.0}
    assert aggregate(a, "parameter")[f"{DOWN0}:3,4"] == 4.0


@pytest.mark.parametrize("by, n_a, n_b, n_int, j, oc", [
    # A = {d12, d34, q00, e77}, B = {u99, d12, q55, q00, h11}: shared d12, q00
    ("parameter", 4, 5, 2, 2 / 7, 2 / 4),
    # A = {down0, q1, emb}, B = {up2, down0, q1, head}
    ("tensor", 3, 4, 2, 2 / 5, 2 / 3),
    # A = {0, 1, other}, B = {0, 1, 2, other}: embed and lm_head both fall under 'other'
    ("layer", 3, 4, 3, 3 / 4, 1.0),
])
def test_hand_jaccard_and_overlap_coefficient(ab, by, n_a, n_b, n_int, j, oc):
    r = overlap_report(ab, by)
    assert (r["n_a"], r["n_b"], r["n_intersection"], r["n_union"]) == (
        n_a, n_b, n_int, n_a + n_b - n_int)
    assert r["jaccard"] == pytest.approx(j)
    assert r["overlap_coefficient"] == pytest.approx(oc)


def test_set_statistics_edge_values():
    assert jaccard([], []) is None
    assert overlap_coefficient([], [1]) is None
    assert jaccard([], [1]) == 0.0
    assert jaccard([1, 2], [2, 1]) == 1.0
    assert overlap_coefficient([1], [1, 2, 3]) == 1.0  # subset


# --------------------------------------------------- rank correlations: hand


def test_hand_rank_correlation_layer(ab):
    # Union {0,1,2,other}. A = {0:9, 1:3, other:2}, 2 absent -> ranks 0:4 1:3 other:2 2:1.
    # B = {0:6, 1:3, 2:7, other:0.5} -> ranks 0:3 1:2 2:4 other:1.
    # d = (1, 1, -3, 1): rho = 1 - 6*12/(4*15) = -0.2; pairs: 3 concordant, 3 discordant.
    r = overlap_report(ab, "layer")
    assert r["spearman"] == pytest.approx(-0.2)
    assert r["kendall"] == pytest.approx(0.0, abs=1e-12)


def test_hand_rank_correlation_with_absent_ties():
    # Union {w,x,y,z}. A ranks w1 z2 y3 x4 (w absent); B = {w:5, x:1}, y and z absent (tied
    # last) -> ranks w4 x3 y1.5 z1.5. Pearson of ranks = -1.5/sqrt(5*4.5) = -1/sqrt(10).
    # tau-b: C=2 (xy, xz), D=3 (wx, wy, wz), one tie in B only: (2-3)/sqrt(6*5).
    rho, tau = rank_correlations({"x": 3.0, "y": 2.0, "z": 1.0}, {"x": 1.0, "w": 5.0})
    assert rho == pytest.approx(-1 / math.sqrt(10))
    assert tau == pytest.approx(-1 / math.sqrt(30))


def test_disjoint_singletons_are_perfectly_discordant():
    rho, tau = rank_correlations({"a": 5.0}, {"b": 3.0})
    assert (rho, tau) == (pytest.approx(-1.0), pytest.approx(-1.0))


def test_absent_value_is_below_large_scores():
    keys, va, vb = union_score_vectors({"a": 1e20, "b": 2e20}, {"c": -4.0})
    assert keys == ["a", "b", "c"]
    assert va[2] < 1e20 and np.isfinite(va[2])
    assert vb[0] == vb[1] < -4.0


# ----------------------------------------------- rank correlations: scipy


def _reference(a_rows, b_rows, by):
    """Independent construction: pandas groupby sums, union, absent -> -inf -> min - 1."""
    def agg(rows):
        df = pd.DataFrame(rows, columns=["param", "layer", "index", "score"])
        if by == "parameter":
            key = df["param"] + ":" + df["index"].map(lambda t: ",".join(map(str, t)))
        elif by == "tensor":
            key = df["param"]
        else:
            key = df["layer"].map(lambda v: "other" if v is None else str(v))
        return df.groupby(key)["score"].sum()
    sa, sb = agg(a_rows), agg(b_rows)
    union = sa.index.union(sb.index)
    va = sa.reindex(union, fill_value=-np.inf).to_numpy(copy=True)
    vb = sb.reindex(union, fill_value=-np.inf).to_numpy(copy=True)
    va[np.isinf(va)] = va[np.isfinite(va)].min() - 1
    vb[np.isinf(vb)] = vb[np.isfinite(vb)].min() - 1
    return stats.spearmanr(va, vb).statistic, stats.kendalltau(va, vb).statistic


def _random_rows(rng, n, pool):
    picks = rng.choice(len(pool), size=n, replace=False)
    return [(pool[i][0], pool[i][1], pool[i][2], float(rng.gamma(2.0))) for i in picks]


@pytest.mark.parametrize("by", ["parameter", "tensor", "layer"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_correlations_match_scipy(tmp_path, by, seed):
    rng = np.random.default_rng(seed)
    params = [(f"model.layers.{l}.mlp.{m}.weight", l) for l in range(4)
              for m in ("up_proj", "down_proj")] + [(EMB, None), (HEAD, None)]
    pool = [(p, l, (i, j)) for p, l in params for i in range(3) for j in range(3)]
    a_rows, b_rows = _random_rows(rng, 25, pool), _random_rows(rng, 30, pool)
    a = write_csv(tmp_path / "a.csv", a_rows)
    b = write_csv(tmp_path / "b.csv", b_rows)
    r = overlap_report([a, b], by)
    rho, tau = _reference(a_rows, b_rows, by)
    assert r["spearman"] == pytest.approx(rho, abs=1e-12)
    assert r["kendall"] == pytest.approx(tau, abs=1e-12)
    assert -1 < r["spearman"] < 1  # a non-trivial case


def test_fixture_matches_scipy_at_every_granularity(ab):
    for by in ("parameter", "tensor", "layer"):
        r = overlap_report(ab, by)
        rho, tau = _reference(LIST_A, LIST_B, by)
        assert r["spearman"] == pytest.approx(rho) and r["kendall"] == pytest.approx(tau)


# ------------------------------------------------------------- edge cases


def test_identical_lists(ab):
    r = overlap_report([ab[1], ab[1]], "parameter")
    assert r["jaccard"] == r["overlap_coefficient"] == 1.0
    assert r["spearman"] == pytest.approx(1.0) and r["kendall"] == pytest.approx(1.0)


def test_empty_lists(tmp_path, ab):
    empty = write_csv(tmp_path / "empty.csv", [])
    r = overlap_report([empty, empty], "tensor")
    assert (r["n_a"], r["n_union"]) == (0, 0)
    assert r["jaccard"] is r["overlap_coefficient"] is r["spearman"] is r["kendall"] is None
    r = overlap_report([empty, ab[0]], "tensor")
    assert r["jaccard"] == 0.0
    assert r["overlap_coefficient"] is None and r["spearman"] is None


def test_single_element_union_has_no_correlation():
    one = ranked_list_from_items("one", [(Q1, (0, 0), 1.0)])
    s = overlap_stats(one, one, "parameter")
    assert (s["jaccard"], s["n_union"], s["spearman"], s["kendall"]) == (1.0, 1, None, None)


def test_constant_scores_have_no_correlation():
    a = ranked_list_from_items("a", [(Q1, (0, 0), 1.0), (Q1, (0, 1), 1.0)])
    s = overlap_stats(a, a, "parameter")
    assert s["jaccard"] == 1.0 and s["spearman"] is None and s["kendall"] is None


def test_needs_two_lists(ab):
    with pytest.raises(UserError, match="at least two"):
        overlap_report([ab[0]], "tensor")


# ---------------------------------------------------------------- reports


def test_json_round_trip_two_lists(tmp_path, ab):
    out = tmp_path / "rep" / "overlap_report.json"
    rep = write_overlap_report(ab, "tensor", out)
    assert json.loads(out.read_text()) == rep
    assert rep["lists"] == [str(ab[0]), str(ab[1])]
    assert rep["jaccard"] == rep["pairs"][0]["jaccard"] == pytest.approx(2 / 5)
    for key in ("a", "b", "overlap_coefficient", "spearman", "kendall", "n_a", "n_b",
                "n_intersection", "n_union"):
        assert rep[key] == rep["pairs"][0][key]
    assert [p.name for p in out.parent.iterdir()] == ["overlap_report.json"]  # no temp left


def test_json_nulls_for_undefined(tmp_path):
    empty = write_csv(tmp_path / "e.csv", [])
    out = tmp_path / "o.json"
    write_overlap_report([empty, empty], "layer", out)
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["spearman"] is None


def test_three_lists_give_three_pairs(tmp_path, ab):
    c = write_csv(tmp_path / "c.csv", LIST_A[:2])
    rep = overlap_report([ab[0], ab[1], c], "parameter")
    assert [(p["a"], p["b"]) for p in rep["pairs"]] == [
        (str(ab[0]), str(ab[1])), (str(ab[0]), str(c)), (str(ab[1]), str(c))]
    assert "jaccard" not in rep  # top-level copy only for exactly two lists
    # A ⊇ C (2 of A's 4 weights), B ∩ C = {d12}
    assert rep["pairs"][1]["jaccard"] == pytest.approx(2 / 4)
    assert rep["pairs"][1]["overlap_coefficient"] == 1.0
    assert rep["pairs"][2]["jaccard"] == pytest.approx(1 / 6)


def test_overlap_matrix_is_symmetric(ab):
    lists = [load_ranked_list(p) for p in ab]
    m = overlap_matrix(lists, "tensor")
    assert m.iat[0, 1] == m.iat[1, 0] == pytest.approx(2 / 5)
    assert m.iat[0, 0] == m.iat[1, 1] == 1.0
    report = pairwise_overlap(lists, "tensor")
    assert report["pairs"][0]["jaccard"] == m.iat[0, 1]


# -------------------------------------------------------------- stability


SEED_SETS = {  # weights a..f in three seeds: J01 = 2/4, J02 = 1/5, J12 = 1/5
    0: [(DOWN0, (0, 0), 3.0), (DOWN0, (0, 1), 2.0), (Q1, (0, 2), 1.0)],
    1: [(DOWN0, (0, 0), 2.5), (DOWN0, (0, 1), 3.5), (Q1, (0, 3), 1.0)],
    2: [(DOWN0, (0, 0), 9.0), (UP2, (0, 4), 2.0), (EMB, (0, 5), 1.0)],
}


def test_stability_three_seeds_hand():
    s = stability_from_sets(SEED_SETS)
    assert s["num_seeds"] == 3 and s["topk_size"] == 3 and s["seeds"] == [0, 1, 2]
    assert [(p["seed_a"], p["seed_b"]) for p in s["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    assert s["jaccard_all"] == pytest.approx([0.5, 0.2, 0.2])
    assert s["jaccard_mean"] == pytest.approx(0.3)
    assert s["jaccard_std"] == pytest.approx(math.sqrt(0.02))  # population std
    assert s["jaccard_std"] == pytest.approx(np.std(s["jaccard_all"]))


def test_stability_correlations_match_scipy():
    s = stability_from_sets(SEED_SETS)
    rhos, taus = [], []
    for sa, sb in itertools.combinations(SEED_SETS, 2):
        da = {f"{p}:{i},{j}": v for p, (i, j), v in SEED_SETS[sa]}
        db = {f"{p}:{i},{j}": v for p, (i, j), v in SEED_SETS[sb]}
        keys = sorted(da.keys() | db.keys())
        va = [da.get(k, min(da.values()) - 1) for k in keys]
        vb = [db.get(k, min(db.values()) - 1) for k in keys]
        rhos.append(stats.spearmanr(va, vb).statistic)
        taus.append(stats.kendalltau(va, vb).statistic)
    assert [p["spearman"] for p in s["pairs"]] == pytest.approx(rhos)
    assert [p["kendall"] for p in s["pairs"]] == pytest.approx(taus)
    assert s["spearman_mean"] == pytest.approx(np.mean(rhos))
    assert s["kendall_mean"] == pytest.approx(np.mean(taus))


def test_stability_from_csvs_equals_in_memory(tmp_path):
    lists = {}
    for seed, rows in SEED_SETS.items():
        p = write_csv(tmp_path / f"s{seed}.csv", [(pa, None, i, v) for pa, i, v in rows])
        lists[seed] = load_ranked_list(p)
    out = tmp_path / "stability_summary.json"
    from_csv = write_stability_summary(lists, out, by="tensor")
    in_mem = stability_from_sets(SEED_SETS, by="tensor")
    assert json.loads(out.read_text()) == from_csv
    assert from_csv["jaccard_all"] == in_mem["jaccard_all"]
    # tensors: {down0, q1}, {down0, q1}, {down0, up2, emb} -> 1, 1/4, 1/4
    assert in_mem["jaccard_all"] == pytest.approx([1.0, 0.25, 0.25])


def test_stability_identical_seeds():
    s = stability_from_sets({7: SEED_SETS[0], 8: SEED_SETS[0]})
    assert s["jaccard_all"] == [1.0] and s["jaccard_std"] == 0.0
    assert s["spearman_mean"] == pytest.approx(1.0)


def test_stability_needs_two_seeds():
    with pytest.raises(UserError, match="at least two seeds"):
        stability_from_sets({0: SEED_SETS[0]})


def test_in_memory_items_are_validated():
    with pytest.raises(UserError, match="appears twice"):
        stability_from_sets({0: [(Q1, (0, 0), 1.0), (Q1, "0,0", 2.0)], 1: []})
