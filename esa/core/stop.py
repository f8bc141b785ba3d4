"""Stop requests: the cluster's warning signal becomes a flag that long loops check.

A cluster sends a signal before it ends a job (Slurm: USR1/USR2 before the time limit or on
pre-emption). The handler only sets a flag; a loop that can save its state (phase 2) notices
it at its next safe point, saves, and raises `Preempted`; `esa run` then exits with
EXIT_PREEMPTED so the job wrapper requeues the job, which resumes.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

__all__ = ["EXIT_PREEMPTED", "Preempted", "request_stop", "stop_requested", "clear_stop", "install_stop_signals",
           "stop_after_batches"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
_stop = threading.Event()


class Preempted(Exception):
    """The job saved a checkpoint and stopped; run it again to resume."""


def request_stop(*_: Any) -> None:
    """Ask the running job to checkpoint at the next batch boundary (signal-handler safe)."""
    _stop.set()


def stop_requested() -> bool:
    """Whether a stop was requested (or ESA_STOP_AFTER_BATCHES says so, for tests)."""
    return _stop.is_set()


def clear_stop() -> None:
    """Forget a stop request (a new job in the same process starts clean)."""
    _stop.clear()


def install_stop_signals(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGUSR2)) -> None:
    """Route the cluster's warning signals to `request_stop` (main thread only)."""
    for sig in signals:
        signal.signal(sig, request_stop)


def stop_after_batches() -> int | None:
    """ESA_STOP_AFTER_BATCHES=N makes a job stop itself after N batches (deterministic tests)."""
    value = os.environ.get("ESA_STOP_AFTER_BATCHES")
    return int(value) if value else None


