"""The reliability trial of issue #12: try bad inputs and inject faults, as a new user would.

    .venv/bin/python benchmarks/reliability_trial.py [--slurm] [--only inputs|faults] [--case TEXT] [--keep DIR]

* **Bad inputs** (`esa`, `python -m jobs`, `python -m analysis` with wrong flags, missing or broken
  files, unusable folders, a Slurm controller that does not answer): each is *handled* when the
  command exits non-zero with exactly one line on stderr besides log lines, and no traceback.
* **Faults** (kill -9, SIGTERM, USR1/USR2, `scontrol requeue`, truncated / overwritten / edited
  result files, stale temporaries, reused folders, duplicate and killed submissions, a failed
  upstream task): each is *survived* when no finished result is lost, redone or silently wrong:
  corrupt results are reported as corrupt, interrupted jobs resume, and resumed results equal an
  uninterrupted run's bit for bit (rows and random draws included).

Local cases run on a small saved tiny Llama; `--slurm` adds the cases that need the single-node
test cluster (`make slurm-up`). Prints one line per case and the totals, and writes
DIR/trial.json. The figures of the last run are in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|DEBUG) ")


@dataclass
class Trial:
    """Where the trial works and what it found."""

    root: Path
    env: dict[str, str]
    model: Path
    results: list[dict[str, Any]] = field(default_factory=list)

    def path(self, *parts: str) -> Path:
        """A path under the trial folder."""
        return self.root.joinpath(*parts)

    def cli(self, module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run `python -m module args` as a user would."""
        return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, capture_output=True,
                              text=True, env={**self.env, **(env or {})}, timeout=timeout)

    def record(self, kind: str, name: str, ok: bool, detail: str, seconds: float) -> None:
        """Keep and print one case's outcome."""
        self.results.append({"kind": kind, "name": name, "ok": ok, "detail": detail, "seconds": round(seconds, 1)})
        print(f"[{kind:5}] {'ok  ' if ok else 'FAIL'} {name}: {detail[:160]}", flush=True)


