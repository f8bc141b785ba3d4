"""A job run as 2 ranks (torchrun, gloo, FSDP2) equals the 1-rank job with the same global batch.

Each world runs the same manifests in one process per rank (run_manifests.py calls esa.runner.run,
the path of `esa run`): phase 2 with grad_x_weight, grad_squared, act_mag and super_weight, a
baseline, and a phase-3 perturbation with every control on the phase-2 ranking. 7 windows in
batches of 3 give a last batch of one window, so rank 1 also runs a stand-in (weight-0) batch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from esa.cli import main
from esa.results.scorefile import open_score_file, read_scores
from esa.spec.manifest import Manifest

RUNNER = Path(__file__).with_name("run_manifests.py")
# llama: everything; mixtral: fused 3-D experts; gpt2: Conv1D weights and a tied lm_head (one FSDP unit).
ARCHS = ("llama", "mixtral", "gpt2")
DATA = {"dataset": "builtin", "split": "train", "seq_len": 32, "max_samples": 7, "batch_size": 3}
MODEL = {"dtype": "fp32", "device": "cpu"}
PROFILES = {  # name -> (metric, ranking)
    "grad_x_weight": ("grad_x_weight", {"mode": "global", "topk": 25}),
    "grad_squared": ("grad_squared", {"mode": "per_layer", "topk": 4}),
    "act_mag": ("act_mag", {"mode": "per_layer", "topk": 4}),
    "super_weight": ("super_weight", {"mode": "global", "topk": 10}),
}
# Scores are sums of the same per-window terms in another order (2 ranks, then a reduce).
SCORE_RTOL = 2e-5


def launch(world: int, *args: str, env: dict[str, str] | None = None, timeout: float = 900
           ) -> subprocess.CompletedProcess:
    """`python ARGS` as 1 rank, or under torchrun as `world` ranks on this machine."""
    launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    return subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def write_manifest(folder: Path, name: str, doc: dict) -> Path:
    manifest = Manifest.from_dict({**doc, "outputs": {**doc.get("outputs", {}), "dir": str(folder / name)}},
                                  partial=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(manifest.to_dict()))
    return path


def job_manifests(folder: Path, model: Path, arch: str) -> list[Path]:
    model_section = {**MODEL, "id": str(model)}
    paths = []
    for name, (metric, ranking) in PROFILES.items():
        if arch != "llama" and name == "grad_squared":
            continue
        paths.append(write_manifest(folder, f"{arch}-{name}", {"phase": 2, "model": model_section, "data": DATA,
                                                               "metric": {"name": metric}, "ranking": ranking}))
    if arch == "llama":
        paths.append(write_manifest(folder, f"{arch}-baseline", {
            "phase": 1, "model": model_section, "data": {**DATA, "split": "validation", "max_samples": 9,
                                                         "batch_size": 4}}))
        paths.append(write_manifest(folder, f"{arch}-perturb", {
            "phase": 3, "model": model_section, "data": {**DATA, "split": "validation", "max_samples": 9,
                                                         "batch_size": 4},
            "perturbation": {"name": "gauss_noise", "params": {"sigma": 2.0}},
            "targets": {"from_scores": str(folder / f"{arch}-grad_x_weight" / "scores.h5"), "topk": 25},
            "controls": {"names": ["random_k", "bottom_k", "magnitude_matched"], "repeats": 2}}))
    return paths


@pytest.fixture(scope="module")
def runs(tiny_model_factory, tmp_path_factory):
    """{arch: (1-rank folder, 2-rank folder)} after running every manifest in both worlds."""
    out = {}
    for arch in ARCHS:
        model = tiny_model_factory(arch)
        pair = []
        for world in (1, 2):
            folder = tmp_path_factory.mktemp(f"{arch}-world{world}")
            r = launch(world, str(RUNNER), *map(str, job_manifests(folder, model, arch)))
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
            pair.append(folder)
        out[arch] = tuple(pair)
    return out


def close(a: float, b: float, rel: float = 1e-6, abs_: float = 1e-12) -> bool:
    return (a is None and b is None) or math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def assert_same_scores(one: Path, two: Path) -> None:
    s1, s2 = read_scores(one / "scores.h5"), read_scores(two / "scores.h5")
    assert s1.keys() == s2.keys()
    for name in s1:
        scale = max(float(np.abs(s1[name]).max()), 1e-30)
        assert float(np.abs(s1[name] - s2[name]).max()) <= SCORE_RTOL * scale, name
    with open_score_file(one / "scores.h5") as f1, open_score_file(two / "scores.h5") as f2:
        for group in ("topk", "bottomk"):
            t1, t2 = f1.topk(group), f2.topk(group)
            assert t1.param == t2.param and t1.index == t2.index, group  # the same weights, in the same order
            assert np.array_equal(t1.rank, t2.rank) and np.array_equal(t1.value, t2.value)
            np.testing.assert_allclose(t1.score, t2.score, rtol=SCORE_RTOL)


@pytest.mark.parametrize("arch,name", [("llama", n) for n in PROFILES] +
                         [(a, n) for a in ARCHS[1:] for n in PROFILES if n != "grad_squared"])
def test_phase2_scores_and_rankings(runs, arch, name):
    one, two = (f / f"{arch}-{name}" for f in runs[arch])
    assert_same_scores(one, two)
    p1, p2 = (json.loads((f / "profile.json").read_text()) for f in (one, two))
    assert p1["n_windows"] == p2["n_windows"] == 7
    assert p1["metric_extras"].keys() == p2["metric_extras"].keys()
    for key in ("tokens", "expert_tokens", "scored_via"):
        assert p1["metric_extras"].get(key) == p2["metric_extras"].get(key), key
    job = json.loads((two / "experiment_manifest.json").read_text())
    assert job["provenance"]["launch"] == {"launcher": "torchrun", "world_size": 2, "sharded": True}
    assert json.loads((one / "experiment_manifest.json").read_text())["provenance"]["launch"]["world_size"] == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_super_weight_candidates(runs, arch):
    c1, c2 = (json.loads((f / f"{arch}-super_weight" / "super_weights.json").read_text()) for f in runs[arch])
    assert len(c1) == len(c2) > 0
    for a, b in zip(c1, c2):
        for key in ("param", "index", "expert", "input_token", "output_token", "rank"):
            assert a[key] == b[key], (key, a, b)
        assert a["weight_value"] == b["weight_value"]  # read from the owning rank's shard
        for key in ("input_spike", "output_spike"):
            assert close(a[key], b[key], 1e-5), (key, a, b)


def test_baseline_figures(runs):
    e1, e2 = (json.loads((f / "llama-baseline" / "eval.json").read_text()) for f in runs["llama"])
    assert e1["n_windows"] == e2["n_windows"] == 9 and e1["n_tokens"] == e2["n_tokens"]
    for key in ("ppl", "nll", "token_accuracy"):
        assert close(e1[key], e2[key]), key
    np.testing.assert_allclose(e1["per_window_nll"], e2["per_window_nll"], rtol=1e-6)
    assert e1["model"]["class"] == e2["model"]["class"] == "LlamaForCausalLM"


def test_perturbation_with_controls(runs):
    r1, r2 = (json.loads((f / "llama-perturb" / "perturbation.json").read_text()) for f in runs["llama"])
    assert r1["targets"] == r2["targets"] and len(r1["targets"]) == 25
    assert r1["applied"] == r2["applied"]  # same old values, same noise, same new values, bit for bit
    for key in ("delta_ppl", "delta_nll", "delta_token_accuracy"):
        assert close(r1[key], r2[key]), key
    for part in ("baseline", "perturbed"):
        for key, value in r1[part].items():
            assert close(value, r2[part][key]), (part, key)
    assert r1["controls"].keys() == r2["controls"].keys() == {"random_k", "bottom_k", "magnitude_matched"}
    for name, c1 in r1["controls"].items():
        c2 = r2["controls"][name]
        assert c1["sizes"] == c2["sizes"]
        np.testing.assert_allclose(c1["deltas"], c2["deltas"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(c1["nll"]["deltas"], c2["nll"]["deltas"], rtol=1e-6, atol=1e-12)


def test_only_rank0_writes(runs):
    two = runs["llama"][1]
    log = (two / "llama-grad_x_weight" / "esa.log").read_text()
    assert "rank 0 of 2" in log and "rank 1 of 2" not in log
    assert not list(two.rglob("*.tmp")) and not list(two.rglob("checkpoint"))


def profile_cli(model: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "esa", "profile", "--model", str(model), "--metric", "grad_x_weight", "--mode", "global",
            "--topk", "25", "--dtype", "fp32", "--device", "cpu", "--dataset", "builtin", "--split", "train",
            "--seq-len", "32", "--max-samples", "7", "--batch-size", "3", "--out-dir", str(out), "--quiet", *extra]


def test_cli_under_torchrun_with_activation_checkpointing(runs, tiny_model_factory, tmp_path):
    """`torchrun -m esa profile ... --activation-checkpointing`: the launch users type, sharded with no
    other flag, recomputing activations, and still equal to the plain 1-rank run."""
    r = launch(2, *profile_cli(tiny_model_factory("llama"), tmp_path, "--activation-checkpointing"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert_same_scores(runs["llama"][0] / "llama-grad_x_weight", tmp_path)
    assert "recompute their activations" in (tmp_path / "esa.log").read_text()
    manifest = json.loads((tmp_path / "experiment_manifest.json").read_text())
    assert manifest["manifest"]["parallel"]["activation_checkpointing"] is True


def test_sharded_preemption_resumes_with_the_same_world(runs, tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    r = launch(2, *profile_cli(model, tmp_path), env={"ESA_STOP_AFTER_BATCHES": "1"})
    assert r.returncode != 0 and "pre-empted" in r.stderr
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and state["batches_done"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("*.safetensors")) == [
        "accumulators.rank0.safetensors", "accumulators.rank1.safetensors"]
    # One rank cannot continue two ranks' sums: a clear error, and the checkpoint is kept.
    assert main(profile_cli(model, tmp_path)[2:]) == 2
    assert (tmp_path / "checkpoint").is_dir()
    r = launch(2, *profile_cli(model, tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    assert_same_scores(runs["llama"][0] / "llama-grad_x_weight", tmp_path)
    assert not (tmp_path / "checkpoint").exists()


def test_curvature_metrics_are_refused_when_sharded(tiny_model_factory, tmp_path):
    args = profile_cli(tiny_model_factory("llama"), tmp_path)
    args[args.index("grad_x_weight")] = "hutchinson_diag"
    r = launch(2, *args)
    assert r.returncode != 0
    assert "esa profile: error: hutchinson_diag needs double backward" in r.stderr
    assert "esa profile (rank 1 of 2): error:" in r.stderr
    assert not (tmp_path / "scores.h5").exists()
