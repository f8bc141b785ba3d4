"""Where and how a result was produced: versions, hardware, git commit, Slurm ids, times."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import esa

_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "numpy", "h5py", "submitit")


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit() -> dict[str, Any]:
    """The commit of the ESA source tree this code runs from (None outside a git checkout)."""
    here = Path(esa.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty) if commit else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0], "esa": esa.__version__}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _gpus() -> list[dict[str, Any]]:
    if "torch" not in sys.modules:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    return [{"name": torch.cuda.get_device_name(i),
             "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
            for i in range(torch.cuda.device_count())]


def reset_peak_memory() -> None:
    """Start counting this process's peak memory afresh (a job's own peak, not an earlier job's in the
    same process): Linux's peak RSS (VmHWM) and torch's CUDA peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def memory_now() -> dict[str, int | None]:
    """This process's memory: resident now, peak resident since reset_peak_memory (else since start),
    and the CUDA allocator's peak (None without a GPU)."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    if "VmHWM" not in fields:
        import resource

        fields["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = None
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            gpu = int(torch.cuda.max_memory_allocated())
    return {"rss_bytes": fields.get("VmRSS"), "peak_rss_bytes": fields.get("VmHWM"), "peak_gpu_bytes": gpu}


def collect(start_time: str | None = None) -> dict[str, Any]:
    """A provenance record; call again with the same start_time at the end to add end_time."""
    return {
        "versions": _versions(),
        "git": git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "gpus": _gpus(),
        "slurm": {k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "SUBMITIT_"))},
        "argv": sys.argv,
        "start_time": start_time or now_iso(),
    }
