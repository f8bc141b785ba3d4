"""The demo: the four plans of manifests/demo/ run in this process, then the offline analysis.

Built-in tiny model and its copy with a planted super weight (the positive control) -> phase 1 ->
phase 2 (three metrics x two seeds) -> the ground truth (ablation of the metrics' top weights) ->
phase 3 (a dose-response sweep of zeroing against controls) -> report. The plans are ordinary plans:
the demo reads them, applies its command-line settings, writes them into the run folder and hands
each to the job layer's in-process executor, so `make submit PLAN=manifests/demo/<plan>.toml` would
run the same jobs (same ids) and `make status` / `make analyze` work on the demo's run folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from esa.core.errors import UserError
from esa.core.logs import get_logger
from jobs.executors import run_in_process
from jobs.plans import plan_from_dict, write_expanded

log = get_logger("demo")

PLANS = Path(__file__).resolve().parents[1] / "manifests" / "demo"


# The demo's plans in the order they run: key -> (file, what it does).
STEPS: dict[int | str, tuple[str, str]] = {
    1: ("phase1.toml", "baselines"),
    2: ("phase2.toml", "profiling (grad_x_weight, act_mag, obd x seeds 0, 1)"),
    "truth": ("truth.toml", "the ground truth: ablation of every metric's top-8"),
    3: ("phase3.toml", "dose-response: zeroing the top 1 and 8 against random_k and bottom_k"),
}


def demo_plans(*, seq_len: int | None = None, max_samples: int | None = None, topk: int | None = None,
               control_repeats: int | None = None) -> dict[int | str, dict[str, Any]]:
    """The demo's plans (1, 2, "truth", 3 -> TOML dict) with the command line's settings applied."""
    if not (PLANS / "phase1.toml").is_file():
        raise UserError(f"the demo's plans are not at {PLANS}: run the demo from a checkout of the repository "
                        "(make demo)")
    plans = {key: tomllib.loads((PLANS / file).read_text()) for key, (file, _) in STEPS.items()}
    for key, plan in plans.items():
        if seq_len is not None:
            plan["data"]["seq_len"] = seq_len
        if max_samples is not None and key in (1, 3):  # evaluation windows
            plan["data"]["max_samples"] = max_samples
    if topk is not None:
        plans[2]["grid"]["topk"] = [topk]
        for block in plans["truth"]["grid"]["profile"]:
            block["n_candidates"], block["topk"] = topk, 3 * topk
        plans[3]["grid"]["k"] = [sorted({k for k in entry if k <= topk} | {topk}) if isinstance(entry, list)
                                 else min(entry, topk) for entry in plans[3]["grid"]["k"]]
    if control_repeats is not None:
        plans[3]["grid"]["repeats"] = control_repeats
    return plans


def run_demo(out_dir: str | None = None, *, train_steps: int | None = None, seq_len: int | None = None,
             max_samples: int | None = None, topk: int | None = None, control_repeats: int | None = None) -> Path:
    """Run the whole pipeline into the run folder; returns the path of report.html."""
    from esa.model.tiny import BUILTIN_TRAIN_STEPS, builtin_planted_model, builtin_tiny_model

    plans = demo_plans(seq_len=seq_len, max_samples=max_samples, topk=topk, control_repeats=control_repeats)
    # esa:tiny-llama is the cached tiny model of the default training; another step count is another model.
    steps = train_steps or BUILTIN_TRAIN_STEPS
    model_map = {} if steps == BUILTIN_TRAIN_STEPS else {"esa:tiny-llama": str(builtin_tiny_model("llama", steps))}
    if steps != BUILTIN_TRAIN_STEPS:
        model_map["esa:tiny-llama-planted"] = str(builtin_planted_model("llama", steps))
    builtin_planted_model("llama", steps)  # both built (once, cached) before the jobs that load them
    runs = Path(out_dir).resolve().parent if out_dir else None
    for n, (key, (file, what)) in enumerate(STEPS.items(), start=1):
        doc = plans[key]
        if out_dir:
            doc["experiment"]["name"] = Path(out_dir).name
        run = plan_from_dict(doc, path=PLANS / file, runs=runs, model_map=model_map,
                             phase2=plans[2] if "from_phase2" in doc else None)
        log.info("demo %d/%d: %s", n, len(STEPS) + 1, what)
        write_expanded(run)
        outcomes = run_in_process(run.jobs, folder=run.layout.logs_dir("debug"), echo=False)
        for outcome in outcomes:
            if outcome.exception is not None:
                raise outcome.exception
    log.info("demo %d/%d: offline analysis", len(STEPS) + 1, len(STEPS) + 1)
    from analysis import build_report

    return build_report(run.layout.root)

