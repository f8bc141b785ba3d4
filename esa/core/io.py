"""Small file helpers: atomic writes and JSON that never contains NaN literals.

Atomic writes go through a temporary file in the destination folder (``.<name>.<random>.tmp``)
and a rename; the file then gets the mode an ordinary ``open()`` would give it under the
process's umask (0644 under 022, 0664 under 002), not ``mkstemp``'s private 0600, so that
colleagues sharing a run folder can read the results.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from esa.core.errors import ResultFileError


def jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars, tuples, Paths and non-finite floats into plain JSON values.

    Non-finite floats become None: JSON has no NaN, and a reader should see "missing", not a
    number that parses differently in every language.
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


TEMP_SUFFIX = ".tmp"


def temp_prefix(name: str) -> str:
    """The prefix of the temporary files an atomic write of `name` uses (``.<name>.``)."""
    return f".{name}."


def is_temporary(name: str) -> bool:
    """Whether a file name is one of the temporaries atomic writes leave behind when killed."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0666 minus the umask)."""
    return 0o666 & ~current_umask()


def make_temp_file(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file beside `path`, with the umask's mode rather than 0600."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, shared_file_mode())
    except OSError:
        pass  # a file system without modes (some network mounts): keep what it gives
    return fd, tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and a rename.

    A reader (or a job killed mid-write) sees either the old file or the whole new one. The file
    gets the umask's mode (see the module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON (non-finite floats become null)."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (esa writes non-finite values as null)")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; ResultFileError (a UserError) with a one-line reason when it is missing,
    unreadable or not valid JSON. NaN / Infinity literals (which Python's json accepts but JSON
    does not have, and esa never writes) make a file invalid."""
    path = Path(path)
    if not path.is_file():
        raise ResultFileError(f"{path.name} is missing")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{path.name} is not valid JSON ({exc})") from None
    except ValueError as exc:
        raise ResultFileError(f"{path.name} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ResultFileError(f"{path.name} cannot be read ({exc.strerror})") from None
