"""Logging set-up and progress bars shared by every command."""

from __future__ import annotations

import logging
import sys
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


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """A tqdm progress bar on stderr, off with --quiet; sparse updates when not on a terminal."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    yield from tqdm(items, total=total, desc=desc, disable=_quiet, leave=False, file=sys.stderr,
                    mininterval=0.2 if interactive else 10.0, dynamic_ncols=True)


def get_logger(name: str) -> logging.Logger:
    """A child of the `esa` logger."""
    return logging.getLogger(f"esa.{name}" if not name.startswith("esa") else name)