def one_line(p: subprocess.CompletedProcess) -> tuple[bool, str]:
    """Handled: non-zero exit, no traceback, exactly one stderr line that is not a log line (`esa
    validate`, a checker, reports on stdout: its one line may be there)."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
    if not lines and p.args[3:4] == ["validate"]:
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    ok = p.returncode != 0 and "Traceback" not in p.stderr + p.stdout and len(lines) == 1
    return ok, f"exit {p.returncode}: " + (" | ".join(lines) if lines else "(no message)")


# ------------------------------------------------------------------------------ set-up
def make_model(root: Path) -> Path:
    """A small saved tiny Llama (the test suite's size)."""
    from esa.model.tiny import TinySize, write_tiny_model

    size = TinySize(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, max_positions=512)
    return write_tiny_model("llama", root / "model", seed=0, train_steps=None, seq_len=64, size=size)


def profile_doc(t: Trial, out: Path, windows: int = 1500, metric: str = "grad_x_weight") -> dict[str, Any]:
    """A phase-2 manifest of `windows` one-window batches of 16 tokens."""
    from esa.spec.manifest import Manifest

    m = Manifest.from_dict({"phase": 2, "model": {"id": str(t.model), "device": "cpu", "dtype": "fp32"},
                            "data": {"seq_len": 16, "max_samples": windows, "pool_size": windows, "batch_size": 1},
                            "metric": {"name": metric}, "ranking": {"mode": "per_layer", "topk": 5},
                            "outputs": {"dir": str(out)}}, partial=True).with_id()
    return m.to_dict()


def write_json(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def score_rows(path: Path) -> Any:
    """Everything a score file says, in order (datasets, ranked rows, stats rows, score values)."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        return {"order": list(f["scores"]), "topk": f["topk/param"][()].tolist(),
                "flat": f["topk/flat_index"][()].tolist(), "bottomk": f["bottomk/param"][()].tolist(),
                "stats": f["stats/name"][()].tolist(),
                "values": {n: np.asarray(f["scores"][n][()]).tobytes() for n in f["scores"]}}


_REFERENCES: dict[str, Any] = {}


def reference(t: Trial, doc: dict[str, Any]) -> Any:
    """The uninterrupted run's score file rows of this manifest (computed once per id)."""
    if doc["id"] not in _REFERENCES:
        out = t.path("reference", doc["id"])
        path = write_json(t.path("reference", f"{doc['id']}.json"), {**doc, "outputs": {**doc["outputs"],
                                                                                        "dir": str(out)}})
        p = t.cli("esa", "run", str(path), "--quiet")
        assert p.returncode == 0, p.stderr
        _REFERENCES[doc["id"]] = score_rows(out / "scores.h5")
    return _REFERENCES[doc["id"]]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def in_loop(out: Path) -> bool:
    log = out / "esa.log"
    return log.exists() and "calibration windows" in log.read_text()


def state_of(folder: Path) -> Any:
    from esa.results.state import job_state

    return job_state(folder)


# ------------------------------------------------------------------------------ bad inputs
def bad_inputs(t: Trial) -> list[tuple[str, Callable[[], subprocess.CompletedProcess]]]:
    """(name, run) of every bad input tried."""
    M, W = str(t.model), t.root
    small = ["--model", M, "--device", "cpu", "--seq-len", "16", "--max-samples", "2"]
    tgt = "--target=model.layers.0.mlp.down_proj.weight:1,2"

    def out(name: str) -> list[str]:
        return ["--out-dir", str(W / "bad" / name)]

    def esa(*a: str, **kw: Any) -> Callable[[], subprocess.CompletedProcess]:
        return lambda: t.cli("esa", *a, **kw)

    def jobs(*a: str, **kw: Any) -> Callable[[], subprocess.CompletedProcess]:
        return lambda: t.cli("jobs", *a, **kw)

    # files the cases need
    (W / "afile").write_text("x")
    (W / "nomodel").mkdir(exist_ok=True)
    (W / "data.csv").write_text("text\nhello\n")
    (W / "emptydata").mkdir(exist_ok=True)
    (W / "fields.jsonl").write_text(json.dumps({"body": "hello world"}) + "\n")
    (W / "short.txt").write_text("just a few tokens")
    (W / "bad.csv").write_text("param,index\nmodel.layers.0.mlp.down_proj.weight,not-an-index\n")
    (W / "broken.json").write_text("{not json")
    good = profile_doc(t, W / "bad" / "run-good", windows=2)
    write_json(W / "unknown_field.json", {**good, "colour": "blue"})
    (W / "nan.json").write_text(json.dumps(good).replace('"seed": 0', '"seed": NaN'))
    (W / "bad.toml").write_text("[experiment\nname = 'x'\n")
    plan = (REPO / "manifests" / "tiny" / "phase2.toml").read_text()
    (W / "plans").mkdir(exist_ok=True)
    for p in (REPO / "manifests" / "tiny").glob("*.toml"):
        (W / "plans" / p.name).write_text(p.read_text())
    (W / "plans" / "badmetric.toml").write_text(plan.replace('"act_mag"', '"grad_x_wieght"'))
    (W / "plans" / "remote.toml").write_text((REPO / "manifests" / "tiny" / "phase1.toml").read_text().replace(
        'device = "cpu"', 'device = "cpu"\ntrust_remote_code = true'))
    _binmodel(t)
    run_dir = _run_with_manifests(t)
    doc = json.loads(sorted((run_dir / "manifests").glob("*.json"))[0].read_text())
    noid = dict(doc)
    del noid["id"]
    noid["model"] = {**noid["model"], "trust_remote_code": True}
    write_json(run_dir / "manifests" / f"{doc['id']}.json", noid)
    edited_dir = _run_with_manifests(t, "edited")
    doc2 = json.loads(sorted((edited_dir / "manifests").glob("*.json"))[0].read_text())
    write_json(edited_dir / "manifests" / f"{doc2['id']}.json", {**doc2, "seed": 7})
    nonshard = _done_profile(t, "nonshard")
    (W / "trunc.h5").write_bytes((nonshard / "scores.h5").read_bytes()[:2000])
    other = _done_profile(t, "other-job")
    ro = _readonly(W / "ro")
    ro_run = _readonly(W / "ro-run", populate=lambda d: (d / "manifests").mkdir())
    fake = _fake_slurm(W)

    return [
        ("esa without a command", esa()),
        ("esa unknown command", esa("nonsense")),
        ("baseline without --model", esa("baseline")),
        ("model path that does not exist", esa("baseline", "--model", "/nope/model", *out("m1"))),
        ("hub model not in the offline cache", esa("baseline", "--model", "org/not-cached-model", *out("m2"))),
        ("model folder without config.json", esa("baseline", "--model", str(W / "nomodel"), *out("m3"))),
        ("unknown built-in model", esa("baseline", "--model", "esa:tiny-nope", *out("m4"))),
        ("pickled checkpoint weights-only loading refuses", esa("baseline", "--model", str(W / "binmodel"),
                                                                *small[2:], *out("m5"))),
        ("dataset file that does not exist", esa("baseline", *small, "--dataset", str(W / "nope.jsonl"), *out("d1"))),
        ("dataset file of an unsupported type", esa("baseline", *small, "--dataset", str(W / "data.csv"), *out("d2"))),
        ("dataset folder without data files", esa("baseline", *small, "--dataset", str(W / "emptydata"), *out("d3"))),
        ("dataset without the text field", esa("baseline", *small, "--dataset", str(W / "fields.jsonl"), *out("d4"))),
        ("seq-len longer than the data", esa("baseline", "--model", M, "--device", "cpu", "--seq-len", "500",
                                             "--dataset", str(W / "short.txt"), *out("d5"))),
        ("--seq-len 0", esa("baseline", "--model", M, "--seq-len", "0", *out("f1"))),
        ("--seq-len beyond the context", esa("baseline", "--model", M, "--device", "cpu", "--seq-len", "9999",
                                             *out("f2"))),
        ("--max-samples 0", esa("baseline", "--model", M, "--max-samples", "0", *out("f3"))),
        ("--max-samples abc", esa("baseline", "--model", M, "--max-samples", "abc", *out("f4"))),
        ("--batch-size -1", esa("baseline", "--model", M, "--batch-size", "-1", *out("f5"))),
        ("--dtype fp8", esa("baseline", "--model", M, "--dtype", "fp8", *out("f6"))),
        ("--device cuda without a GPU", esa("baseline", *small[:2], "--device", "cuda", *out("f7"))),
        ("--attention bogus", esa("baseline", "--model", M, "--attention", "bogus", *out("f8"))),
        ("--out-dir an existing file", esa("baseline", *small, "--out-dir", str(W / "afile"))),
        ("--out-dir under a file", esa("baseline", *small, "--out-dir", str(W / "afile" / "sub"))),
        ("--out-dir read-only", esa("baseline", *small, "--out-dir", str(ro / "out"))),
        ("--out-dir holding another job's result", esa("baseline", *small, "--out-dir", str(other))),
        ("unknown metric", esa("profile", *small, "--metric", "grad_x_wieght", *out("p1"))),
        ("unknown mode", esa("profile", *small, "--metric", "magnitude", "--mode", "sideways", *out("p2"))),
        ("--topk 0", esa("profile", *small, "--metric", "magnitude", "--topk", "0", *out("p3"))),
        ("--shard 3/2", esa("profile", *small, "--metric", "grad_x_weight", "--shard", "3/2", *out("p4"))),
        ("--shard x", esa("profile", *small, "--metric", "grad_x_weight", "--shard", "x", *out("p5"))),
        ("--seeds 1,1", esa("profile", *small, "--metric", "magnitude", "--seeds", "1,1", *out("p6"))),
        ("--stability-check with one seed", esa("profile", *small, "--metric", "magnitude", "--stability-check",
                                                *out("p7"))),
        ("--max-samples above --pool-size", esa("profile", *small[:-2], "--max-samples", "9", "--pool-size", "4",
                                                "--metric", "grad_x_weight", *out("p8"))),
        ("hessian_diag over too many weights", esa("profile", *small, "--metric", "hessian_diag",
                                                   "--max-exact-coords", "10", *out("p9"))),
        ("--candidates not param:i,j", esa("profile", *small, "--metric", "hessian_diag", "--candidates", "x",
                                           *out("p10"))),
        ("profile --perturb nonsense", esa("profile", *small, "--metric", "magnitude", "--perturb", "nonsense",
                                           *out("p11"))),
        ("profile --controls bogus_k", esa("profile", *small, "--metric", "magnitude", "--perturb", "zero",
                                           "--controls", "bogus_k", *out("p12"))),
        ("--probes 0", esa("profile", *small, "--metric", "hutchinson_diag", "--probes", "0", *out("p13"))),
        ("perturb without targets", esa("perturb", *small, "--perturb", "zero", *out("q1"))),
        ("--target not param:i,j", esa("perturb", *small, "--perturb", "zero", "--target", "nonsense", *out("q2"))),
        ("--target index out of range", esa("perturb", *small, "--perturb", "zero",
                                            "--target=model.layers.0.mlp.down_proj.weight:1000,2", *out("q3"))),
        ("--target unknown tensor", esa("perturb", *small, "--perturb", "zero", "--target=model.nope.weight:1,2",
                                        *out("q4"))),
        ("--from-scores missing", esa("perturb", *small, "--perturb", "zero", "--from-scores",
                                      str(W / "nope" / "scores.h5"), *out("q5"))),
        ("--from-scores truncated", esa("perturb", *small, "--perturb", "zero", "--from-scores", str(W / "trunc.h5"),
                                        *out("q6"))),
        ("--target-list missing", esa("perturb", *small, "--perturb", "zero", "--target-list", str(W / "nope.csv"),
                                      *out("q7"))),
        ("--target-list malformed", esa("perturb", *small, "--perturb", "zero", "--target-list", str(W / "bad.csv"),
                                        *out("q8"))),
        ("--bit-index 99", esa("perturb", *small, "--perturb", "bit_flip", "--bit-index", "99", tgt, *out("q9"))),
        ("--bit-index 20 on bf16 weights", esa("perturb", *small, "--dtype", "bf16", "--perturb", "bit_flip",
                                               "--bit-index", "20", tgt, *out("q10"))),
        ("--perturb-prob 2", esa("perturb", *small, "--perturb", "bit_flip", "--perturb-prob", "2", tgt, *out("q11"))),
        ("--noise-sigma nan", esa("perturb", *small, "--perturb", "gauss_noise", "--noise-sigma", "nan", tgt,
                                  *out("q12"))),
        ("--baseline-eval missing", esa("perturb", *small, "--perturb", "zero", tgt, "--baseline-eval",
                                        str(W / "nope.json"), *out("q13"))),
        ("--topk beyond the ranking", esa("perturb", *small, "--perturb", "zero", "--from-scores",
                                          str(nonshard / "scores.h5"), "--topk", "999", *out("q14"))),
        ("run: manifest file missing", esa("run", str(W / "nope.json"))),
        ("run: manifest not JSON", esa("run", str(W / "broken.json"))),
        ("run: manifest with an unknown field", esa("run", str(W / "unknown_field.json"))),
        ("run: manifest with NaN", esa("run", str(W / "nan.json"))),
        ("run: run-folder manifest without its id", esa("run", str(run_dir / "manifests" / f"{doc['id']}.json"))),
        ("run: run-folder manifest edited after expansion",
         esa("run", str(edited_dir / "manifests" / f"{doc2['id']}.json"))),
        ("validate: plan that is not TOML", esa("validate", str(W / "bad.toml"))),
        ("validate: plan with an unknown metric", esa("validate", str(W / "plans" / "badmetric.toml"))),
        ("reduce: a score file without shards' sums", esa("reduce", str(nonshard), "--out-dir", str(W / "bad" / "r1"))),
        ("reduce: shard missing", esa("reduce", str(W / "nope"), "--out-dir", str(W / "bad" / "r2"))),
        ("overlap: list missing", esa("overlap", "--lists", str(W / "a.csv"), str(W / "b.csv"), "--out",
                                      str(W / "bad" / "o.json"))),
        ("plan-memory: unknown model", esa("plan-memory", "--model", "no-such-model", "--metric", "magnitude")),
        ("tiny-model: unknown arch", esa("tiny-model", "--arch", "nope", "--out", str(W / "bad" / "tm"))),
        ("analyze: run folder missing", esa("analyze", str(W / "nope-run"))),
        ("analyze: read-only run folder", esa("analyze", str(ro_run))),
        ("analysis: a file, not a folder", lambda: t.cli("analysis", str(W / "afile"))),
        ("jobs submit without a phase", jobs("submit")),
        ("jobs submit: plan missing", jobs("submit", "--plan", str(W / "nope.toml"))),
        ("jobs submit: invalid plan", jobs("submit", "--plan", str(W / "plans" / "badmetric.toml"), "--executor",
                                           "local")),
        ("jobs submit: AFTER not a job id", jobs("submit", "--phase", "3", "--tiny", "--dry-run", "--after", "12;rm")),
        ("jobs submit: phase 3 before phase 2", jobs("submit", "--plan", str(W / "plans" / "phase3.toml"),
                                                     "--dry-run", "--model-map", f"esa:tiny-llama={M}")),
        ("jobs submit: trust_remote_code without the flag",
         jobs("submit", "--plan", str(W / "plans" / "remote.toml"), "--dry-run", "--model-map", f"esa:tiny-llama={M}")),
        ("jobs submit: ESA_RUNS read-only", jobs("submit", "--phase", "1", "--tiny", "--executor", "local",
                                                 "--model-map", f"esa:tiny-llama={M}",
                                                 env={"ESA_RUNS": str(ro / "runs")})),
        ("jobs submit: ESA_RUNS under a file", jobs("submit", "--phase", "1", "--tiny", "--executor", "local",
                                                    "--model-map", f"esa:tiny-llama={M}",
                                                    env={"ESA_RUNS": str(W / "afile" / "runs")})),
        ("jobs submit: slurmctld down", jobs("submit", "--phase", "1", "--tiny", "--model-map", f"esa:tiny-llama={M}",
                                             env=fake)),
        ("jobs status: not a run folder", jobs("status", str(W / "emptydata"))),
        ("jobs resubmit: run folder missing", jobs("resubmit", str(W / "nope-run"))),
    ]


def _binmodel(t: Trial) -> None:
    import torch
    from safetensors.torch import load_file

    dst = t.path("binmodel")
    if dst.exists():
        return
    shutil.copytree(t.model, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    state["extra"] = print
    torch.save(state, dst / "pytorch_model.bin")


def _run_with_manifests(t: Trial, name: str = "noid") -> Path:
    from jobs.plans import load_plan, write_expanded

    run = load_plan(REPO / "manifests" / "tiny" / "phase1.toml", runs=t.path("runs-" + name),
                    model_map={"esa:tiny-llama": str(t.model)})
    write_expanded(run)
    return run.layout.root


def _done_profile(t: Trial, name: str) -> Path:
    out = t.path("done", name)
    if not (out / "experiment_manifest.json").exists():
        path = write_json(t.path("done", f"{name}.json"), profile_doc(t, out, windows=4))
        p = t.cli("esa", "run", str(path), "--quiet")
        assert p.returncode == 0, p.stderr
    return out


def _readonly(folder: Path, populate: Callable[[Path], Any] | None = None) -> Path:
    """A read-only folder (a read-only bind mount as root, chmod otherwise)."""
    src = folder.with_name(folder.name + "-src")
    src.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    if populate:
        populate(src)
    if os.geteuid() != 0:
        if populate:
            populate(folder)
        folder.chmod(0o555)
        return folder
    subprocess.run(["mount", "--bind", str(src), str(folder)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
    _MOUNTS.append(folder)
    return folder


_MOUNTS: list[Path] = []


def _fake_slurm(root: Path) -> dict[str, str]:
    """PATH with Slurm clients of a cluster whose controller is down."""
    bin_dir = root / "fake-slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    scripts = {"scontrol": 'echo "Slurmctld(primary) at localhost is DOWN"; exit 1',
               "sbatch": 'sleep 20; echo "sbatch: error: Batch job submission failed: Unable to contact slurm '
                         'controller (connect failure)" >&2; exit 1', "squeue": "exit 1", "sacct": "exit 1"}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def run_inputs(t: Trial, case: str | None = None) -> None:
    """Try every bad input (or those whose name contains `case`)."""
    for name, call in bad_inputs(t):
        if case is not None and case not in name:
            continue
        t0 = time.monotonic()
        try:
            ok, detail = one_line(call())
        except subprocess.TimeoutExpired:
            ok, detail = False, "timed out"
        t.record("input", name, ok, detail, time.monotonic() - t0)


# ------------------------------------------------------------------------------ faults
def fault(name: str) -> Callable[[Callable[[Trial], tuple[bool, str]]], Callable[[Trial], tuple[bool, str]]]:
    def wrap(fn: Callable[[Trial], tuple[bool, str]]) -> Callable[[Trial], tuple[bool, str]]:
        fn.fault_name = name  # type: ignore[attr-defined]
        return fn
    return wrap


def _interrupt(t: Trial, name: str, sig: int) -> tuple[bool, str]:
    """Run a long phase-2 job, signal it inside its batch loop, run it again: resumed and equal?"""
    out = t.path("faults", name)
    doc = profile_doc(t, out)
    path = write_json(t.path("faults", f"{name}.json"), doc)
    proc = subprocess.Popen([sys.executable, "-m", "esa", "run", str(path)], cwd=REPO, env=t.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: in_loop(out), 240, "the batch loop")
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    first = state_of(out)
    if first.done:
        return False, "an interrupted job is marked done"
    p = t.cli("esa", "run", str(path), "--quiet")
    if p.returncode != 0:
        return False, f"the rerun failed: {p.stderr.strip()[-200:]}"
    resumed = "resuming from the checkpoint" in (out / "esa.log").read_text()
    same = score_rows(out / "scores.h5") == reference(t, doc)
    return (same and state_of(out).done and (resumed or sig == signal.SIGKILL),
            f"exit {proc.returncode} ({first.state}), rerun {'resumed' if resumed else 'restarted'}, "
            f"result {'bit-identical to' if same else 'DIFFERENT from'} an uninterrupted run")


@fault("kill -9 a phase-2 job in its batch loop")
def f_kill9(t: Trial) -> tuple[bool, str]:
    return _interrupt(t, "kill9", signal.SIGKILL)


@fault("SIGTERM a phase-2 job (scancel, scontrol requeue, kill)")
def f_sigterm(t: Trial) -> tuple[bool, str]:
    return _interrupt(t, "sigterm", signal.SIGTERM)


@fault("USR1 (Slurm's warning signal) to a phase-2 job")
def f_usr1(t: Trial) -> tuple[bool, str]:
    return _interrupt(t, "usr1", signal.SIGUSR1)


@fault("pre-empted and resumed job: phase 3's random draws")
def f_draws(t: Trial) -> tuple[bool, str]:
    resumed = t.path("faults", "sigterm")
    ref = t.path("reference", profile_doc(t, resumed)["id"])
    if not (resumed / "scores.h5").exists():
        f_sigterm(t)
    deltas = []
    for src in (resumed, ref):
        out = t.path("faults", f"draws-{src.name}")
        p = t.cli("esa", "perturb", "--model", str(t.model), "--device", "cpu", "--seq-len", "16", "--max-samples",
                  "4", "--perturb", "zero", "--from-scores", str(src / "scores.h5"), "--topk", "3", "--controls",
                  "random_k,bottom_k", "--control-repeats", "4", "--out-dir", str(out), "--quiet")
        if p.returncode != 0:
            return False, p.stderr.strip()[-200:]
        rec = json.loads((out / "perturbation.json").read_text())
        deltas.append((rec["delta_ppl"], {k: (v["deltas"], v["p_value"]) for k, v in rec["controls"].items()}))
    return deltas[0] == deltas[1], "ΔPPL, control draws and p-values " + (
        "identical" if deltas[0] == deltas[1] else "DIFFER")


def _corrupt_case(t: Trial, name: str, edit: Callable[[Path], None], phase: int = 2) -> tuple[bool, str]:
    """A finished job whose result file is damaged: status, resubmit and analysis must all say corrupt."""
    from analysis.collect import collect_jobs
    from fixtures.synthetic import fake_scores, manifest, write_perturb_job, write_profile_job

    from esa.spec.manifest import manifest_id

    run = t.path("faults", f"corrupt-{name}")
    m = manifest(phase, metric="magnitude") if phase == 2 else manifest(3)
    m["id"] = manifest_id(m)  # the hash `make status` checks a run folder's manifests against
    folder = run / "results" / m["id"]
    write_json(run / "manifests" / f"{m['id']}.json", {**m, "outputs": {"dir": str(folder)}})
    if phase == 2:
        write_profile_job(folder, m, fake_scores(0))
    else:
        write_perturb_job(folder, m, base_ppl=10.0, delta_ppl=7.0276, controls={"random_k": [0.1, 0.2, 0.3]},
                          n_targets=3)
    if not state_of(folder).done:
        return False, "the intact job is not done"
    edit(folder)
    st = t.cli("jobs", "status", str(run), "--no-sacct", "--json")
    rows = json.loads(st.stdout) if st.returncode == 0 else []
    jobs = collect_jobs(run)
    ok = bool(rows) and (rows[0]["state"], rows[0]["reason"]) == ("corrupt", "corrupt") and \
        (jobs["status"] == "corrupt").all()
    from jobs.status import collect, needs_resubmit

    ok = ok and needs_resubmit(collect(run, use_sacct=False)[0])
    return ok, f"status {rows[0]['state'] if rows else '?'} ({rows[0]['message'][:80] if rows else st.stderr})"


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


@fault("truncate a finished scores.h5")
def f_truncate(t: Trial) -> tuple[bool, str]:
    return _corrupt_case(t, "truncate", lambda f: (f / "scores.h5").write_bytes(
        (f / "scores.h5").read_bytes()[: (f / "scores.h5").stat().st_size // 2]))


@fault("64 KiB of random bytes into a finished scores.h5")
def f_random(t: Trial) -> tuple[bool, str]:
    def edit(f: Path) -> None:
        size = (f / "scores.h5").stat().st_size
        _overwrite(f / "scores.h5", size // 4, os.urandom(min(64 << 10, size // 2)))
    return _corrupt_case(t, "random", edit)


@fault("a few bytes into the score data of a finished scores.h5 (still a valid HDF5 file)")
def f_bytes(t: Trial) -> tuple[bool, str]:
    import h5py

    def edit(f: Path) -> None:
        with h5py.File(f / "scores.h5", "r") as h:
            ds = h["scores"][next(iter(h["scores"]))]
            offset = ds.id.get_chunk_info(0).byte_offset
        _overwrite(f / "scores.h5", offset, os.urandom(32))
    return _corrupt_case(t, "bytes", edit)


@fault("NaN written into a finished perturbation.json")
def f_nan(t: Trial) -> tuple[bool, str]:
    return _corrupt_case(t, "nan", lambda f: (f / "perturbation.json").write_text(
        (f / "perturbation.json").read_text().replace('"delta_ppl": 7.0276', '"delta_ppl": NaN')), phase=3)


@fault("a number edited in a finished perturbation.json")
def f_edit(t: Trial) -> tuple[bool, str]:
    return _corrupt_case(t, "edit", lambda f: (f / "perturbation.json").write_text(
        (f / "perturbation.json").read_text().replace('"delta_ppl": 7.0276', '"delta_ppl": 0.5')), phase=3)


@fault("a finished job's profile.json deleted")
def f_deleted(t: Trial) -> tuple[bool, str]:
    return _corrupt_case(t, "deleted", lambda f: (f / "profile.json").unlink())


@fault("a finished job run again (requeue, resubmit by hand)")
def f_rerun(t: Trial) -> tuple[bool, str]:
    out = _done_profile(t, "rerun")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file() and
              p.name != "esa.log"}
    proc = subprocess.Popen([sys.executable, "-m", "esa", "run", str(t.path("done", "rerun.json"))], cwd=REPO,
                            env=t.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.kill()  # kill -9 of the rerun, whenever it is
    proc.wait()
    p = t.cli("esa", "run", str(t.path("done", "rerun.json")))
    after = {p2.name: (p2.read_bytes(), p2.stat().st_mtime_ns) for p2 in out.iterdir() if p2.is_file() and
             p2.name != "esa.log"}
    ok = after == before and state_of(out).done and "not run again" in p.stderr
    return ok, "result untouched and still done after a rerun and a killed rerun" if ok else "result changed"


@fault("a stale .scores.h5.*.tmp of a killed write")
def f_stale(t: Trial) -> tuple[bool, str]:
    out = t.path("faults", "stale")
    doc = profile_doc(t, out, windows=4)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".scores.h5.k1ll3d.tmp").write_bytes(os.urandom(1 << 20))
    p = t.cli("esa", "run", str(write_json(t.path("faults", "stale.json"), doc)), "--quiet")
    left = [x.name for x in out.iterdir() if x.name.endswith(".tmp")]
    return p.returncode == 0 and not left and state_of(out).done, f"temporaries left: {left or 'none'}"


@fault("an output folder reused for another job")
def f_reuse(t: Trial) -> tuple[bool, str]:
    out = _done_profile(t, "reuse")
    record = (out / "experiment_manifest.json").read_bytes()
    doc = profile_doc(t, out, windows=4, metric="magnitude")
    p = t.cli("esa", "run", str(write_json(t.path("faults", "reuse.json"), doc)))
    ok = p.returncode == 2 and (out / "experiment_manifest.json").read_bytes() == record and state_of(out).done
    return ok, "refused, the first job's result kept" if ok else p.stderr[-200:]


@fault("leftovers (exports, error.json) of another job's failed attempt")
def f_leftovers(t: Trial) -> tuple[bool, str]:
    out = t.path("faults", "leftovers")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "error.json", {"kind": "exception", "manifest_id": "0" * 12})
    (out / "top_weights.csv").write_text("another metric's list\n")
    (out / "sensitivity_stats.csv").write_text("x\n")
    doc = profile_doc(t, out, windows=4, metric="magnitude")
    doc["outputs"].update(export_topk_csv=False, export_stats=False)
    from esa.spec.manifest import manifest_id

    doc["id"] = manifest_id(doc)
    p = t.cli("esa", "run", str(write_json(t.path("faults", "leftovers.json"), doc)), "--quiet")
    names = sorted(x.name for x in out.iterdir())
    ok = p.returncode == 0 and names == ["esa.log", "experiment_manifest.json", "profile.json", "scores.h5"]
    return ok, f"folder holds {names}"


@fault("two local submissions of one plan at once")
def f_two_local(t: Trial) -> tuple[bool, str]:
    env = {"ESA_RUNS": str(t.path("faults", "two-local"))}
    args = [sys.executable, "-m", "jobs", "submit", "--phase", "1", "--tiny", "--executor", "local", "--model-map",
            f"esa:tiny-llama={t.model}"]
    procs = [subprocess.Popen(args, cwd=REPO, env={**t.env, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    logs = list(t.path("faults", "two-local", "tiny", "results").glob("*/esa.log"))
    starts = sum(log.read_text().count(" -> ") for log in logs)
    ok = all(p.returncode == 0 for p in procs) and starts == 1
    return ok, f"{starts} run(s) of the one manifest" + ("" if ok else f" {outs}")


@fault("kill -9 of `make submit EXECUTOR=local` while its job runs")
def f_kill_submit(t: Trial) -> tuple[bool, str]:
    plans = t.path("faults", "kill-submit-plans")
    plans.mkdir(parents=True, exist_ok=True)
    text = (REPO / "manifests" / "tiny" / "phase2.toml").read_text()
    text = text.replace("seeds = [0, 1, 2]", "seeds = [0]").replace('metrics = ["grad_x_weight", "act_mag"]',
                                                                  'metrics = ["grad_x_weight"]')
    text = text.replace("max_samples = 8", "max_samples = 1500").replace("pool_size = 32", "pool_size = 1500")
    text = text.replace("batch_size = 4", "batch_size = 1").replace("seq_len = 64", "seq_len = 16")
    (plans / "phase2.toml").write_text(text)
    env = {**t.env, "ESA_RUNS": str(t.path("faults", "kill-submit"))}
    args = [sys.executable, "-m", "jobs", "submit", "--plan", str(plans / "phase2.toml"), "--executor", "local",
            "--model-map", f"esa:tiny-llama={t.model}"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = t.path("faults", "kill-submit", "tiny")
    wait_for(lambda: any(in_loop(p) for p in run.glob("results/*")), 240, "the batch loop")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    st = json.loads(t.cli("jobs", "status", str(run), "--json", env=env).stdout)
    shown = (st[0]["state"], st[0]["reason"])
    r = t.cli("jobs", "resubmit", str(run), "--executor", "local", env=env)
    done = json.loads(t.cli("jobs", "status", str(run), "--json", env=env).stdout)[0]["state"]
    ok = shown == ("failed", "killed") and r.returncode == 0 and done == "done"
    return ok, f"status after the kill: {shown}; after resubmit: {done}"


@fault("a run-folder manifest edited (trust_remote_code on, id deleted)")
def f_edited(t: Trial) -> tuple[bool, str]:
    run = _run_with_manifests(t, "edited-fault")
    path = sorted((run / "manifests").glob("*.json"))[0]
    doc = json.loads(path.read_text())
    mid = doc.pop("id")
    doc["model"]["trust_remote_code"] = True
    path.write_text(json.dumps(doc))
    p = t.cli("esa", "run", str(path))
    r = t.cli("jobs", "resubmit", str(run), "--executor", "local")
    ran = (run / "results" / mid).exists()
    ok = p.returncode == 2 and not ran and "not resubmitted" in r.stdout
    return ok, "refused by esa run and resubmit; nothing ran" if ok else f"{p.stderr[-150:]} {r.stdout[-150:]}"


@fault("results written under umask 002 (a shared group folder)")
def f_umask(t: Trial) -> tuple[bool, str]:
    out = t.path("faults", "umask")
    doc = profile_doc(t, out, windows=4)
    path = write_json(t.path("faults", "umask.json"), doc)
    p = subprocess.run(["sh", "-c", f"umask 002 && exec {sys.executable} -m esa run {path} --quiet"], cwd=REPO,
                       env=t.env, capture_output=True, text=True, timeout=600)
    modes = {x.name: oct(x.stat().st_mode & 0o777) for x in out.iterdir() if x.is_file()}
    ok = p.returncode == 0 and all(m == "0o664" for m in modes.values())
    return ok, f"modes {sorted(set(modes.values()))}"


LOCAL_FAULTS = [f_kill9, f_sigterm, f_usr1, f_draws, f_truncate, f_random, f_bytes, f_nan, f_edit, f_deleted,
                f_rerun, f_stale, f_reuse, f_leftovers, f_two_local, f_kill_submit, f_edited, f_umask]


# ------------------------------------------------------------------------------ Slurm faults
def _slurm_env(t: Trial, name: str) -> dict[str, str]:
    return {**t.env, "ESA_RUNS": str(t.path("slurm", name))}


def _submit(t: Trial, env: dict[str, str], *args: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "jobs", "submit", "--executor", "slurm", "--model-map",
                        f"esa:tiny-llama={t.model}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = sorted(Path(env["ESA_RUNS"]).glob("*/submissions/*.json"))
    return json.loads(recs[-1].read_text())


def _sacct(job: str) -> list[str]:
    r = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job, "--format=JobID,State"], capture_output=True,
                       text=True, timeout=30)
    return [ln.split("|")[1].split()[0] for ln in r.stdout.splitlines() if "|" in ln and "[" not in ln]


def _wait_slurm(jobs: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["squeue", "-h", "-o", "%F", "-j", ",".join(jobs)], capture_output=True, text=True,
                           timeout=30)
        if not set(r.stdout.split()) & set(jobs):
            time.sleep(3)  # let sacct catch up
            return
        time.sleep(2)
    raise TimeoutError(f"Slurm jobs {jobs} still queued after {timeout:.0f} s")


def _long_plan(t: Trial, name: str) -> Path:
    plans = t.path("slurm", f"{name}-plans")
    plans.mkdir(parents=True, exist_ok=True)
    for p in (REPO / "manifests" / "tiny").glob("*.toml"):
        (plans / p.name).write_text(p.read_text())
    text = (plans / "phase2.toml").read_text()
    text = text.replace("seeds = [0, 1, 2]", "seeds = [0]").replace('metrics = ["grad_x_weight", "act_mag"]',
                                                                  'metrics = ["grad_x_weight"]')
    text = text.replace("max_samples = 8", "max_samples = 800").replace("pool_size = 32", "pool_size = 800")
    text = text.replace("batch_size = 4", "batch_size = 1")
    (plans / "phase2.toml").write_text(text)
    return plans / "phase2.toml"


def _slurm_signal(t: Trial, name: str, action: list[str]) -> tuple[bool, str]:
    env = _slurm_env(t, name)
    rec = _submit(t, env, "--plan", str(_long_plan(t, name)))
    task = rec["arrays"][0]["tasks"][0]
    out = Path(env["ESA_RUNS"]) / "tiny" / "results" / task["manifest_id"]
    wait_for(lambda: in_loop(out), 300, "the batch loop")
    time.sleep(1.0)
    subprocess.run([*action, task["job"]], check=True, capture_output=True, timeout=30)
    if action == ["scancel"]:  # cancelled: it stays cancelled until resubmitted
        _wait_slurm([rec["arrays"][0]["job_id"]])
        st = json.loads(subprocess.run([sys.executable, "-m", "jobs", "status", str(out.parents[1]), "--json"],
                                       cwd=REPO, env=env, capture_output=True, text=True).stdout)[0]
        if st["state"] != "preempted":
            return False, f"status after scancel: {st['state']} {st['reason']}"
        again = subprocess.run([sys.executable, "-m", "jobs", "resubmit", str(out.parents[1])], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        recs = sorted(Path(env["ESA_RUNS"]).glob("*/submissions/*.json"))
        _wait_slurm([json.loads(recs[-1].read_text())["arrays"][0]["job_id"]])
    else:
        _wait_slurm([rec["arrays"][0]["job_id"]])
    resumed = "resuming from the checkpoint" in (out / "esa.log").read_text()
    doc = json.loads((out / "experiment_manifest.json").read_text())["manifest"] if state_of(out).done else None
    same = doc is not None and score_rows(out / "scores.h5") == reference(t, doc)
    return resumed and same, f"{_sacct(rec['arrays'][0]['job_id'])}, resumed {resumed}, identical {same}"


@fault("Slurm: scontrol requeue of a running phase-2 task (SIGTERM)")
def s_requeue(t: Trial) -> tuple[bool, str]:
    return _slurm_signal(t, "requeue", ["scontrol", "requeue"])


@fault("Slurm: scancel --signal=USR2 (time limit / pre-emption warning)")
def s_usr2(t: Trial) -> tuple[bool, str]:
    return _slurm_signal(t, "usr2", ["scancel", "--signal=USR2"])


@fault("Slurm: scancel of a running phase-2 task, then make resubmit")
def s_scancel(t: Trial) -> tuple[bool, str]:
    return _slurm_signal(t, "scancel", ["scancel"])


@fault("Slurm: scontrol requeue of a finished task")
def s_requeue_done(t: Trial) -> tuple[bool, str]:
    env = _slurm_env(t, "requeue-done")
    rec = _submit(t, env, "--phase", "1", "--tiny")
    task = rec["arrays"][0]["tasks"][0]
    _wait_slurm([rec["arrays"][0]["job_id"]])
    out = Path(env["ESA_RUNS"]) / "tiny" / "results" / task["manifest_id"]
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.name != "esa.log"}
    subprocess.run(["scontrol", "requeue", task["job"]], check=True, capture_output=True, timeout=30)
    wait_for(lambda: len(_sacct(rec["arrays"][0]["job_id"])) >= 2, 120, "the requeue")
    _wait_slurm([rec["arrays"][0]["job_id"]])
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.name != "esa.log"}
    ok = after == before and state_of(out).done
    return ok, f"{_sacct(rec['arrays'][0]['job_id'])}; result {'untouched' if ok else 'CHANGED'}"


@fault("Slurm: two submissions at once, then make resubmit at once")
def s_twice(t: Trial) -> tuple[bool, str]:
    env = _slurm_env(t, "twice")
    args = [sys.executable, "-m", "jobs", "submit", "--phase", "2", "--tiny", "--executor", "slurm", "--model-map",
            f"esa:tiny-llama={t.model}"]
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    [p.communicate(timeout=300) for p in procs]
    run = Path(env["ESA_RUNS"]) / "tiny"
    subprocess.run([sys.executable, "-m", "jobs", "resubmit", str(run)], cwd=REPO, env=env, capture_output=True,
                   timeout=300)
    recs = [json.loads(p.read_text()) for p in sorted((run / "submissions").glob("*.json"))]
    tasks = [tk["manifest_id"] for r in recs for a in r["arrays"] for tk in a["tasks"]]
    _wait_slurm([a["job_id"] for r in recs for a in r["arrays"]])
    ok = len(tasks) == len(set(tasks)) == 6
    return ok, f"{len(tasks)} tasks submitted for 6 manifests"


@fault("Slurm: one failed phase-2 task under a phase-3 chain")
def s_chain(t: Trial) -> tuple[bool, str]:
    env = _slurm_env(t, "chain")
    run = Path(env["ESA_RUNS"]) / "tiny"
    from jobs.plans import load_plan

    p3 = load_plan(REPO / "manifests" / "tiny" / "phase3.toml", runs=env["ESA_RUNS"],
                   model_map={"esa:tiny-llama": str(t.model)})
    victim = p3.jobs[0].needs[0]
    (run / "results").mkdir(parents=True, exist_ok=True)
    (run / "results" / victim).write_text("blocks the output folder: this phase-2 task fails")
    gate = subprocess.run(["sbatch", "--parsable", "--hold", "--output=/dev/null", "--wrap", "true"],
                          capture_output=True, text=True, check=True).stdout.strip()
    rec2 = _submit(t, env, "--phase", "2", "--tiny", "--after", gate)
    rec3 = _submit(t, env, "--phase", "3", "--tiny")
    subprocess.run(["scontrol", "release", gate], check=True, timeout=30)
    ids = [a["job_id"] for r in (rec2, rec3) for a in r["arrays"]] + [rec3["analysis"]["job_id"]]
    _wait_slurm(ids, timeout=900)
    rows = json.loads(subprocess.run([sys.executable, "-m", "jobs", "status", str(run), "--json"], cwd=REPO,
                                     env=env, capture_output=True, text=True).stdout)
    dependants = {j.id for j in p3.jobs if j.needs[0] == victim}
    bad = [r for r in rows if r["state"] != "done" and r["manifest_id"] not in dependants | {victim}]
    held = [r for r in rows if r["manifest_id"] in dependants]
    ok = not bad and all(r["state"] == "failed" and r["reason"] == "cancelled" for r in held)
    return ok, f"{sum(r['state'] == 'done' for r in rows)} done; the failed task's {len(held)} dependants " \
               f"{sorted({r['reason'] for r in held})}; others not done: {[(r['state'], r['reason']) for r in bad]}"


SLURM_FAULTS = [s_requeue, s_usr2, s_scancel, s_requeue_done, s_twice, s_chain]


def run_faults(t: Trial, faults: list[Callable[[Trial], tuple[bool, str]]]) -> None:
    """Inject every fault."""
    for fn in faults:
        t0 = time.monotonic()
        try:
            ok, detail = fn(t)
        except Exception as exc:  # noqa: BLE001 - a crashed case is a failed case, reported, not fatal
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        t.record("fault", fn.fault_name, ok, detail, time.monotonic() - t0)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ main
def main() -> int:
    """Set up, run the cases, print the totals and write trial.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slurm", action="store_true", help="also the cases that need the test cluster")
    ap.add_argument("--only", choices=["inputs", "faults"], default=None)
    ap.add_argument("--keep", default=None, help="work here and keep the folder")
    ap.add_argument("--case", default=None, help="only the cases whose name contains this text (to rerun one)")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="esa-trial-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ESA_CACHE_DIR": str(root / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "ESA_RUNS": str(root / "runs"), "ESA_TINY_STEPS": "30",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    env.pop("ESA_STOP_AFTER_BATCHES", None)
    os.environ.update({k: env[k] for k in ("ESA_CACHE_DIR", "HF_HUB_OFFLINE", "ESA_RUNS")})
    t0 = time.monotonic()
    t = Trial(root, env, make_model(root))
    try:
        if args.only in (None, "inputs"):
            run_inputs(t, args.case)
        if args.only in (None, "faults"):
            faults = LOCAL_FAULTS + (SLURM_FAULTS if args.slurm else [])
            run_faults(t, [f for f in faults if args.case is None or args.case in f.fault_name])  # type: ignore[attr-defined]
    finally:
        for folder in _MOUNTS:
            subprocess.run(["umount", str(folder)], capture_output=True)
    inputs = [r for r in t.results if r["kind"] == "input"]
    faults = [r for r in t.results if r["kind"] == "fault"]
    summary = {"inputs_tried": len(inputs), "inputs_handled": sum(r["ok"] for r in inputs),
               "faults_injected": len(faults), "faults_survived": sum(r["ok"] for r in faults),
               "slurm": args.slurm, "seconds": round(time.monotonic() - t0)}
    write_json(root / "trial.json", {"summary": summary, "cases": t.results})
    print(f"\nbad inputs: {summary['inputs_handled']} of {summary['inputs_tried']} handled; faults: "
          f"{summary['faults_survived']} of {summary['faults_injected']} survived; {summary['seconds']} s; "
          f"{root / 'trial.json'}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if summary["inputs_handled"] == summary["inputs_tried"] and \
        summary["faults_survived"] == summary["faults_injected"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
