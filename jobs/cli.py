"""`python -m jobs submit|status|resubmit`: what the Makefile's cluster targets call.

  python -m jobs submit --phase 2 [--plan P] [--tiny] [--executor slurm|local|debug] [--dry-run]
                        [--after JOBID[,JOBID]] [--no-chain] [--no-analyze] [--trust-remote-code]
  python -m jobs status [RUN] [--json] [--no-sacct] [--deep]
  python -m jobs resubmit [RUN] [--executor ...] [--dry-run] [--trust-remote-code]
A UserError (or a file-system error) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from esa.core.errors import UserError, os_error_line
from esa.results.layout import RunLayout


def default_plan(phase: int, tiny: bool) -> Path:
    """manifests/phaseN.toml, or manifests/tiny/phaseN.toml with --tiny."""
    return Path("manifests") / ("tiny" if tiny else "") / f"phase{phase}.toml"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m jobs`."""
    parser = argparse.ArgumentParser(prog="python -m jobs", description="ESA job layer: submit plans, "
                                     "show their status, resubmit what failed.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="expand + validate a plan and submit its unfinished manifests")
    p.add_argument("--phase", type=int, choices=(1, 2, 3), help="which phase's plan (manifests/phaseN.toml)")
    p.add_argument("--plan", help="the plan file (default manifests/[tiny/]phaseN.toml)")
    p.add_argument("--tiny", action="store_true", help="use manifests/tiny/phaseN.toml (the built-in tiny model)")
    p.add_argument("--executor", default="slurm", choices=("slurm", "local", "debug"))
    p.add_argument("--dry-run", action="store_true", help="validate and print what would be submitted")
    p.add_argument("--after", default="", help="Slurm job id(s) this submission waits for (afterok)")
    p.add_argument("--no-chain", action="store_true",
                   help="phase 3: do not wait for this run's still-queued phase-2 jobs")
    p.add_argument("--no-analyze", action="store_true", help="phase 3: no aggregation job afterwards")
    p.add_argument("--max-array-size", type=int, help="override the cluster's MaxArraySize (testing)")
    p.add_argument("--model-map", action="append", default=[], metavar="PLAN_ID=ID",
                   help="use another model for a plan's model id, e.g. esa:tiny-llama=/path/to/model "
                   "(repeatable; tests use it to skip training the built-in tiny model)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow manifests with model.trust_remote_code (the model repository's own code runs)")

    p = sub.add_parser("status", help="one line per manifest: pending / running / done / failed (reason)")
    p.add_argument("run", nargs="?", help="run folder (default: the most recent under $ESA_RUNS or ./runs)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--no-sacct", action="store_true", help="result files only; do not ask Slurm")
    p.add_argument("--deep", action="store_true", help="hash every result file against its checksum "
                   "(default: large files whose modification time is unchanged are checked by size)")

    p = sub.add_parser("resubmit", help="submit again only the failed, pre-empted or missing manifests")
    p.add_argument("run", nargs="?", help="run folder (default: the most recent)")
    p.add_argument("--executor", default="slurm", choices=("slurm", "local", "debug"))
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--max-array-size", type=int)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow manifests with model.trust_remote_code (the model repository's own code runs)")
    return parser


def _options(args: argparse.Namespace) -> "Options":  # noqa: F821 - imported lazily
    from jobs.submit import Options

    return Options(executor=args.executor, dry_run=args.dry_run,
                   after=[a for a in str(getattr(args, "after", "") or "").replace(":", ",").split(",") if a],
                   chain=not getattr(args, "no_chain", False), analyze=not getattr(args, "no_analyze", False),
                   max_array_size=args.max_array_size, model_map=_model_map(getattr(args, "model_map", [])),
                   trust_remote_code=args.trust_remote_code)


def _model_map(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--model-map takes PLAN_ID=ID, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submit import submit

    if not args.plan and not args.phase:
        raise UserError("say which phase (--phase N / make submit PHASE=N) or which plan (--plan FILE)")
    plan = Path(args.plan) if args.plan else default_plan(args.phase, args.tiny)
    record = submit(plan, _options(args))
    if args.phase and record.get("phase") not in (None, args.phase):
        print(f"note: PHASE={args.phase} but the plan {plan} is a phase-{record['phase']} plan", file=sys.stderr)
    return 1 if record.get("failed") else 0


def _run(run: str | None) -> RunLayout:
    """RUN as given, else the most recently active run (saying so when there are several)."""
    layout = RunLayout.find(run)
    if not run:
        others = [p for p in layout.root.parent.glob("*") if (p / "manifests").is_dir() and p != layout.root]
        if others:
            print(f"(RUN not given: showing the most recent run, {layout.root}; others: "
                  f"{', '.join(map(str, others))})", file=sys.stderr)
    return layout


def _cmd_status(args: argparse.Namespace) -> int:
    from jobs.status import collect, format_table, rows_as_json

    layout = _run(args.run)
    rows = collect(layout, use_sacct=not args.no_sacct, deep=True if args.deep else None)
    if args.json:
        print(json.dumps(rows_as_json(rows), indent=2))
    else:
        print(f"run {layout.root}")
        print(format_table(rows))
    return 0


def _cmd_resubmit(args: argparse.Namespace) -> int:
    from jobs.submit import resubmit

    records = resubmit(_run(args.run).root, _options(args))
    return 1 if any(r.get("failed") for r in records) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; a UserError is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    handlers = {"submit": _cmd_submit, "status": _cmd_status, "resubmit": _cmd_resubmit}
    try:
        return handlers[args.command](args)
    except UserError as exc:
        print(f"jobs {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only run folder or ESA_RUNS, a full disk
        print(f"jobs {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jobs {args.command}: interrupted", file=sys.stderr)
        return 130
