"""`esa.run(manifest)`: the one execution path of every command and every array task."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esa import provenance
from esa.errors import UserError
from esa.io import atomic_write_json, read_json
from esa.logs import add_file_log, get_logger
from esa.manifest import check_basic, manifest_id

log = get_logger("runner")

PhaseRunner = Callable[[dict[str, Any], Path], dict[str, Any]]
_PHASES: dict[int, PhaseRunner] = {}


def register_phase(phase: int) -> Callable[[PhaseRunner], PhaseRunner]:
    """Decorator: the function that runs manifests of `phase` (writes into the out dir)."""
    def wrap(fn: PhaseRunner) -> PhaseRunner:
        _PHASES[phase] = fn
        return fn
    return wrap


def _runner_for(phase: int) -> PhaseRunner:
    # Importing the phase modules registers them; kept lazy so `esa --help` stays fast.
    from esa import phases  # noqa: F401

    if phase not in _PHASES:
        raise UserError(f"phase {phase} is not implemented in this version of esa")
    return _PHASES[phase]


def run(manifest: dict[str, Any]) -> dict[str, Any]:
    """Run one manifest; writes results plus experiment_manifest.json into outputs.dir."""
    check_basic(manifest)
    manifest = {**manifest, "id": manifest.get("id") or manifest_id(manifest)}
    out = Path(manifest["outputs"]["dir"])
    out.mkdir(parents=True, exist_ok=True)
    # A previous run's record must not vouch for this one: it is written again only on success.
    (out / "experiment_manifest.json").unlink(missing_ok=True)
    handler = add_file_log(out / "esa.log")
    started = provenance.now_iso()
    t0 = time.perf_counter()
    log.info("phase %s job %s -> %s", manifest["phase"], manifest["id"], out)
    try:
        runner = _runner_for(int(manifest["phase"]))
        summary = runner(manifest, out)
        record = {"manifest": manifest, "provenance": {**provenance.collect(started),
                                                       "end_time": provenance.now_iso(),
                                                       "wall_seconds": time.perf_counter() - t0},
                  "status": "complete", "summary": summary}
        atomic_write_json(out / "experiment_manifest.json", record)
        (out / "error.json").unlink(missing_ok=True)  # a rerun that succeeds clears the old failure
        return summary
    except BaseException as exc:
        _write_error(out, manifest, started, exc)
        raise
    finally:
        import logging

        logging.getLogger("esa").removeHandler(handler)
        handler.close()


def _write_error(out: Path, manifest: dict[str, Any], started: str, exc: BaseException) -> None:
    """Record why a job failed (error.json) so status and analysis can say so."""
    import traceback

    from esa.checkpoint import Preempted

    kind = "preempted" if isinstance(exc, Preempted) else \
        "interrupted" if isinstance(exc, KeyboardInterrupt) else \
        "user_error" if isinstance(exc, UserError) else \
        "out_of_memory" if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError) else "exception"
    if isinstance(exc, SystemExit) and exc.code in (0, None):
        return
    try:
        atomic_write_json(out / "error.json", {
            "manifest_id": manifest.get("id"), "phase": manifest.get("phase"), "kind": kind,
            "type": type(exc).__name__, "message": str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            "traceback": traceback.format_exception(exc), "start_time": started, "end_time": provenance.now_iso()})
    except OSError:
        log.exception("could not write error.json")


def run_file(path: str | Path) -> dict[str, Any]:
    """Run the manifest stored in a JSON file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"manifest file '{path}' does not exist")
    try:
        manifest = read_json(path)
    except ValueError as exc:
        raise UserError(f"manifest file '{path}' is not valid JSON: {exc}") from exc
    from esa.schema import check_manifest, run_dir_of

    # Files are what plans and clusters run: they get the full JSON Schema (field-named errors,
    # outputs confined to the run folder) before any model work.
    check_manifest(manifest, run_dir=run_dir_of(path), source=f"manifest file '{path}'")
    return run(manifest)
