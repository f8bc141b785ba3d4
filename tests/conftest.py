"""Shared fixtures: an isolated ESA cache and small saved tiny models of each architecture."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's cache, and never reach a hub.
_SESSION_CACHE = tempfile.mkdtemp(prefix="esa-test-cache-")
os.environ["ESA_CACHE_DIR"] = _SESSION_CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# esa:tiny-<arch> trains the built-in model once per cache; a few steps keep the suite fast.
os.environ.setdefault("ESA_TINY_STEPS", "30")

ARCHS = ("llama", "mistral", "phi3", "mixtral", "gpt_neox", "gpt2")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """make(arch, seed=0, train_steps=None) -> path of a small saved model (built once per args)."""
    from esa.model.tiny import TinySize, write_tiny_model

    built: dict[tuple, Path] = {}

    def make(arch: str = "llama", seed: int = 0, train_steps: int | None = None) -> Path:
        key = (arch, seed, train_steps)
        if key not in built:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
            size = TinySize(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, max_positions=512)
            built[key] = write_tiny_model(arch, out, seed=seed, train_steps=train_steps, seq_len=64, size=size)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    """A small untrained tiny Llama saved with save_pretrained."""
    return tiny_model_factory("llama")


def run_esa(*args: str, cwd: str | Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m esa ARGS` as a user would, capturing output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "esa", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def esa_cli():
    """The run_esa helper as a fixture."""
    return run_esa


def slurm_cluster_problem() -> str | None:
    """None when the single-node test cluster answers (make slurm-up), else why it cannot be used."""
    for tool in ("sinfo", "sbatch", "sacct", "scontrol", "scancel", "squeue"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: start the test cluster with `make slurm-up`"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            return f"sinfo failed ({r.stderr.strip()[:200]}): is the cluster up? (`make slurm-up`)"
        states = r.stdout.split()
        if not any(s.rstrip("*~#$@+") in {"idle", "mixed", "allocated", "completing"} for s in states):
            return f"no usable node (sinfo says {states or 'nothing'}): `make slurm-up`"
        r = subprocess.run(["sacct", "-n", "-X", "-S", "now-1hours"], capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            return f"sacct failed ({r.stderr.strip()[:200]}): slurmdbd is not answering"
    except subprocess.TimeoutExpired as e:
        return f"the cluster is not responding ({e.cmd[0]} timed out)"
    return None


@pytest.fixture(scope="module")
def cluster():
    """Skip (or, with ESA_REQUIRE_SLURM=1 as in make test-slurm, fail) without a working cluster."""
    problem = slurm_cluster_problem()
    if problem:
        if os.environ.get("ESA_REQUIRE_SLURM") == "1":
            pytest.fail(f"ESA_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


@pytest.fixture
def make_readonly(tmp_path):
    """make(name, populate=None) -> a folder nobody may write to, filled by `populate(folder)` first:
    chmod for a user; a read-only bind mount for root (skips where root cannot mount)."""
    mounted: list[Path] = []
    chmodded: list[Path] = []

    def make(name: str = "ro", populate=None) -> Path:
        folder = tmp_path / name
        if os.geteuid() != 0:
            folder.mkdir()
            if populate:
                populate(folder)
            folder.chmod(0o555)
            chmodded.append(folder)
            return folder
        src = tmp_path / f"{name}-src"
        src.mkdir()
        folder.mkdir()
        if populate:
            populate(src)
        ok = subprocess.run(["mount", "--bind", str(src), str(folder)], capture_output=True).returncode == 0
        ok = ok and subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)],
                                   capture_output=True).returncode == 0
        if not ok:
            subprocess.run(["umount", str(folder)], capture_output=True)
            pytest.skip("root cannot make a read-only folder here (no bind mounts)")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)
    for folder in chmodded:
        folder.chmod(0o755)


@pytest.fixture
def readonly_dir(make_readonly):
    """An empty folder nobody may write to."""
    return make_readonly()
