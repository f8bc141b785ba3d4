"""metric_vs_truth: precision@k and the rank correlations equal a brute-force computation on a fixture."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from analysis import build_report, collect_jobs
from analysis.truth import truth_groups, truth_table
from fixtures.synthetic import TINY_SHAPES, fake_scores, manifest, write_ablation_job, write_profile_job

MODEL = "tiny"


def _names(rng: np.random.Generator, n: int) -> list[str]:
    pool = [f"{p}:{','.join(map(str, np.unravel_index(i, s)))}" for p, s in TINY_SHAPES.items()
            for i in range(int(np.prod(s)))]
    return [pool[i] for i in rng.choice(len(pool), n, replace=False)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two metrics with full scores, one with only its top-k, and an ablation job over 40 candidates
    (ΔNLL with a tie, a destroyed model (+inf) and some negative values)."""
    root = tmp_path_factory.mktemp("truth")
    rng = np.random.default_rng(3)
    scores = {}
    for i, metric in enumerate(("grad_x_weight", "act_mag", "obd")):
        m = manifest(2, model=MODEL, metric=metric, seed=0, topk=12, mode="global")
        scores[metric] = fake_scores(10 + i)
        write_profile_job(root / metric, m, scores[metric], save_full=metric != "obd")
    names = _names(rng, 40)
    delta = rng.normal(0.01, 0.02, 40)
    delta[5] = delta[6]
    delta[9] = math.inf
    # Make grad_x_weight informative: its scores follow the truth for half the candidates.
    for n, d in list(zip(names, delta))[:20]:
        p, _, ix = n.rpartition(":")
        scores["grad_x_weight"][p][tuple(int(i) for i in ix.split(","))] = 10 + (d if math.isfinite(d) else 5)
    # obd keeps only its top 12: put six candidates (with a tie) among them.
    for j, n in enumerate(names[10:16]):
        p, _, ix = n.rpartition(":")
        scores["obd"][p][tuple(int(i) for i in ix.split(","))] = 5.0 + (j // 2)
    write_profile_job(root / "grad_x_weight", manifest(2, model=MODEL, metric="grad_x_weight", seed=0, topk=12,
                                                     mode="global"), scores["grad_x_weight"])
    write_profile_job(root / "obd", manifest(2, model=MODEL, metric="obd", seed=0, topk=12, mode="global"),
                      scores["obd"], save_full=False)
    m = manifest(2, model=MODEL, metric="ablation", seed=0, topk=10, mode="global")
    write_ablation_job(root / "ablation", m, names, delta)
    return root, names, delta, scores


def brute_scores(names: list[str], dense: dict[str, np.ndarray] | None, topk: list[tuple[str, float]] | None
                 ) -> list[float]:
    out = []
    for n in names:
        p, _, ix = n.rpartition(":")
        if dense is not None:
            out.append(float(dense[p][tuple(int(i) for i in ix.split(","))]))
        else:
            out.append(dict(topk).get(n, math.nan))
    return out


def brute_top(values: list[float], k: int) -> set[int]:
    """The k largest (NaN last), ties by position: written as a plain sort over (value, position)."""
    keyed = [(-(v if not math.isnan(v) else -math.inf), 1 if math.isnan(v) else 0, i) for i, v in enumerate(values)]
    return {i for *_, i in sorted(keyed)[:k]}


def brute_ranks(values: list[float]) -> list[float]:
    """Average ranks (1 = smallest), NaN below everything, by counting."""
    key = [(-math.inf if math.isnan(v) else v, 0 if math.isnan(v) else 1) for v in values]
    out = []
    for a in key:
        below = sum(1 for b in key if (b[1], b[0]) < (a[1], a[0]))
        equal = sum(1 for b in key if b == a)
        out.append(below + (equal + 1) / 2)
    return out


def brute_spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.array(brute_ranks(x)), np.array(brute_ranks(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / math.sqrt((rx * rx).sum() * (ry * ry).sum()))


def brute_kendall_b(x: list[float], y: list[float]) -> float:
    rx, ry = brute_ranks(x), brute_ranks(y)
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        a, b = np.sign(rx[i] - rx[j]), np.sign(ry[i] - ry[j])
        if a == 0 and b == 0:
            continue
        if a == 0:
            tx += 1
        elif b == 0:
            ty += 1
        elif a == b:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tx) * (conc + disc + ty))


def test_precision_and_correlations_equal_brute_force(run):
    root, names, delta, scores = run
    (group,) = truth_groups(collect_jobs(root))
    table = truth_table([group])
    assert set(table["metric"]) == {"grad_x_weight", "act_mag", "obd"}
    truth = [float(d) for d in delta]
    from esa.results.scorefile import read_topk

    obd_top = read_topk(root / "obd" / "scores.h5")
    for metric in ("grad_x_weight", "act_mag", "obd"):
        rows = table[table["metric"] == metric]
        x = brute_scores(names, None if metric == "obd" else scores[metric],
                         list(zip(obd_top.names(), obd_top.score)) if metric == "obd" else None)
        assert list(rows["k"]) == [1, 2, 3, 5, 10, 20]
        for _, row in rows.iterrows():
            k = int(row["k"])
            expected = len(brute_top(x, k) & brute_top(truth, k)) / k
            assert row["precision_at_k"] == pytest.approx(expected), (metric, k)
            assert row["hits"] == round(expected * k)
        assert rows["spearman"].iloc[0] == pytest.approx(brute_spearman(x, truth), rel=1e-12)
        assert rows["kendall"].iloc[0] == pytest.approx(brute_kendall_b(x, truth), rel=1e-12)
        assert rows["n_scored"].iloc[0] == sum(not math.isnan(v) for v in x) >= 6
        assert rows["score_source"].iloc[0] == ("top-12 list" if metric == "obd" else "full scores")
    gxw = table[(table["metric"] == "grad_x_weight") & (table["k"] == 10)].iloc[0]
    act = table[(table["metric"] == "act_mag") & (table["k"] == 10)].iloc[0]
    assert gxw["spearman"] > act["spearman"]  # the fixture made grad_x_weight informative: not vacuous


def test_report_writes_metric_vs_truth_and_a_scatter(run, tmp_path):
    root, *_ = run
    build_report(root, tmp_path)
    written = pd.read_csv(tmp_path / "metric_vs_truth.csv")
    table = truth_table(truth_groups(collect_jobs(root)))
    assert list(written.columns) == list(table.columns)
    assert np.allclose(written["precision_at_k"], table["precision_at_k"])
    assert np.allclose(written["spearman"], table["spearman"])
    pngs = list((tmp_path / "plots").glob("truth_*.png"))
    assert len(pngs) == 1
    md = (tmp_path / "report.md").read_text()
    assert "## Ground truth: which metric predicts damage" in md and "truth_" in md
