"""Phase 2 fails loudly and never leaves a result that looks complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from esa.cli import main
from tests.conftest import run_esa


def test_unknown_metric_lists_the_valid_ones(tiny_llama, tmp_path):
    proc = run_esa("profile", "--model", str(tiny_llama), "--metric", "grad_x_wieght", "--out-dir", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "unknown metric 'grad_x_wieght'" in line
    for name in ("grad_x_weight", "hutchinson_diag", "act_mag", "activation_magnitude", "super_weight"):
        assert name in line


def test_nan_loss_fails_the_job_with_a_clear_message(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(float("nan"))
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(broken)
    out = tmp_path / "out"
    code = main(["profile", "--model", str(broken), "--metric", "grad_x_weight", "--seq-len", "16",
                 "--max-samples", "2", "--device", "cpu", "--out-dir", str(out), "--quiet"])
    assert code == 2
    err = json.loads((out / "error.json").read_text())
    assert err["type"] == "NonFiniteLossError" and "loss is nan" in err["message"]
    assert not (out / "scores.h5").exists() and not (out / "experiment_manifest.json").exists()


def test_a_job_killed_part_way_leaves_no_complete_file(tiny_llama, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "esa", "profile", "--model", str(tiny_llama), "--metric",
                             "hutchinson_diag", "--probes", "4", "--seq-len", "64", "--max-samples", "400",
                             "--device", "cpu", "--out-dir", str(out), "--quiet"],
                            env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    log = out / "esa.log"
    while time.monotonic() < deadline and "calibration windows" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the scoring loop (400 windows x 4 probes)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "scores.h5").exists()
    assert not (out / "experiment_manifest.json").exists()
    from esa.results.scorefile import open_score_file

    for leftover in out.glob(".scores.h5.*"):  # a temporary file, if the kill came while writing
        try:
            open_score_file(leftover)
        except Exception as exc:  # noqa: BLE001 - any refusal is what we want
            assert "incomplete" in str(exc) or "not" in str(exc)
        else:
            raise AssertionError("a temporary score file was accepted as complete")
