"""The demo pipeline end to end (small sizes): its report's numbers equal the result files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from jobs.demo import demo_plans, run_demo

PLANS = demo_plans()
MODELS = PLANS[2]["grid"]["models"]
METRICS = PLANS[2]["grid"]["metrics"]
SEEDS = PLANS[2]["grid"]["seeds"]
PERTURBATIONS = PLANS[3]["grid"]["perturbation"]
KS = [1, 4]  # the sweep [1, 8] capped at the test's topk of 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    report = run_demo(out_dir=str(root), train_steps=30, seq_len=32, max_samples=8, topk=4, control_repeats=3)
    return root, report


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_demo_writes_a_report_with_every_job_complete(demo):
    root, report = demo
    assert report == root / "report" / "report.html" and report.stat().st_size > 10_000
    jobs = rows(root / "report" / "jobs.csv")
    expected = len(MODELS) * (1 + len(METRICS) * len(SEEDS) + 1 + len(METRICS) * len(PERTURBATIONS))
    assert len(jobs) == expected
    assert {j["status"] for j in jobs} == {"done"}
    assert {j["ks"] for j in jobs if j["phase"] == "3"} == {",".join(map(str, KS))}


def test_report_baseline_equals_eval_json(demo):
    root, _ = demo
    table = rows(root / "report" / "baselines.csv")
    assert len(table) == len(MODELS)
    for row in table:
        ev = json.loads((root / row["path"] / "eval.json").read_text())
        assert float(row["ppl"]) == pytest.approx(ev["ppl"], rel=1e-12)
        assert float(row["token_accuracy"]) == pytest.approx(ev["token_accuracy"], rel=1e-12)
        assert int(row["n_tokens"]) == ev["n_tokens"]
        assert f"{ev['ppl']:.2f}"[:5] in (root / "report" / "report.md").read_text()
        assert ("planted" in ev["model"]) == row["model"].endswith("planted")


def test_report_delta_ppl_equals_perturbation_json(demo):
    root, _ = demo
    table = rows(root / "report" / "delta_ppl.csv")
    assert len(table) == len(MODELS) * len(METRICS) * len(PERTURBATIONS) * len(KS)
    for row in table:
        job = json.loads((root / row["path"] / "perturbation.json").read_text())
        (res,) = [e for e in job["by_k"] if e["k"] == int(row["k"])]
        res = {**job, **res}
        assert float(row["delta_ppl"]) == pytest.approx(res["delta_ppl"], rel=1e-12)
        assert float(row["baseline_ppl"]) == pytest.approx(res["baseline"]["ppl"], rel=1e-12)
        for control in ("random_k", "bottom_k"):
            c = res["controls"][control]
            assert float(row[f"{control}_p_value"]) == pytest.approx(c["p_value"])
            assert int(row[f"{control}_n"]) == len(c["deltas"])
            finite = [d for d in c["deltas"] if d is not None and math.isfinite(d)]
            assert float(row[f"{control}_mean"]) == pytest.approx(sum(finite) / len(finite))


def test_report_stability_equals_the_rankings(demo):
    root, _ = demo
    from esa.results.overlap import jaccard, load_ranked_list

    summary = json.loads((root / "report" / "stability_summary.json").read_text())
    entries = [e for e in summary["seeds"] if e["metric"] in METRICS]
    assert len(entries) == len(METRICS) * len(MODELS)
    for entry in entries:
        # Recompute the seeds' Jaccard from their own top_weights.csv files.
        a, b = (load_ranked_list(root / m["path"] / "top_weights.csv") for m in entry["members"])
        expected = jaccard({i.key for i in a.items}, {i.key for i in b.items})
        assert entry["by"]["parameter"]["jaccard_mean"] == pytest.approx(expected)


def _demo_figures(root: Path) -> dict:
    """The demo's top-k of each phase-2 job and ΔPPL of each phase-3 job, keyed by what they are."""
    from esa.results.records import JobRecord, PerturbationRecord, read_record
    from esa.results.scorefile import read_topk

    jobs = {d.name: read_record(JobRecord, d).manifest for d in (root / "results").iterdir()}
    metric_of = {i: m["metric"]["name"] for i, m in jobs.items() if m["phase"] == 2}
    top, delta = {}, {}
    for job_id, m in sorted(jobs.items()):
        folder = root / "results" / job_id
        model = "planted" if m["model"]["id"].endswith("planted") else "plain"
        if m["phase"] == 2:
            top[f"{model}/{m['metric']['name']}/seed{m['seed']}"] = read_topk(folder / "scores.h5").names()
        if m["phase"] == 3:
            source = Path(m["targets"]["from_scores"]).parent.name
            for entry in read_record(PerturbationRecord, folder).by_k or []:
                delta[f"{model}/{metric_of[source]}/{m['perturbation']['name']}/k{entry['k']}"] = entry["delta_ppl"]
    return {"top_k": top, "delta_ppl": delta}


def test_demo_matches_its_golden_record(demo):
    """The seeded tiny model's rankings and damage, recorded (ESA_UPDATE_GOLDEN=1 rewrites the record)."""
    import os

    root, _ = demo
    path = Path(__file__).resolve().parents[1] / "golden" / "demo.json"
    got = _demo_figures(root)
    if os.environ.get("ESA_UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert got["top_k"] == want["top_k"]
    assert got["delta_ppl"].keys() == want["delta_ppl"].keys()
    for key, value in want["delta_ppl"].items():
        assert got["delta_ppl"][key] == pytest.approx(value, rel=1e-6), key


def test_the_report_shows_the_positive_control_and_the_verdict(demo):
    """The planted pair is found by act_mag, obd and (among its candidates) the ablation; the report
    leads with the verdict and compares every metric with the ground truth on both models."""
    root, _ = demo
    planted = rows(root / "report" / "planted.csv")
    (name,) = {r["model"] for r in planted}
    assert name.endswith("-planted")  # the demo maps its models to local folders when it trains other steps
    for metric in ("act_mag", "obd"):
        assert all(r["found"] == "True" for r in planted if r["metric"] == metric), metric
    (ablation,) = [r for r in planted if r["metric"] == "ablation"]
    # The ground truth: zeroing a planted weight hurts far more than zeroing any candidate outside the two
    # planted neurons (their input weights break the cancellation too: docs/metrics.md).
    from esa.results.scorefile import read_candidates

    table = read_candidates(root / ablation["path"] / "scores.h5")
    pair = [s for n, s in zip(table.names(), table.score) if n in ablation["planted"].split(";")]
    neurons = ("mlp.gate_proj.weight:7,", "mlp.gate_proj.weight:11,", "mlp.up_proj.weight:7,",
               "mlp.up_proj.weight:11,", "mlp.down_proj.weight:5,")
    others = [s for n, s in zip(table.names(), table.score) if "layers.1." not in n or not any(k in n for k in neurons)]
    assert len(pair) == 2 and others and min(pair) > 10 * max(others)
    truth = rows(root / "report" / "metric_vs_truth.csv")
    models = {r["model"] for r in truth}
    assert len(models) == len(MODELS) and name in models and {r["metric"] for r in truth} == set(METRICS)
    md = (root / "report" / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Job status") < md.index("## Positive control: planted weights")
    verdict = rows(root / "report" / "verdict.csv")
    checks = {(r["model"], r["check"].split(":")[0]) for r in verdict}
    for model in models:
        assert {(model, "damage"), (model, "stability"), (model, "ground truth")} <= checks
    assert (name, "positive control") in checks
