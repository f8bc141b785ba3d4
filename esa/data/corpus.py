"""The built-in corpus: the Python standard library's own source, split by file.

It exists on every machine that runs ESA, needs no network, and is large enough (~11 MB) to
train a tiny model to a meaningful perplexity. Files are assigned to splits by a hash of their
path, so the held-out splits never share a file with the training split.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

from esa.core.errors import UserError

SPLITS = ("train", "validation", "test")
# Folders whose files are mostly test fixtures or generated tables: they would dominate a
# tiny model's training data without teaching it ordinary code.
_SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "encodings"}


def stdlib_root() -> Path:
    """The folder holding the running interpreter's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def _split_of(rel_path: str) -> str:
    bucket = zlib.crc32(rel_path.encode("utf-8")) % 20
    return "validation" if bucket == 0 else "test" if bucket == 1 else "train"


def builtin_files(split: str) -> list[Path]:
    """The source files of one split, in a fixed (sorted) order."""
    if split not in SPLITS:
        raise UserError(f"the built-in corpus has splits {', '.join(SPLITS)}, not '{split}'")
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIPPED_DIRS for part in rel.parts[:-1]):
            continue
        if _split_of(rel.as_posix()) == split:
            files.append(path)
    return files


def builtin_documents(split: str, max_bytes: int | None = None) -> list[str]:
    """One document per source file, up to `max_bytes` of text in total."""
    docs: list[str] = []
    total = 0
    for path in builtin_files(split):
        text = path.read_text(encoding="utf-8", errors="replace")
        if max_bytes is not None and total + len(text) > max_bytes:
            if not docs:
                docs.append(text[:max_bytes])
            break
        docs.append(text)
        total += len(text)
    return docs


def builtin_fingerprint(split: str, max_bytes: int | None = None) -> str:
    """Identifies the built-in corpus content for cache keys: file list, sizes and mtimes."""
    parts = [f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in builtin_files(split)]
    return f"builtin:{split}:{max_bytes}:{zlib.crc32(chr(10).join(parts).encode()):08x}"
