"""Checksums of a job's result files, recorded in experiment_manifest.json (written last).

When a job finishes, the runner lists every result file of its folder (the top-level files and
``plots/``, without the bookkeeping files ``experiment_manifest.json``, ``error.json`` and
``esa.log``, hidden temporaries and other jobs' subfolders) with its size, modification time and
SHA-256, and writes the list into ``experiment_manifest.json`` together with ``status:
complete``. :func:`verify_files` compares a folder against that list, so a file that was
truncated, partly overwritten or edited after the job finished is detected by `make status`,
`make submit` and the analysis alike.

Cost: sizes are always compared. The SHA-256 of a file is computed when the file is small (at
most ``ALWAYS_HASH_BYTES``), when its modification time differs from the recorded one (any
write changes it: a copy without ``-p``, an edit, a partial overwrite), or when a deep check is
asked for (``deep=True``, ``ESA_VERIFY=full``), so that `make status` over a run of multi-GB
score files stays fast. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from esa.core.errors import ResultFileError

__all__ = ["BOOKKEEPING", "ALWAYS_HASH_BYTES", "result_files", "file_digests", "verify_files", "deep_verify"]

BOOKKEEPING = frozenset({"experiment_manifest.json", "error.json", "esa.log"})
SUBFOLDERS = ("plots",)  # result subfolders of a job; any other subfolder is another job's or a checkpoint
ALWAYS_HASH_BYTES = 64 << 20
_BLOCK = 8 << 20


def deep_verify() -> bool:
    """ESA_VERIFY=full: hash every result file, whatever its size and modification time."""
    return os.environ.get("ESA_VERIFY", "").strip().lower() == "full"


def result_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The result files of a job folder (relative paths, sorted)."""
    folder = Path(folder)
    out = [Path(p.name) for p in folder.iterdir()
           if p.is_file() and not p.name.startswith(".") and p.name not in BOOKKEEPING]
    for sub in SUBFOLDERS:
        if (folder / sub).is_dir():
            out += [Path(sub) / p.name for p in (folder / sub).iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(out)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "mtime_ns", "sha256"}} of every result file of `folder`."""
    folder = Path(folder)
    out = {}
    for rel in result_files(folder):
        st = (folder / rel).stat()
        out[rel.as_posix()] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_of(folder / rel)}
    return out


def verify_files(folder: str | os.PathLike[str], recorded: dict[str, Any], deep: bool | None = None) -> None:
    """Check the files of `folder` against the list written with the complete record.

    Raises ResultFileError with a one-line reason when a recorded file is missing, has another
    size, or (see the module docstring for when it is computed) another SHA-256."""
    folder = Path(folder)
    deep = deep_verify() if deep is None else deep
    for rel, want in sorted(recorded.items()):
        path = folder / rel
        try:
            st = path.stat()
        except OSError:
            raise ResultFileError(f"{rel} is missing (the complete record lists it)") from None
        if not isinstance(want, dict):
            raise ResultFileError(f"experiment_manifest.json: malformed entry for {rel}")
        if st.st_size != want.get("size"):
            raise ResultFileError(f"{rel} has {st.st_size} bytes, the complete record says {want.get('size')} "
                                  "(truncated or overwritten after the job finished)")
        if deep or st.st_size <= ALWAYS_HASH_BYTES or st.st_mtime_ns != want.get("mtime_ns"):
            if sha256_of(path) != want.get("sha256"):
                raise ResultFileError(f"{rel} does not match its checksum in experiment_manifest.json "
                                      "(changed after the job finished)")
