"""The demo: the three plans of manifests/demo/ run in this process, then the offline analysis.

Built-in tiny model -> phase 1 -> phase 2 (two metrics x two seeds) -> phase 3 (zero and sign_flip
against controls) -> report. The plans are ordinary plans: the demo reads them, applies its
command-line settings, writes them into the run folder and hands each phase to the job layer's
in-process executor, so `make submit PLAN=manifests/demo/phaseN.toml` would run the same jobs
(same ids) and `make status` / `make analyze` work on the demo's run folder.
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


def demo_plans(*, seq_len: int | None = None, max_samples: int | None = None, topk: int | None = None,
               control_repeats: int | None = None) -> dict[int, dict[str, Any]]:
    """The demo's plans (phase -> TOML dict) with the command line's settings applied."""
    if not (PLANS / "phase1.toml").is_file():
        raise UserError(f"the demo's plans are not at {PLANS}: run the demo from a checkout of the repository "
                        "(make demo)")
    plans = {phase: tomllib.loads((PLANS / f"phase{phase}.toml").read_text()) for phase in (1, 2, 3)}
    for phase, plan in plans.items():
        if seq_len is not None:
            plan["data"]["seq_len"] = seq_len
        if max_samples is not None and phase != 2:  # evaluation windows
            plan["data"]["max_samples"] = max_samples
    if topk is not None:
        plans[2]["grid"]["topk"] = [topk]
        plans[3]["grid"]["k"] = [topk]
    if control_repeats is not None:
        plans[3]["grid"]["repeats"] = control_repeats
    return plans


def run_demo(out_dir: str | None = None, *, train_steps: int | None = None, seq_len: int | None = None,
             max_samples: int | None = None, topk: int | None = None, control_repeats: int | None = None) -> Path:
    """Run the whole pipeline into the run folder; returns the path of report.html."""
    from esa.model.tiny import BUILTIN_TRAIN_STEPS, builtin_tiny_model

    plans = demo_plans(seq_len=seq_len, max_samples=max_samples, topk=topk, control_repeats=control_repeats)
    # esa:tiny-llama is the cached tiny model of the default training; another step count is another model.
    steps = train_steps or BUILTIN_TRAIN_STEPS
    model_map = {} if steps == BUILTIN_TRAIN_STEPS else {"esa:tiny-llama": str(builtin_tiny_model("llama", steps))}
    builtin_tiny_model("llama", steps)  # built (once, cached) before the jobs that load it
    runs = Path(out_dir).resolve().parent if out_dir else None
    for phase, what in ((1, "baseline"), (2, "profiling (grad_x_weight, act_mag x seeds 0, 1)"),
                        (3, "perturbation of the top-8 weights against random_k and bottom_k")):
        doc = plans[phase]
        if out_dir:
            doc["experiment"]["name"] = Path(out_dir).name
        run = plan_from_dict(doc, path=PLANS / f"phase{phase}.toml", runs=runs, model_map=model_map,
                             phase2=plans[2] if phase == 3 else None)
        log.info("demo %d/4: %s", phase, what)
        write_expanded(run)
        outcomes = run_in_process(run.jobs, folder=run.layout.logs_dir("debug"), echo=False)
        for outcome in outcomes:
            if outcome.exception is not None:
                raise outcome.exception
    log.info("demo 4/4: offline analysis")
    from analysis import build_report

    return build_report(run.layout.root)

