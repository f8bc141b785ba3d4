"""`esa.run(manifest)`: the one execution path of every command and every array task."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

from esa.core import provenance
from esa.core.errors import UserError
from esa.core.io import read_json
from esa.core.logs import add_file_log, get_logger
from esa.core.stop import Preempted
from esa.parallel.env import all_gather_objects, distributed_job
from esa.parallel.launch import DistEnv
from esa.results.records import ErrorRecord, JobRecord, write_record
from esa.spec.manifest import Manifest
from esa.spec.names import PHASES, phase_name

log = get_logger("runner")


def run(manifest: Manifest | dict[str, Any]) -> dict[str, Any]:
    """Run one manifest; writes results plus experiment_manifest.json into outputs.dir.

    A dict is read as a manifest's JSON form (checked, defaults filled); the phase's runner
    (named in esa.spec.names.PHASES) gets the typed manifest and the output folder."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict(manifest)
    if manifest.id is None:
        manifest = manifest.with_id()
    with distributed_job(manifest.model.device) as env:
        return _run(manifest, env)


def _run(manifest: Manifest, env: DistEnv) -> dict[str, Any]:
    """Run on this rank; rank 0 alone writes the job's records and esa.log."""
    out = Path(manifest.outputs.dir)
    writer = env.rank == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        # A previous run's record must not vouch for this one: it is written again only on success.
        (out / JobRecord.FILE).unlink(missing_ok=True)
    handler = add_file_log(out / "esa.log") if writer else None
    started = provenance.now_iso()
    provenance.reset_peak_memory()
    memory_at_start = provenance.memory_now()
    t0 = time.perf_counter()
    log.info("phase %s job %s -> %s%s", manifest.PHASE, manifest.id, out,
             f" (rank {env.rank} of {env.world_size})" if env.distributed else "")
    try:
        runner = PHASES.load(phase_name(manifest.PHASE))
        summary = runner(manifest, out)
        memory = all_gather_objects({"rank": env.rank, "host": socket.gethostname(),
                                     "rss_at_start_bytes": memory_at_start["rss_bytes"], **provenance.memory_now()})
        if writer:
            record = JobRecord(manifest=manifest.to_dict(), status="complete", summary=summary,
                               provenance={**provenance.collect(started), "end_time": provenance.now_iso(),
                                           "wall_seconds": time.perf_counter() - t0, "launch": _launch(env),
                                           "memory": memory})
            write_record(out, record)
            (out / ErrorRecord.FILE).unlink(missing_ok=True)  # a rerun that succeeds clears the old failure
        return summary
    except BaseException as exc:
        if writer:
            _write_error(out, manifest, started, exc)
        raise
    finally:
        if handler is not None:
            logging.getLogger("esa").removeHandler(handler)
            handler.close()


def _launch(env: DistEnv) -> dict[str, Any]:
    """How the job ran: launcher and ranks."""
    return {"launcher": env.launcher, "world_size": env.world_size, "sharded": env.distributed}


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, Preempted):
        return "preempted"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, UserError):
        return "user_error"
    if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
        return "out_of_memory"
    return "exception"


def _write_error(out: Path, manifest: Manifest, started: str, exc: BaseException) -> None:
    """Record why a job failed (error.json) so status and analysis can say so."""
    import traceback

    if isinstance(exc, SystemExit) and exc.code in (0, None):
        return
    text = str(exc).strip()
    try:
        write_record(out, ErrorRecord(
            kind=_error_kind(exc), manifest_id=manifest.id, phase=manifest.PHASE, type=type(exc).__name__,
            message=text.splitlines()[0] if text else "", traceback=traceback.format_exception(exc),
            start_time=started, end_time=provenance.now_iso()))
    except OSError:
        log.exception("could not write error.json")


def run_file(path: str | Path) -> dict[str, Any]:
    """Run the manifest stored in a JSON file (inside a run folder: its outputs must stay inside it)."""
    from esa.results.layout import RunLayout
    from esa.spec.schema import check_manifest

    path = Path(path)
    if not path.exists():
        raise UserError(f"manifest file '{path}' does not exist")
    try:
        doc = read_json(path)
    except UserError as exc:
        raise UserError(f"manifest file '{path}': {exc}") from None
    layout = RunLayout.of_manifest_file(path)
    # Files are what plans and clusters run: they get the full schema (field-named errors, outputs
    # confined to the run folder) before any model work.
    manifest = check_manifest(doc, run_dir=None if layout is None else layout.root,
                              source=f"manifest file '{path}'")
    return run(manifest)
