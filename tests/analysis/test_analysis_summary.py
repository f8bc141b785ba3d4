"""Issue #12 item 11: `make analyze` says how many jobs are done, failed, corrupt and missing, and
`--strict` makes anything but all-done a failure (exit 1)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from analysis.report import status_counts, summary_line, write_report
from fixtures.synthetic import example_run

REPO = Path(__file__).resolve().parents[2]


def analysis(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_summary_and_strict_exit(tmp_path):
    root = tmp_path / "run"
    example_run(root)  # one truncated scores.h5, one failed job, one planned job that never ran
    r = analysis(str(root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(root / "report" / "report.html")
    summary = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ jobs: \d+ done, 1 failed, 1 corrupt, 1 missing", summary), summary
    strict = analysis(str(root), "--strict")
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    assert "--strict: 3 job(s) are not done" in strict.stderr and summary in strict.stderr


def test_strict_passes_when_every_job_is_done(tmp_path):
    from fixtures.synthetic import manifest, write_baseline_job

    root = tmp_path / "run"
    write_baseline_job(root / "b", manifest(1), ppl=20.0, nll=3.0, accuracy=0.3)
    r = analysis(str(root), "--strict")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "1 jobs: 1 done, 0 failed, 0 corrupt, 0 missing"


def test_the_report_counts_done_jobs(tmp_path):
    """The report's own status table used to look for a status 'complete' that no job ever has."""
    root = tmp_path / "run"
    example_run(root)
    _, counts = write_report(root)
    md = (root / "report" / "report.md").read_text()
    assert f"{counts['done']} done, {sum(counts.values()) - counts['done']} not done" in md
    assert counts == status_counts(__import__("analysis.collect", fromlist=["x"]).collect_jobs(root))
    assert summary_line({"done": 2, "failed": 0, "preempted": 1}).startswith("3 jobs: 2 done, 0 failed, 1 preempted")
