"""Issue #12: SIGTERM (scancel, scontrol requeue, kill) checkpoints a phase-2 job like USR1/USR2, and a
resumed job writes exactly what an uninterrupted one writes: the same rows in the same order, and
the same random draws downstream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from esa.spec.manifest import Manifest

REPO = Path(__file__).resolve().parents[2]


def profile_manifest(model: Path, out: Path, windows: int, metric: str = "grad_x_weight") -> Manifest:
    return Manifest.from_dict({"phase": 2, "model": {"id": str(model), "device": "cpu", "dtype": "fp32"},
                               "data": {"seq_len": 16, "max_samples": windows, "pool_size": windows,
                                        "batch_size": 1},
                               "metric": {"name": metric}, "ranking": {"mode": "per_layer", "topk": 5},
                               "outputs": {"dir": str(out)}}, partial=True).with_id()


def write_manifest(m: Manifest, path: Path) -> Path:
    path.write_text(json.dumps(m.to_dict()))
    return path


def wait_for_loop(log: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while "calibration windows" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None, "the job ended before its batch loop"
        assert time.monotonic() < deadline, "the job never reached its batch loop"
        time.sleep(0.1)


def h5_rows(path: Path) -> dict:
    """Everything order-sensitive in a score file: dataset order, ranked rows, stats rows."""
    with h5py.File(path, "r") as f:
        return {"scores": list(f["scores"]), "topk": [p.decode() for p in f["topk/param"][()]],
                "topk_flat": f["topk/flat_index"][()].tolist(), "bottomk": [p.decode() for p in f["bottomk/param"][()]],
                "stats": [n.decode() for n in f["stats/name"][()]],
                "values": {n: f["scores"][n][()] for n in f["scores"]}}


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_rerun_resumes(tiny_llama, tmp_path):
    from esa.runner import run

    out = tmp_path / "job"
    m = profile_manifest(tiny_llama, out, windows=1500)
    path = write_manifest(m, tmp_path / "m.json")
    env = {k: v for k, v in os.environ.items() if k != "ESA_STOP_AFTER_BATCHES"}
    proc = subprocess.Popen([sys.executable, "-m", "esa", "run", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_loop(out / "esa.log", proc)
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30, "SIGTERM must end the job well inside Slurm's KillWait"
    assert proc.returncode == 143, err
    assert "checkpoint saved" in err and "Traceback" not in err, err
    assert (out / "checkpoint" / "state.json").is_file()
    done = json.loads((out / "checkpoint" / "state.json").read_text())["batches_done"]
    assert 0 < done < 1500
    assert json.loads((out / "error.json").read_text())["kind"] == "preempted"
    r = subprocess.run([sys.executable, "-m", "esa", "run", str(path)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"resuming from the checkpoint after batch {done}" in (out / "esa.log").read_text()
    reference = tmp_path / "reference"
    run(m.with_outputs(dir=str(reference)))
    got, want = h5_rows(out / "scores.h5"), h5_rows(reference / "scores.h5")
    for name in want["values"]:
        np.testing.assert_array_equal(got["values"][name], want["values"][name], err_msg=name)
    assert {k: v for k, v in got.items() if k != "values"} == {k: v for k, v in want.items() if k != "values"}


def test_sigterm_where_nothing_can_be_saved_ends_the_job_at_once(tiny_llama, tmp_path):
    out = tmp_path / "b"
    m = Manifest.from_dict({"phase": 1, "model": {"id": str(tiny_llama), "device": "cpu", "dtype": "fp32"},
                            "data": {"seq_len": 16, "batch_size": 1}, "outputs": {"dir": str(out)}},
                           partial=True).with_id()
    path = write_manifest(m, tmp_path / "m.json")
    proc = subprocess.Popen([sys.executable, "-m", "esa", "run", str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while "data: " not in ((out / "esa.log").read_text() if (out / "esa.log").exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated by signal SIGTERM" in err
    assert json.loads((out / "error.json").read_text())["kind"] == "terminated"


def test_a_resumed_job_writes_rows_in_the_uninterrupted_order(tiny_llama, tmp_path, monkeypatch):
    """Item 4: the resumed sums come back from the checkpoint (safetensors sorts names); the rows of
    topk/bottomk/stats, the datasets and the exports follow the model's order all the same."""
    from esa.core.stop import Preempted
    from esa.runner import run

    out, reference = tmp_path / "job", tmp_path / "reference"
    m = profile_manifest(tiny_llama, out, windows=4)
    monkeypatch.setenv("ESA_STOP_AFTER_BATCHES", "1")
    with pytest.raises(Preempted):
        run(m)
    monkeypatch.delenv("ESA_STOP_AFTER_BATCHES")
    run(m)
    assert "resuming from the checkpoint" in (out / "esa.log").read_text()
    run(m.with_outputs(dir=str(reference)))
    got, want = h5_rows(out / "scores.h5"), h5_rows(reference / "scores.h5")
    assert got["scores"] == want["scores"] and got["stats"] == want["stats"]
    assert (got["topk"], got["topk_flat"], got["bottomk"]) == (want["topk"], want["topk_flat"], want["bottomk"])
    for name in ("top_weights.csv", "sensitivity_stats.csv", "sensitivity_stats.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_control_draws_do_not_depend_on_the_order_of_the_targets(tiny_llama):
    """Item 4, phase 3: random_k and magnitude_matched draw the same weights for the same targets and seed."""
    from transformers import AutoModelForCausalLM

    from esa.perturb.controls import magnitude_matched, random_k
    from esa.perturb.perturbations import cpu_generator
    from esa.perturb.targets import resolve_targets

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    refs = ["model.layers.1.mlp.down_proj.weight:3,4", "model.layers.0.self_attn.q_proj.weight:1,2",
            "lm_head.weight:5,6", "model.layers.0.self_attn.q_proj.weight:7,8"]
    forward = resolve_targets(model, refs)
    backward = resolve_targets(model, list(reversed(refs)))
    for draw in (random_k, magnitude_matched):
        a = draw(model, forward, cpu_generator(11), clip=True)
        b = draw(model, backward, cpu_generator(11), clip=True)
        assert [(t.param, t.flat_index) for t in a] == [(t.param, t.flat_index) for t in b], draw.__name__
