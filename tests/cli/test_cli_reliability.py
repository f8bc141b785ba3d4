"""Issue #12 at the command line: bad input is one line and a non-zero exit, checked before the model
loads; a finished job is never redone or un-marked; progress in a batch log is plain lines."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_esa

LOADED = "loaded "  # esa.model.loading logs "loaded <model> (...)" once the weights are in memory


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (log lines before it are INFO lines, not errors)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def small(model: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--device", "cpu", "--seq-len", "16", "--max-samples", "2", "--out-dir", str(out)]


# ------------------------------------------------------------------ before the model loads (15)
def test_bit_index_out_of_range_before_loading(tiny_llama, tmp_path):
    target = "--target=model.layers.0.mlp.down_proj.weight:1,2"
    p = run_esa("perturb", *small(tiny_llama, tmp_path / "a"), "--perturb", "bit_flip", "--bit-index", "99", target)
    assert "bit_index 99 is out of range" in one_line(p) and LOADED not in p.stderr
    p = run_esa("perturb", *small(tiny_llama, tmp_path / "b"), "--dtype", "bf16", "--perturb", "bit_flip",
                "--bit-index", "20", target)
    assert "bit_index 20 out of range for torch.bfloat16" in one_line(p) and LOADED not in p.stderr


def test_missing_dataset_file_before_loading(tiny_llama, tmp_path):
    p = run_esa("baseline", *small(tiny_llama, tmp_path / "a"), "--dataset", str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl' does not exist" in one_line(p) and LOADED not in p.stderr
    p = run_esa("profile", *small(tiny_llama, tmp_path / "b"), "--metric", "grad_x_weight", "--dataset",
                str(tmp_path / "nope.txt"))
    assert "does not exist" in one_line(p) and LOADED not in p.stderr


def test_bad_targets_before_loading(tiny_llama, tmp_path):
    p = run_esa("perturb", *small(tiny_llama, tmp_path / "a"), "--perturb", "zero",
                "--from-scores", str(tmp_path / "missing" / "scores.h5"))
    assert "does not exist" in one_line(p) and LOADED not in p.stderr
    p = run_esa("perturb", *small(tiny_llama, tmp_path / "b"), "--perturb", "zero",
                "--target-list", str(tmp_path / "nope.csv"))
    assert "does not exist" in one_line(p) and LOADED not in p.stderr
    p = run_esa("perturb", *small(tiny_llama, tmp_path / "c"), "--perturb", "zero",
                "--target=model.layers.0.mlp.down_proj.weight:1000,2")
    assert "out of range" in one_line(p) and LOADED not in p.stderr


# ---------------------------------------------------------------------- unusable folders (14)
def test_out_dir_that_is_a_file_or_under_a_file(tiny_llama, tmp_path):
    (tmp_path / "afile").write_text("x")
    p = run_esa("baseline", *small(tiny_llama, tmp_path / "afile"))
    assert "is a file, not a folder" in one_line(p)
    p = run_esa("baseline", *small(tiny_llama, tmp_path / "afile" / "sub"))
    assert "lies under" in one_line(p)


def test_read_only_out_dir_and_analysis_folder(tiny_llama, make_readonly):
    ro = make_readonly("ro")
    p = run_esa("baseline", *small(tiny_llama, ro / "out"))
    assert "cannot write into output folder" in one_line(p)
    from fixtures.synthetic import example_run

    run = make_readonly("ro-run", populate=example_run)
    p = run_esa("analyze", str(run))
    assert ("Read-only" in one_line(p) or "Permission denied" in one_line(p)) and "report" in one_line(p)


def test_pickled_checkpoint_refused_by_weights_only_loading_is_one_line(tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "binmodel"
    shutil.copytree(tiny_llama, model)
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    state["extra"] = print  # a pickled global: weights-only loading refuses it, nothing runs
    torch.save(state, model / "pytorch_model.bin")
    p = run_esa("baseline", *small(model, tmp_path / "out"))
    line = one_line(p)
    assert "pytorch_model.bin" in line and "weights-only" in line and "safe" in line


# ----------------------------------------------------------------- finished work, never redone (1)
def test_a_finished_job_is_not_run_again_nor_unmarked(tiny_llama, tmp_path):
    out = tmp_path / "b"
    assert run_esa("baseline", *small(tiny_llama, out)).returncode == 0
    record = out / "experiment_manifest.json"
    before = (record.read_bytes(), record.stat().st_mtime_ns, (out / "eval.json").stat().st_mtime_ns)
    again = run_esa("baseline", *small(tiny_llama, out))
    assert again.returncode == 0 and "not run again" in again.stderr and LOADED not in again.stderr
    assert json.loads(again.stdout.split("\nwrote")[0])["ppl"] == json.loads(record.read_text())["summary"]["ppl"]
    assert (record.read_bytes(), record.stat().st_mtime_ns, (out / "eval.json").stat().st_mtime_ns) == before
    # another job into the same folder: refused, the finished one stays
    p = run_esa("baseline", *small(tiny_llama, out)[:-2], "--max-samples", "3", "--out-dir", str(out))
    assert "holds the complete results of another job" in one_line(p)
    assert record.read_bytes() == before[0]


def test_another_jobs_leftovers_do_not_survive_a_new_job(tiny_llama, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "error.json").write_text(json.dumps({"kind": "exception", "manifest_id": "0" * 12}))
    (out / "top_weights.csv").write_text("grad_x_weight's list\n")
    (out / "sensitivity_stats.json").write_text("{}")
    (out / ".scores.h5.dead.tmp").write_bytes(b"\0" * 4096)
    p = run_esa("profile", *small(tiny_llama, out), "--metric", "magnitude", "--no-export-topk-csv",
                "--no-export-stats")
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in out.iterdir()) == ["esa.log", "experiment_manifest.json", "profile.json",
                                                     "scores.h5"]


# ------------------------------------------------------------------ progress in batch logs (16)
def test_progress_in_a_batch_log_is_plain_lines(tiny_llama, tmp_path):
    p = run_esa("baseline", *small(tiny_llama, tmp_path / "o"), "--max-samples", "8", "--batch-size", "2",
                env={"ESA_PROGRESS_INTERVAL": "0"})
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "baseline: " in ln and "it/s" in ln]
    assert lines and lines[-1].split("INFO")[1].strip().startswith("baseline: 4/4 (100%)"), p.stderr
    assert any("ETA" in ln for ln in lines[:-1]), lines


def test_progress_line_format():
    from esa.core.logs import progress_line

    assert progress_line("grad_x_weight", 50, 200, 25.0) == \
        "grad_x_weight: 50/200 (25%), 2 it/s, elapsed 0:25, ETA 1:15"
    assert progress_line("train", 3, None, 1.5) == "train: 3, 2 it/s, elapsed 0:02"


@pytest.mark.parametrize("cmd", ["profile", "baseline", "perturb"])
def test_help_and_docs_say_what_max_samples_does(cmd):
    """Item 17: phase 2 draws K seeded windows from the pool; phases 1 and 3 take the first K."""
    p = run_esa(cmd, "--help")
    text = " ".join(p.stdout.split())
    if cmd == "profile":
        assert "the seed draws K of the pool" in text
    else:
        assert "use the first K windows" in text
    repo = Path(__file__).resolve().parents[2]
    metrics = " ".join((repo / "docs" / "metrics.md").read_text().split())
    assert "so every seed sees the same windows" not in metrics
    assert "Seeds therefore share the pool, not the windows" in metrics
