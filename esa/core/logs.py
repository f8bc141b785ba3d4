"""Logging set-up and progress bars shared by every command."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_quiet = False


def setup_logging(level: str = "INFO", quiet: bool = False, rank: int = 0) -> None:
    """Configure the `esa` logger on stderr; `quiet` keeps warnings and errors only. In a sharded
    job only rank 0 reports progress; the other ranks print their warnings and errors, tagged."""
    global _quiet
    _quiet = quiet or rank > 0
    logger = logging.getLogger("esa")
    console_level = logging.WARNING if _quiet else getattr(logging, level.upper(), logging.INFO)
    # The logger passes everything from INFO up; each handler filters for its reader, so a
    # job's esa.log keeps the INFO record even when the console is --quiet.
    logger.setLevel(min(console_level, logging.INFO))
    handler = next((h for h in logger.handlers if getattr(h, "_esa_console", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._esa_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    tag = f"[rank {rank}] " if rank else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {tag}%(message)s", "%H:%M:%S"))
    handler.setLevel(console_level)
    logger.propagate = False
    if "transformers" in sys.modules:  # never imported here: login-node commands stay light
        quiet_transformers()


def quiet_transformers() -> None:
    """Silence transformers' chatter (weight-loading bars, shard writers): noise for our users.

    Called where transformers is imported (model loading, tiny models) and by setup_logging."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def add_file_log(path: str | Path) -> logging.Handler:
    """Also log to `path` (the job's own log file); returns the handler so it can be removed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("esa")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


PROGRESS_INTERVAL_ENV = "ESA_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 60.0  # seconds between progress lines in a batch log


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """Progress of a loop: a tqdm bar on a terminal; in a batch log (stderr not a terminal) plain
    log lines with count, rate and ETA every ESA_PROGRESS_INTERVAL seconds (default 60) and at the
    end, never carriage-return fragments. Off with --quiet."""
    if _quiet:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, leave=False, file=sys.stderr, mininterval=0.2,
                        dynamic_ncols=True)
        return
    yield from _logged_progress(items, total, desc, _progress_interval())


def _progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(PROGRESS_INTERVAL_ENV, DEFAULT_PROGRESS_INTERVAL)))
    except ValueError:
        return DEFAULT_PROGRESS_INTERVAL


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_line(desc: str, done: int, total: int | None, elapsed: float) -> str:
    """``desc: 12/200 (6%), 1.52 it/s, elapsed 0:08, ETA 2:04`` (what a batch log shows)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    count = f"{done}/{total} ({100 * done / total:.0f}%)" if total else f"{done}"
    text = f"{desc or 'progress'}: {count}, {rate:.3g} it/s, elapsed {_duration(elapsed)}"
    if total and rate > 0 and done < total:
        text += f", ETA {_duration((total - done) / rate)}"
    return text


def _logged_progress(items: Iterable[T], total: int | None, desc: str, interval: float) -> Iterator[T]:
    log = get_logger("progress")
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval and (total is None or done < total):
            log.info(progress_line(desc, done, total, now - start))
            last = now
    if done:
        log.info(progress_line(desc, done, total, time.monotonic() - start))


def get_logger(name: str) -> logging.Logger:
    """A child of the `esa` logger."""
    return logging.getLogger(f"esa.{name}" if not name.startswith("esa") else name)
