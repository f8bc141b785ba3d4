"""Plan expansion: example plans expand into valid manifests, ids are stable, index files line
up, grids have the right size, phase 3 points at phase-2 results, and escapes are refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from esa.core.errors import UserError
from esa.results.layout import ensure_inside, runs_root
from esa.spec.schema import validate_manifest
from jobs.plans import RunPlan, load_plan, write_expanded


def expand_plan(path: Path, runs_root: Path | None = None, model_map: dict | None = None) -> RunPlan:
    return load_plan(path, runs=runs_root, model_map=model_map)


def ids(plan: RunPlan) -> list[str]:
    return [j.id for j in plan.jobs]

ROOT = Path(__file__).resolve().parents[2]
PLANS = {"real": ROOT / "manifests", "tiny": ROOT / "manifests" / "tiny"}
# (plan set, phase) -> number of manifests
SIZES = {("real", 1): 6, ("real", 2): 6 * 4 * 3 + 3 * 3, ("real", 3): (6 + 3) * 3 * 3,
         ("tiny", 1): 1, ("tiny", 2): 2 * 3, ("tiny", 3): 3 * 2}
SEED_MODELS = {"meta-llama/Llama-3.1-8B", "mistralai/Mistral-7B-v0.1", "microsoft/Phi-3-mini-4k-instruct",
               "mistralai/Mixtral-8x7B-v0.1", "EleutherAI/pythia-1.4b", "openai-community/gpt2"}


@pytest.mark.parametrize("which,phase", sorted(SIZES))
def test_example_plans_expand_into_valid_manifests(tmp_path, which, phase):
    plan = expand_plan(PLANS[which] / f"phase{phase}.toml", runs_root=tmp_path)
    assert plan.phase == phase and len(plan.jobs) == SIZES[which, phase]
    assert plan.layout.root == tmp_path / plan.experiment
    assert len(set(ids(plan))) == len(ids(plan))
    for job in plan.jobs:
        assert validate_manifest(job.manifest.to_dict(), run_dir=plan.layout.root) == []
        assert job.manifest.to_dict()["outputs"]["dir"] == str(tmp_path / plan.experiment / "results" / job.id)
        assert job.manifest.to_dict()["model"]["trust_remote_code"] is False
    res = plan.resources
    if which == "real":  # sized per job by the planner (tests/jobs/test_jobs_submit.py checks the layouts)
        assert (res.gpus, res.mem, res.time, res.gpu_memory) == ("auto", "auto", "auto", "80G")
        assert {j.manifest.to_dict()["model"]["id"] for j in plan.jobs} == SEED_MODELS
    else:
        assert res.gpus == 0 and all(j.manifest.to_dict()["model"]["device"] == "cpu" for j in plan.jobs)
        assert all(j.manifest.to_dict()["model"]["id"] == "esa:tiny-llama" for j in plan.jobs)
        assert all(j.manifest.to_dict()["data"]["seq_len"] == 64 for j in plan.jobs)


def test_real_phase2_grid_is_the_runbook(tmp_path):
    plan = expand_plan(PLANS["real"] / "phase2.toml", runs_root=tmp_path)
    combos = {(j.labels["metric"], j.labels["mode"], j.labels["topk"]) for j in plan.jobs}
    assert combos == {("grad_x_weight", "per_layer", 100), ("grad_x_weight", "global", 300),
                      ("grad_squared", "per_layer", 100), ("act_mag", "per_layer", 100),
                      ("hutchinson_diag", "global", 100)}
    samples = {j.labels["metric"]: j.manifest.to_dict()["data"]["max_samples"] for j in plan.jobs}
    assert samples["hutchinson_diag"] == 120 and samples["grad_x_weight"] == 200
    assert {j.labels["seed"] for j in plan.jobs} == {0, 1, 2}
    assert {j.manifest.to_dict()["model"]["id"] for j in plan.jobs} == SEED_MODELS
    # the curvature metric only where one GPU holds it (double backward cannot be sharded)
    assert {j.labels["model"] for j in plan.jobs if j.labels["metric"] == "hutchinson_diag"} == {
        "microsoft/Phi-3-mini-4k-instruct", "EleutherAI/pythia-1.4b", "openai-community/gpt2"}
    assert all(j.manifest.to_dict()["data"]["config"] == "wikitext-2-raw-v1" for j in plan.jobs)


def test_tiny_phase2_is_two_metrics_by_three_seeds(tmp_path):
    plan = expand_plan(PLANS["tiny"] / "phase2.toml", runs_root=tmp_path)
    got = sorted((j.manifest.to_dict()["metric"]["name"], j.manifest.to_dict()["seed"]) for j in plan.jobs)
    assert got == sorted((m, s) for m in ("grad_x_weight", "act_mag") for s in (0, 1, 2))
    assert all(j.manifest.to_dict()["shard"] == "0/1" for j in plan.jobs) and not plan.reduce


def test_reexpansion_is_idempotent(tmp_path):
    written = {}
    for phase in (1, 2, 3):
        plan = expand_plan(PLANS["tiny"] / f"phase{phase}.toml", runs_root=tmp_path)
        written[phase] = write_expanded(plan)
    folder = tmp_path / "tiny" / "manifests"
    before = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    for phase in (1, 2, 3):
        again = expand_plan(PLANS["tiny"] / f"phase{phase}.toml", runs_root=tmp_path)
        assert write_expanded(again) == written[phase]
    after = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert after == before  # same files, same contents, not even rewritten
    manifests = [n for n in after if n.endswith(".json")]
    assert len(manifests) == 1 + 6 + 6  # no duplicates
    assert sorted(n for n in after if n.startswith("index")) == [f"index-phase{i}.txt" for i in (1, 2, 3)]
    # outputs are not part of the id: another runs root gives the same phase-1/2 ids
    other = expand_plan(PLANS["tiny"] / "phase2.toml", runs_root=tmp_path / "elsewhere")
    assert ids(other) == [Path(p).stem for p in written[2]]


def test_index_lines_are_the_manifests_in_order(tmp_path):
    plan = expand_plan(PLANS["tiny"] / "phase2.toml", runs_root=tmp_path)
    written = write_expanded(plan)
    lines = plan.layout.index_path(plan.phase).read_text().splitlines()
    assert plan.layout.index_path(plan.phase) == tmp_path / "tiny" / "manifests" / "index-phase2.txt"
    assert lines == [str(p) for p in written] and len(lines) == len(plan.jobs)
    for task, line in enumerate(lines):  # array task i runs line i+1
        doc = json.loads(Path(line).read_text())
        assert doc == plan.jobs[task].manifest.to_dict() and Path(line).stem == doc["id"] == plan.jobs[task].id
    record = json.loads((tmp_path / "tiny" / "plan-phase2.json").read_text())
    assert [j["id"] for j in record["jobs"]] == ids(plan) and record["resources"]["array_parallelism"] == 2


def test_phase3_targets_are_the_phase2_results(tmp_path):
    p2 = expand_plan(PLANS["tiny"] / "phase2.toml", runs_root=tmp_path)
    p3 = expand_plan(PLANS["tiny"] / "phase3.toml", runs_root=tmp_path)
    ranking = {(j.labels["metric"], j.labels["seed"]): j for j in p2.jobs}
    for job in p3.jobs:
        source = ranking["grad_x_weight", job.manifest.to_dict()["seed"]]
        targets = job.manifest.to_dict()["targets"]
        assert targets["from_scores"] == str(tmp_path / "tiny" / "results" / source.id / "scores.h5")
        assert job.needs == (source.id,)
        assert targets["mode"] == source.manifest.to_dict()["ranking"]["mode"] and targets["topk"] == 10
        assert job.manifest.to_dict()["model"] == source.manifest.to_dict()["model"]
        assert job.manifest.to_dict()["controls"] == {"names": ["random_k", "bottom_k"], "repeats": 3}
    assert {j.manifest.to_dict()["perturbation"]["name"] for j in p3.jobs} == {"sign_flip", "zero"}


def test_real_phase3_uses_the_k100_rankings_and_canonical_perturbations(tmp_path):
    p2 = expand_plan(PLANS["real"] / "phase2.toml", runs_root=tmp_path)
    p3 = expand_plan(PLANS["real"] / "phase3.toml", runs_root=tmp_path)
    wanted = {j.id for j in p2.jobs if j.labels["metric"] in ("grad_x_weight", "hutchinson_diag")
              and j.labels["topk"] == 100}
    assert {j.needs[0] for j in p3.jobs} == wanted and len(wanted) == 6 * 3 + 3 * 3
    perts = {json.dumps(j.manifest.to_dict()["perturbation"], sort_keys=True) for j in p3.jobs}
    assert perts == {json.dumps(p, sort_keys=True) for p in (
        {"name": "sign_flip", "params": {"scale": 1.0}}, {"name": "zero", "params": {}},
        {"name": "gauss_noise", "params": {"sigma": 0.02, "mode": "relative"}})}


def _plan(tmp_path: Path, text: str, name: str = "plan.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TINY2 = """
[experiment]
name = "{name}"
phase = 2
[data]
seq_len = 64
max_samples = 8
[grid]
models = ["esa:tiny-llama"]
seeds = [0, 1]
shards = {shards}
[[grid.profile]]
metric = "activation_magnitude"
mode = ["per_layer", "global"]
topk = 5
"""


def test_shards_make_shard_manifests_and_reduce_steps(tmp_path):
    plan = expand_plan(_plan(tmp_path, TINY2.format(name="sh", shards=3)), runs_root=tmp_path)
    whole = expand_plan(_plan(tmp_path, TINY2.format(name="sh", shards=1), "whole.toml"), runs_root=tmp_path)
    assert len(whole.jobs) == 4 and len(plan.jobs) == 12 and len(plan.reduce) == 4
    assert {j.manifest.to_dict()["shard"] for j in plan.jobs} == {"0/3", "1/3", "2/3"}
    assert all(j.manifest.to_dict()["metric"]["name"] == "act_mag" for j in plan.jobs)  # alias canonicalised
    # the reduced scores land where the unsharded job would have written them
    assert [r.id for r in plan.reduce] == ids(whole)
    for step in plan.reduce:
        assert step.out_dir == tmp_path / "sh" / "results" / step.id
        assert {s.id for s in step.shards} <= set(ids(plan)) and len(step.shards) == 3
        assert step.command()[0] == "reduce" and step.command()[-2:] == ["--out-dir", str(step.out_dir)]
    # phase 3 of a sharded phase 2 reads the reduced folders
    p3 = _plan(tmp_path, '[experiment]\nname = "sh"\nphase = 3\n[from_phase2]\nplan = "plan.toml"\n'
               'modes = ["global"]\n[grid]\n[[grid.perturbation]]\nname = "bitflip"\nbit_index = 30\n', "p3.toml")
    jobs = expand_plan(p3, runs_root=tmp_path).jobs
    assert len(jobs) == 2 and {j.needs[0] for j in jobs} <= {r.id for r in plan.reduce}
    assert jobs[0].manifest.to_dict()["perturbation"] == {"name": "bit_flip", "params": {"bits": 1, "bit_index": 30, "prob": 1.0}}
    assert jobs[0].manifest.to_dict()["targets"]["topk"] == 5  # default k: the ranking's own topk


def test_model_map_and_runs_root_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ESA_RUNS", str(tmp_path / "env-runs"))
    plan = expand_plan(PLANS["tiny"] / "phase3.toml", model_map={"esa:tiny-llama": "/models/tiny"})
    assert plan.layout.root == tmp_path / "env-runs" / "tiny"
    assert {j.manifest.to_dict()["model"]["id"] for j in plan.jobs} == {"/models/tiny"}
    assert {j.labels["model"] for j in plan.jobs} == {"esa:tiny-llama"}
    monkeypatch.delenv("ESA_RUNS")
    monkeypatch.chdir(tmp_path)
    assert runs_root() == tmp_path / "runs"


@pytest.mark.parametrize("name", ["../evil", "a/b", "/tmp/x", "..", ".hidden", ""])
def test_experiment_names_that_escape_the_runs_root_are_refused(tmp_path, name):
    plan = _plan(tmp_path, TINY2.format(name=name, shards=1))
    with pytest.raises(UserError, match="experiment"):
        expand_plan(plan, runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_symlinks_out_of_the_run_folder_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    plan_path = _plan(tmp_path, TINY2.format(name="exp", shards=1))
    run = tmp_path / "runs" / "exp"
    run.mkdir(parents=True)
    (run / "results").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="outside the run folder"):
        expand_plan(plan_path, runs_root=tmp_path / "runs")
    (run / "results").unlink()
    plan = expand_plan(plan_path, runs_root=tmp_path / "runs")
    (run / "manifests").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="outside the run folder"):
        write_expanded(plan)
    assert list(outside.iterdir()) == []
    (tmp_path / "runs" / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="outside"):
        expand_plan(_plan(tmp_path, TINY2.format(name="linked", shards=1)), runs_root=tmp_path / "runs")


def test_ensure_inside():
    run = Path("/runs/exp")
    assert ensure_inside(run, "results/a") == Path("/runs/exp/results/a")
    for bad in ("../other/x", "/runs/other", "/etc/passwd", "results/../../x", ".", "/runs/exp"):
        with pytest.raises(UserError, match="outside the run folder"):
            ensure_inside(run, bad)


@pytest.mark.parametrize("text,needle", [
    ('[experiment]\nname = "e"\nphase = 2\n[grid]\nmodels = ["m"]\nmetrcs = ["magnitude"]\n', "$.grid.metrcs: unknown field"),
    ('[experiment]\nname = "e"\nphase = 2\n[grid]\nmodels = ["m"]\nmetrics = ["magnitud"]\n', "$.grid.metrics[0]: 'magnitud' is not one of"),
    ('[experiment]\nname = "e"\nphase = 1\n[outputs]\ndir = "/tmp"\n[grid]\nmodels = ["m"]\n', "$.outputs: not allowed in a phase-1 plan"),
    ('[experiment]\nname = "e"\nphase = 2\n[outputs]\ndir = "../x"\n[grid]\nmodels = ["m"]\nmetrics = ["magnitude"]\n', "$.outputs.dir: unknown field"),
    ('[experiment]\nname = "e"\nphase = 3\n[grid]\n[[grid.perturbation]]\nname = "zero"\n', "$.from_phase2: required field is missing"),
    ('[experiment]\nname = "e"\nphase = 2\n[resources]\ntime = "4h"\n[grid]\nmodels = ["m"]\nmetrics = ["magnitude"]\n', "$.resources.time: must be a Slurm time"),
    ('[experiment]\nname = "e"\nphase = 2\n[grid]\nmodels = ["m"]\n', "needs grid.metrics or [[grid.profile]]"),
    ('[experiment\nname = "e"\n', "is not valid TOML"),
])
def test_plan_errors_name_the_key(tmp_path, text, needle):
    with pytest.raises(UserError) as info:
        expand_plan(_plan(tmp_path, text), runs_root=tmp_path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_k_larger_than_the_ranking_is_refused(tmp_path):
    _plan(tmp_path, TINY2.format(name="e", shards=1))
    p3 = _plan(tmp_path, '[experiment]\nname = "e"\nphase = 3\n[from_phase2]\nplan = "plan.toml"\n'
               '[grid]\nk = [6]\n[[grid.perturbation]]\nname = "zero"\n', "p3.toml")
    with pytest.raises(UserError, match="grid.k 6 exceeds the top 5"):
        expand_plan(p3, runs_root=tmp_path)
    other = _plan(tmp_path, TINY2.format(name="other", shards=1), "other.toml")
    assert other.exists()
    p3.write_text(p3.read_text().replace('"plan.toml"', '"other.toml"').replace("[6]", "[5]"))
    with pytest.raises(UserError, match="same experiment"):
        expand_plan(p3, runs_root=tmp_path)


def test_plans_never_set_trust_remote_code_unless_asked(tmp_path):
    text = TINY2.format(name="e", shards=1).replace('models = ["esa:tiny-llama"]',
                                                    'models = ["a", {id = "b", trust_remote_code = true}]')
    plan = expand_plan(_plan(tmp_path, text), runs_root=tmp_path)
    trust = {j.manifest.to_dict()["model"]["id"]: j.manifest.to_dict()["model"]["trust_remote_code"] for j in plan.jobs}
    assert trust == {"a": False, "b": True}
    assert os.path.isabs(plan.jobs[0].manifest.to_dict()["outputs"]["dir"])


def test_a_list_of_k_is_one_dose_response_job(tmp_path):
    _plan(tmp_path, TINY2.format(name="dose", shards=1))
    p3 = _plan(tmp_path, '[experiment]\nname = "dose"\nphase = 3\n[from_phase2]\nplan = "plan.toml"\n'
               'modes = ["global"]\n[grid]\nk = [[5, 1, 2], 3]\n[[grid.perturbation]]\nname = "zero"\n', "p3.toml")
    jobs = expand_plan(p3, runs_root=tmp_path).jobs
    assert sorted(str(j.manifest.to_dict()["targets"]["topk"]) for j in jobs) == ["3", "3", "[1, 2, 5]", "[1, 2, 5]"]
    for job in jobs:
        assert validate_manifest(job.manifest.to_dict(), run_dir=tmp_path / "dose") == []
    p3.write_text(p3.read_text().replace("[[5, 1, 2], 3]", "[[1, 6]]"))
    with pytest.raises(UserError, match=r"grid.k \[1, 6\] exceeds the top 5"):
        expand_plan(p3, runs_root=tmp_path)


def test_a_phase2_plan_from_phase2_takes_each_models_rankings_as_candidates(tmp_path):
    """The ground-truth plan: ablation of the weights the rankings of the same model name."""
    _plan(tmp_path, TINY2.format(name="gt", shards=1))
    truth = _plan(tmp_path, '[experiment]\nname = "gt"\nphase = 2\n[from_phase2]\nplan = "plan.toml"\nseeds = [0]\n'
                  '[data]\nseq_len = 64\nmax_samples = 8\n[grid]\nmodels = ["esa:tiny-llama"]\nshards = 2\n'
                  '[[grid.profile]]\nmetric = "ablation"\nmode = "global"\ntopk = 10\nn_candidates = 4\n', "truth.toml")
    source = expand_plan(tmp_path / "plan.toml", runs_root=tmp_path)
    seed0 = [j for j in source.jobs if j.labels["seed"] == 0]
    plan = expand_plan(truth, runs_root=tmp_path)
    assert len(plan.jobs) == 2 and len(plan.reduce) == 1  # candidates split over two shards
    for job in plan.jobs:
        metric = job.manifest.to_dict()["metric"]
        assert metric["candidates_from"] == [str(j.out_dir / "scores.h5") for j in seed0]
        assert metric["n_candidates"] == 4 and set(job.needs) == {j.id for j in seed0}
    truth.write_text(truth.read_text().replace('"esa:tiny-llama"]', '"esa:tiny-mistral"]'))
    with pytest.raises(UserError, match="no ranking of model 'esa:tiny-mistral'"):
        expand_plan(truth, runs_root=tmp_path)
    one = _plan(tmp_path, '[experiment]\nname = "gt"\nphase = 1\n[from_phase2]\nplan = "plan.toml"\n[grid]\n'
                'models = ["esa:tiny-llama"]\n', "p1.toml")
    with pytest.raises(UserError, match=r"\$\.from_phase2"):  # phase 1 takes no from_phase2
        expand_plan(one, runs_root=tmp_path)


def test_model_entries_bring_their_own_resources_and_layout(tmp_path):
    text = TINY2.format(name="per-model", shards=1).replace(
        'models = ["esa:tiny-llama"]',
        'models = ["esa:tiny-llama", {id = "esa:tiny-mixtral", resources = {cpus = 3}, '
        'parallel = {gpus_per_node = 2, activation_checkpointing = true}}]')
    text = text.replace("[grid]", "[resources]\ncpus = 2\ntime = \"00:20:00\"\n[parallel]\ngpus_per_node = 1\n[grid]")
    plan = expand_plan(_plan(tmp_path, text), runs_root=tmp_path)
    by_model = {j.labels["model"]: j.manifest for j in plan.jobs}
    llama, mixtral = by_model["esa:tiny-llama"], by_model["esa:tiny-mixtral"]
    assert (llama.resources.cpus, llama.resources.time, llama.parallel.world_size) == (2, "00:20:00", 1)
    assert (mixtral.resources.cpus, mixtral.resources.time, mixtral.parallel.gpus_per_node) == (3, "00:20:00", 2)
    assert mixtral.parallel.activation_checkpointing and not llama.parallel.activation_checkpointing
    # where and how a job runs is not part of its id
    plain = expand_plan(_plan(tmp_path, TINY2.format(name="per-model", shards=1).replace(
        'models = ["esa:tiny-llama"]', 'models = ["esa:tiny-llama", "esa:tiny-mixtral"]'), "plain.toml"),
        runs_root=tmp_path)
    assert sorted(ids(plain)) == sorted(ids(plan))


def test_profile_entries_can_name_their_models(tmp_path):
    text = TINY2.format(name="subset", shards=1).replace(
        'models = ["esa:tiny-llama"]', 'models = ["esa:tiny-llama", "esa:tiny-gpt2"]').replace(
        'metric = "activation_magnitude"', 'metric = "activation_magnitude"\nmodels = ["esa:tiny-gpt2"]')
    plan = expand_plan(_plan(tmp_path, text), runs_root=tmp_path)
    assert {j.labels["model"] for j in plan.jobs} == {"esa:tiny-gpt2"}
    with pytest.raises(UserError, match="not in grid.models: esa:tiny-phi3"):
        expand_plan(_plan(tmp_path, text.replace('models = ["esa:tiny-gpt2"]', 'models = ["esa:tiny-phi3"]'),
                          "typo.toml"), runs_root=tmp_path)
