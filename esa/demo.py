"""The demo pipeline: built-in tiny model -> phase 1 -> report, all local and offline."""

from __future__ import annotations

import html
import os
from pathlib import Path

from esa.io import atomic_write_text, read_json
from esa.logs import get_logger
from esa.manifest import SCHEMA_VERSION
from esa.runner import run
from esa.tiny import builtin_tiny_model

log = get_logger("demo")


def runs_root() -> Path:
    """$ESA_RUNS, else ./runs."""
    return Path(os.environ.get("ESA_RUNS") or "runs")


def run_demo(out_dir: str | None = None, train_steps: int = 400, seq_len: int = 128,
             max_samples: int = 256) -> Path:
    """Run the demo; returns the path of report.html."""
    root = Path(out_dir) if out_dir else runs_root() / "demo"
    model_dir = builtin_tiny_model("llama", train_steps=train_steps)
    data = {"dataset": "builtin", "config": None, "split": "validation", "text_field": "text",
            "seq_len": seq_len, "max_samples": max_samples, "batch_size": 8}
    model = {"id": str(model_dir), "revision": None, "dtype": "fp32", "device": "cpu",
             "attention": "auto", "trust_remote_code": False}
    baseline_dir = root / "results" / "phase1-baseline"
    run({"schema_version": SCHEMA_VERSION, "phase": 1, "experiment": "demo", "model": model,
         "data": data, "seed": 0, "outputs": {"dir": str(baseline_dir)}})
    return write_report(root, baseline_dir)


def write_report(root: Path, baseline_dir: Path) -> Path:
    """A small self-contained HTML + Markdown report of the demo's results."""
    ev = read_json(baseline_dir / "eval.json")
    rows = [("perplexity", f"{ev['ppl']:.3f}"), ("mean NLL (nats/token)", f"{ev['nll']:.4f}"),
            ("token accuracy", f"{ev['token_accuracy']:.4f}"), ("predicted tokens", str(ev["n_tokens"])),
            ("windows", str(ev["n_windows"])), ("model", ev["model"]["source"]),
            ("sanity flags", "; ".join(ev["flags"]) or "none")]
    report_dir = root / "report"
    md = ["# ESA demo report", "", "## Phase 1: baseline", "", "| figure | value |", "| --- | --- |"]
    md += [f"| {k} | {v} |" for k, v in rows]
    atomic_write_text(report_dir / "report.md", "\n".join(md) + "\n")
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>ESA demo report</title>"
            f"<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}"
            f"th{{text-align:left;padding-right:2em}}</style></head><body>"
            f"<h1>ESA demo report</h1><h2>Phase 1: baseline</h2><table>{table}</table></body></html>")
    path = atomic_write_text(report_dir / "report.html", page)
    log.info("report written to %s", path)
    return path
