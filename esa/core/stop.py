"""Stop requests: the cluster's signals become a flag that long loops check.

A cluster sends a signal before it ends a job (Slurm: USR1/USR2 before the time limit or on
pre-emption). The handler only sets a flag; a loop that can save its state (phase 2) notices
it at its next safe point, saves, and raises `Preempted`; `esa run` then exits with
EXIT_PREEMPTED so the job wrapper requeues the job, which resumes.

SIGTERM (scancel, `scontrol requeue`, kill; Slurm sends SIGKILL KillWait seconds later) is a
stop request too. Once a loop that checkpoints is running (it calls `defer_termination`), it
checkpoints at its next batch boundary, as on USR1/USR2, and the job ends with EXIT_TERMINATED
instead of asking to be requeued (a cancelled job stays cancelled; `scontrol requeue` requeues
it by itself; either way the next run resumes). Before that point, or in a job with nothing to
save, SIGTERM ends the job at once by raising `Terminated`.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

__all__ = ["EXIT_PREEMPTED", "EXIT_TERMINATED", "Preempted", "Terminated", "request_stop", "stop_requested",
           "clear_stop", "install_stop_signals", "stop_after_batches", "defer_termination", "terminated"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
EXIT_TERMINATED = 143  # 128 + SIGTERM, the shell's convention
_stop = threading.Event()
_terminated = threading.Event()
_deferred = threading.Event()


class Preempted(Exception):
    """The job saved a checkpoint and stopped; run it again to resume."""


class Terminated(BaseException):
    """SIGTERM ended the job where there was nothing to save.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` turns it into
    another error."""


def request_stop(*_: Any) -> None:
    """Ask the running job to checkpoint at the next batch boundary (signal-handler safe)."""
    _stop.set()


def stop_requested() -> bool:
    """Whether a stop was requested (or ESA_STOP_AFTER_BATCHES says so, for tests)."""
    return _stop.is_set()


def clear_stop() -> None:
    """Forget a stop request (a new job in the same process starts clean)."""
    _stop.clear()
    _terminated.clear()
    _deferred.clear()


def terminated() -> bool:
    """Whether the stop request came from SIGTERM (the job is ending, not being requeued by esa)."""
    return _terminated.is_set()


def defer_termination() -> None:
    """From now on SIGTERM only asks for a checkpoint at the next batch boundary (see the module docstring)."""
    _deferred.set()


def _on_terminate(signum: int, frame: Any) -> None:
    _terminated.set()
    _stop.set()
    if not _deferred.is_set():
        raise Terminated(f"terminated by signal {signal.Signals(signum).name} (scancel, scontrol requeue or kill) "
                         "before anything could be saved")


def install_stop_signals(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGUSR2), terminate: bool = True) -> None:
    """Route the cluster's warning signals to `request_stop`, and SIGTERM to the handler the module
    docstring describes (main thread only). submitit's own handlers (USR2: requeue at once, TERM:
    ignored) are replaced."""
    for sig in signals:
        signal.signal(sig, request_stop)
    if terminate:
        signal.signal(signal.SIGTERM, _on_terminate)


def stop_after_batches() -> int | None:
    """ESA_STOP_AFTER_BATCHES=N makes a job stop itself after N batches (deterministic tests)."""
    value = os.environ.get("ESA_STOP_AFTER_BATCHES")
    return int(value) if value else None


