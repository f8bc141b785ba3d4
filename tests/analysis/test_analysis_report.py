"""build_report / python -m analysis / esa analyze: the files, and numbers equal to the sources."""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import build_report
from fixtures.synthetic import example_run

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    facts = example_run(root)
    return root, facts, build_report(root)


def test_outputs_exist(built):
    root, _, html = built
    assert html == root / "report" / "report.html"
    for name in ("report.md", "report.html", "overlap_report.json", "stability_summary.json",
                 "delta_ppl.csv", "jobs.csv", "baselines.csv", "super_weights.csv"):
        assert (root / "report" / name).is_file(), name
    pngs = sorted((root / "report" / "plots").glob("*.png"))
    # 1 heatmap grid + ΔPPL vs k (zero: k = 1, 2) + targets vs controls (sign_flip, one k).
    assert len(pngs) == 3
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in pngs)


def test_report_lists_the_three_problem_jobs(built):
    root, facts, _ = built
    md = (root / "report" / "report.md").read_text()
    section = md.split("## Missing, failed, incomplete and corrupt jobs")[1].split("\n## ")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ") and "status" not in ln
             and not ln.startswith("| ---")]
    assert len(lines) == 3
    ids = facts["ids"]
    expect = {ids["truncated"]: ("corrupt", "truncated"), ids["failed"]: ("failed", "out_of_memory"),
              ids["missing"]: ("missing", "no results folder")}
    for job_id, (status, word) in expect.items():
        (line,) = [ln for ln in lines if job_id in ln]
        assert f"| {status} |" in line and word in line
    html = (root / "report" / "report.html").read_text()
    assert all(job_id in html for job_id in expect)


def test_delta_csv_equals_perturbation_json(built):
    root, facts, _ = built
    table = pd.read_csv(root / "report" / "delta_ppl.csv")
    assert len(table) == 4  # the missing phase-3 job is listed, not aggregated
    for name in ("zero_k1_s0", "zero_k1_s1", "zero_k2_s0", "sign_flip_inf"):
        job_id = facts["ids"][name]
        pj = json.loads((root / "results" / job_id / "perturbation.json").read_text())
        row = table[table["id"] == job_id].iloc[0]
        for col, val in (("delta_ppl", pj["delta_ppl"]), ("delta_nll", pj["delta_nll"]),
                         ("baseline_ppl", pj["baseline"]["ppl"]),
                         ("delta_token_accuracy", pj["delta_token_accuracy"]),
                         ("random_k_p_value", pj["controls"]["random_k"]["p_value"]),
                         ("random_k_z", pj["controls"]["random_k"]["z"])):
            if val is None:
                assert math.isnan(row[col]), col
            else:
                assert row[col] == val, col  # full precision in the CSV
        ci = pj["delta_nll_ci"]
        if ci is not None:
            assert (row["delta_nll_ci_low"], row["delta_nll_ci_high"]) == (ci["low"], ci["high"])
    k2 = table[table["id"] == facts["ids"]["zero_k2_s0"]].iloc[0]
    assert k2["metric"] == "grad_x_weight" and k2["k"] == 2 and k2["n_targets"] == 6
    assert k2["random_k_mean"] == 2.5 and k2["random_k_n"] == 4 and k2["bottom_k_mean"] == 0.5
    inf = table[table["id"] == facts["ids"]["sign_flip_inf"]].iloc[0]
    assert inf["random_k_n_nonfinite"] == 1 and inf["random_k_mean"] == 2.0


def _md_table(md: str, heading: str) -> list[dict[str, str]]:
    section = md.split(heading)[1].split("\n#")[0]
    rows = [ln.strip("|").split("|") for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in rows[0]]
    return [dict(zip(header, (c.strip() for c in r))) for r in rows[2:]]


def test_markdown_tables_equal_sources(built):
    root, facts, _ = built
    md = (root / "report" / "report.md").read_text()
    ev = json.loads((root / "results" / facts["ids"]["baseline"] / "eval.json").read_text())
    (base,) = _md_table(md, "## Phase 1: baselines")
    assert float(base["ppl"]) == pytest.approx(ev["ppl"], rel=1e-5)
    assert float(base["nll"]) == pytest.approx(ev["nll"], rel=1e-5)
    assert float(base["token_accuracy"]) == pytest.approx(ev["token_accuracy"], rel=1e-5)
    per_job = _md_table(md, "### Per job")
    by_delta = {r["delta_ppl"]: r for r in per_job}
    assert set(by_delta) == {"10", "14", "30", "—"}
    stab = _md_table(md, "### Across seeds")
    grad = [r for r in stab if r["metric"] == "grad_x_weight"][0]
    assert float(grad["jaccard_mean_parameter"]) == pytest.approx(0.4)
    assert float(grad["jaccard_std_parameter"]) == pytest.approx(math.sqrt(0.02), rel=1e-5)


def test_json_reports(built):
    root, _, _ = built
    overlap = json.loads((root / "report" / "overlap_report.json").read_text())
    (group,) = overlap["groups"]
    pairs = {(p["a"], p["b"]): p for p in group["by"]["parameter"]["pairs"]}
    p = pairs[("grad_x_weight", "magnitude")]
    assert p["jaccard"] == pytest.approx(0.2) and p["overlap_coefficient"] == pytest.approx(1 / 3)
    assert {"spearman", "kendall", "n_a", "n_b"} <= set(p)
    stab = json.loads((root / "report" / "stability_summary.json").read_text())
    seeds = {(g["metric"], g["mode"]): g for g in stab["seeds"]}
    assert seeds[("grad_x_weight", "per_layer")]["by"]["parameter"]["jaccard_mean"] == pytest.approx(0.4)
    assert len(stab["shards"]) == 1


def test_html_is_self_contained(built):
    root, _, html_path = built
    html = html_path.read_text()
    srcs = re.findall(r"<img src='([^']*)'", html)
    assert len(srcs) == 3
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "href=" not in html and "<script" not in html


def test_rerun_replaces_stale_plots(built, tmp_path):
    root, _, _ = built
    stale = root / "report" / "plots" / "stale.png"
    stale.write_bytes(b"old")
    build_report(root)
    assert not stale.exists()


def test_empty_run_still_reports(tmp_path):
    html = build_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert html.is_file() and "no jobs found" in md


def test_python_m_analysis(built):
    root, _, _ = built
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "analysis", str(root)], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(root / "report" / "report.html")
    r = subprocess.run([sys.executable, "-m", "analysis", str(root / "nope")], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_esa_analyze_subcommand(built, capsys):
    from esa.cli import analyze

    root, _, _ = built
    parser = argparse.ArgumentParser()
    analyze.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", str(root), "--out", str(root / "other")])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(root / "other" / "report.html")
