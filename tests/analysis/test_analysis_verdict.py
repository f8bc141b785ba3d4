"""The verdict section: a run with two metrics, three seeds, dose-response sweeps, an ablation job and a planted
model; every line's numbers are recomputed here from the result files it names."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import build_report
from analysis.verdict import ALPHA, JACCARD_MIN, RATIO_MIN
from esa.results.scorefile import read_topk
from fixtures.synthetic import (TINY_SHAPES, fake_scores, manifest, write_ablation_job, write_baseline_job,
                                write_profile_job, write_sweep_job)

METRICS = ("grad_x_weight", "grad_squared")
SEEDS = (0, 1, 2)
PLANTED = ["model.layers.1.mlp.down_proj.weight:5,7", "model.layers.1.mlp.down_proj.weight:5,11"]


def _set(scores: dict[str, np.ndarray], name: str, value: float) -> None:
    p, _, ix = name.rpartition(":")
    scores[p][tuple(int(i) for i in ix.split(","))] = value


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("verdict")
    rng = np.random.default_rng(0)
    for model in ("tiny", "tiny-planted"):
        write_baseline_job(root / model / "baseline", manifest(1, model=model), ppl=20.0, nll=math.log(20.0),
                           accuracy=0.3, planted=PLANTED if model == "tiny-planted" else ())
        for mi, metric in enumerate(METRICS):
            base = fake_scores(100 * mi + len(model))
            for seed in SEEDS:
                noise = fake_scores(1000 + 10 * mi + seed + len(model))
                # grad_x_weight is stable across seeds (Jaccard > 0.3), grad_squared is not.
                w = 0.9 if metric == "grad_x_weight" else 0.1
                scores = {p: w * base[p] + (1 - w) * noise[p] for p in base}
                if metric == "grad_x_weight":  # a clear head of 10 weights, then noise
                    scores["model.layers.0.mlp.down_proj.weight"][0, :10] += 5.0
                if model == "tiny-planted" and (metric == "grad_squared" or seed == 0):
                    for name in PLANTED:
                        _set(scores, name, 10.0)
                m = manifest(2, model=model, metric=metric, seed=seed, topk=10, mode="global")
                write_profile_job(root / model / f"{metric}_s{seed}", m, scores)
        for mi, metric in enumerate(METRICS):
            source = str(root / model / f"{metric}_s0" / "scores.h5")
            m = manifest(3, model=model, seed=0, perturbation="zero", from_scores=source, k=[1, 5, 10],
                         controls=("random_k", "bottom_k"), mode="global")
            if metric == "grad_x_weight":  # ≫ controls with 99 draws: pass at every k
                deltas, draws = {1: 50.0, 5: 80.0, 10: 100.0}, 99
            else:  # k = 1, 5: ratio < 10 (fail); k = 10: ratio ≫ 10 but 20 draws (inconclusive)
                deltas, draws = {1: 2.0, 5: 3.0, 10: 40.0}, 20
            controls = {k: {"random_k": rng.uniform(0.5, 1.5, draws).tolist(), "bottom_k": [0.25]} for k in deltas}
            write_sweep_job(root / model / f"zero_{metric}", m, base_ppl=20.0, deltas=deltas, controls=controls)
    pool = [f"{p}:{','.join(map(str, np.unravel_index(i, s)))}" for p, s in TINY_SHAPES.items()
            for i in range(int(np.prod(s)))]
    names = [pool[i] for i in rng.choice(len(pool), 30, replace=False)]
    write_ablation_job(root / "tiny" / "ablation", manifest(2, model="tiny", metric="ablation", topk=10,
                                                            mode="global"), names, rng.normal(0, 0.01, 30))
    build_report(root)
    verdict = pd.read_csv(root / "report" / "verdict.csv")
    return root, verdict


def _perturbation(root: Path, job_id: str) -> dict:
    (path,) = [p for p in root.rglob("perturbation.json") if json.loads(p.read_text())["manifest_id"] == job_id]
    return json.loads(path.read_text())


def test_every_check_is_there_for_every_model_and_metric(run):
    _, v = run
    for model in ("tiny", "tiny-planted"):
        own = v[v["model"] == model]
        for metric in METRICS:
            checks = set(own[own["metric"] == metric]["check"])
            assert any(c.startswith("damage") for c in checks) and any(c.startswith("stability") for c in checks)
        assert any(c.startswith("agreement") for c in own["check"])
    assert set(v[v["check"].str.startswith("ground truth")]["model"]) == {"tiny"}
    assert set(v[v["check"].str.startswith("positive control")]["model"]) == {"tiny-planted"}


def test_damage_lines_equal_the_perturbation_files(run):
    root, v = run
    lines = v[v["check"].str.startswith("damage")]
    assert len(lines) == 2 * 2 * 3
    for _, line in lines.iterrows():
        pj = _perturbation(root, line["job_ids"])
        (entry,) = [e for e in pj["by_k"] if e["k"] == int(line["k"])]
        draws = entry["controls"]["random_k"]["deltas"]
        control = float(np.mean(draws))
        ratio = entry["delta_ppl"] / control
        assert line["target_delta_ppl"] == pytest.approx(entry["delta_ppl"], rel=1e-12)
        assert line["control_mean"] == pytest.approx(control, rel=1e-12)
        assert line["ratio"] == pytest.approx(ratio, rel=1e-12)
        assert line["p_value"] == pytest.approx(entry["controls"]["random_k"]["p_value"], rel=1e-12)
        assert line["p_value"] == pytest.approx((1 + sum(d >= entry["delta_ppl"] for d in draws)) / (len(draws) + 1))
        assert line["draws"] == len(draws) and line["p_floor"] == pytest.approx(1 / (len(draws) + 1))
        assert line["bottom_k_delta_ppl"] == pytest.approx(entry["controls"]["bottom_k"]["deltas"][0])
        assert line["bottom_k_ratio"] == pytest.approx(entry["delta_ppl"] / entry["controls"]["bottom_k"]["deltas"][0])
        floor = 1 / (len(draws) + 1)
        expected = ("pass" if ratio >= RATIO_MIN and line["p_value"] <= ALPHA else
                    "inconclusive" if ratio >= RATIO_MIN and line["p_value"] <= floor and floor > ALPHA else "fail")
        assert line["verdict"] == expected
        assert ("too few draws" in str(line["warning"])) == (floor > ALPHA)
        assert "p-value" not in line["numbers"].split("bottom_k")[-1]  # bottom_k: a reference ratio only
    assert set(lines["verdict"]) == {"pass", "fail", "inconclusive"}  # the fixture reaches every outcome


def test_stability_lines_equal_the_jaccard_of_the_rankings(run):
    root, v = run
    lines = v[v["check"].str.startswith("stability")]
    assert len(lines) == 4
    for _, line in lines.iterrows():
        sets = [set(read_topk(root / line["model"] / f"{line['metric']}_s{s}" / "scores.h5").names()) for s in SEEDS]
        js = [len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2)]
        assert line["jaccard_mean"] == pytest.approx(np.mean(js), rel=1e-12)
        assert line["jaccard_std"] == pytest.approx(np.std(js), rel=1e-9, abs=1e-12)
        assert line["verdict"] == ("pass" if np.mean(js) > JACCARD_MIN else "fail")
    assert set(lines["verdict"]) == {"pass", "fail"}


def test_agreement_and_ground_truth_lines_equal_their_sources(run):
    root, v = run
    overlap = json.loads((root / "report" / "overlap_report.json").read_text())
    for _, line in v[v["check"].str.startswith("agreement")].iterrows():
        a, b = line["metric"].split(" vs ")
        sets = [set(read_topk(root / line["model"] / f"{m}_s0" / "scores.h5").names()) for m in (a, b)]
        assert line["jaccard"] == pytest.approx(len(sets[0] & sets[1]) / len(sets[0] | sets[1]))
        (group,) = [g for g in overlap["groups"] if g["model"] == line["model"]]
        (pair,) = [p for p in group["by"]["parameter"]["pairs"] if {p["a"], p["b"]} == {a, b}]
        assert line["spearman"] == pytest.approx(pair["spearman"])
    truth = pd.read_csv(root / "report" / "metric_vs_truth.csv")
    lines = v[v["check"].str.startswith("ground truth")]
    assert set(lines["metric"]) == set(METRICS)
    for _, line in lines.iterrows():
        row = truth[(truth["metric"] == line["metric"]) & (truth["k"] == line["k"])].iloc[0]
        assert line["k"] == 10 and line["verdict"] == "info"
        assert line["precision_at_k"] == row["precision_at_k"] and line["spearman"] == pytest.approx(row["spearman"])


def test_positive_control_lines_equal_brute_force_ranks(run):
    root, v = run
    lines = v[v["check"].str.startswith("positive control")].set_index("metric")
    assert lines.loc["grad_squared", "verdict"] == "found" and lines.loc["grad_x_weight", "verdict"] == "mixed"
    planted = pd.read_csv(root / "report" / "planted.csv")
    for _, row in planted.iterrows():
        folder = root / "tiny-planted" / f"{row['metric']}_s{row['seed']}"
        from esa.results.scorefile import read_scores

        dense = read_scores(folder / "scores.h5")
        # Every weight as (score, tensor position, flat index), sorted as esa ranks: highest first.
        order = sorted((-float(v), pos, i) for pos, t in enumerate(dense.values()) for i, v in enumerate(t.reshape(-1)))
        position = {key: r for r, key in enumerate(((pos, i) for _, pos, i in order), start=1)}
        ranks = []
        for name in PLANTED:
            p, _, ix = name.rpartition(":")
            flat = int(np.ravel_multi_index(tuple(int(i) for i in ix.split(",")), dense[p].shape))
            ranks.append(position[(list(dense).index(p), flat)])
        assert row["ranks"] == ";".join(map(str, ranks))
        assert bool(row["found"]) == all(r <= 2 for r in ranks)


def test_the_verdict_leads_the_report_with_every_line(run):
    root, v = run
    md = (root / "report" / "report.md").read_text()
    assert md.index("## Verdict: what the runbook looks for") < md.index("## Job status")
    for _, line in v.iterrows():
        assert line["numbers"].replace("|", "\\|") in md
    assert "Warning: too few draws for p < 0.01: R = 20 gives at best p = 1/21" in md
    html = (root / "report" / "report.html").read_text()
    assert html.index("Verdict: what the runbook looks for") < html.index("Job status")
