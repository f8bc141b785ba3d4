"""Issue #12 for jobs of several ranks (torchrun, gloo): a finished job is not run again on any rank,
a folder holding another job's result is refused on every rank (no rank left waiting), and SIGTERM
to one rank checkpoints every rank at the same batch; all ranks then end (none requeues) and the
rerun resumes to the uninterrupted job's scores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from esa.results.scorefile import read_scores
from esa.results.state import job_state
from esa.spec.manifest import Manifest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**{k: v for k, v in os.environ.items() if k != "ESA_STOP_AFTER_BATCHES"}, "OMP_NUM_THREADS": "1"}


def manifest_file(model: Path, out: Path, path: Path, windows: int, metric: str = "grad_x_weight") -> Path:
    m = Manifest.from_dict({"phase": 2, "model": {"id": str(model), "device": "cpu", "dtype": "fp32"},
                            "data": {"seq_len": 16, "max_samples": windows, "pool_size": windows, "batch_size": 2},
                            "metric": {"name": metric}, "ranking": {"mode": "per_layer", "topk": 5},
                            "outputs": {"dir": str(out)}}, partial=True).with_id()
    path.write_text(json.dumps(m.to_dict()))
    return path


def esa_run_2(path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`esa run PATH` as 2 ranks (the EsaTask path: stop signals installed)."""
    return subprocess.run([*TORCHRUN, "-m", "esa", "run", str(path)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def files_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()
            if p.is_file() and p.name != "esa.log"}


def test_a_finished_sharded_job_is_not_rerun_and_another_jobs_folder_is_refused(tiny_llama, tmp_path):
    out = tmp_path / "job"
    path = manifest_file(tiny_llama, out, tmp_path / "m.json", windows=6)
    first = esa_run_2(path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert job_state(out).done
    before = files_of(out)
    again = esa_run_2(path, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert files_of(out) == before, "a rerun of a finished sharded job touched its result"
    assert (out / "esa.log").read_text().count(" -> ") == 1, "the job ran twice"
    other = manifest_file(tiny_llama, out, tmp_path / "other.json", windows=6, metric="grad_squared")
    refused = esa_run_2(other, timeout=300)  # every rank must end: a rank left in a collective would hang here
    assert refused.returncode != 0
    # one line from each rank that got to say it (torchrun ends the other worker once one fails, and
    # reports the failed workers in its own words)
    lines = [ln for ln in refused.stderr.splitlines() if "holds the complete results of another job" in ln]
    assert lines and all(ln.startswith("esa run") and "error:" in ln for ln in lines), refused.stderr[-3000:]
    assert files_of(out) == before


def _rank_pid(launcher: int, rank: int, timeout: float = 120) -> int:
    """The pid of the worker process of `rank` under the torchrun process `launcher`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == launcher and f"RANK={rank}".encode() in environ:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} under pid {launcher}")


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_every_rank_and_the_rerun_resumes(tiny_llama, tmp_path):
    out = tmp_path / "job"
    path = manifest_file(tiny_llama, out, tmp_path / "m.json", windows=800)
    proc = subprocess.Popen([*TORCHRUN, "-m", "esa", "run", str(path)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while "calibration windows" not in ((out / "esa.log").read_text() if (out / "esa.log").exists() else ""):
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "the job never reached its batch loop"
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 must stop at the same batch
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert err.count("terminated by SIGTERM: checkpoint saved") == 2, err[-4000:]  # both ranks end, none requeues
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and 0 < state["batches_done"] < 400, state
    assert sorted(p.name for p in (out / "checkpoint").glob("accumulators.rank*.safetensors")) == [
        "accumulators.rank0.safetensors", "accumulators.rank1.safetensors"]
    assert not job_state(out).done
    resumed = esa_run_2(path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from the checkpoint after batch {state['batches_done']}" in (out / "esa.log").read_text()
    assert job_state(out).done
    reference = tmp_path / "reference"
    ref = esa_run_2(manifest_file(tiny_llama, reference, tmp_path / "ref.json", windows=800))
    assert ref.returncode == 0, ref.stderr[-4000:]
    got, want = read_scores(out / "scores.h5"), read_scores(reference / "scores.h5")
    assert list(got) == list(want)
    for name in want:  # the same sums over the same ranks, in the same order: equal
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
