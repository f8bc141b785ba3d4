"""Every command of the user's runbook (../shared/seeds/) runs as written, apart from the program
name (`esa baseline` / `esa profile` / `esa perturb` / `esa overlap`), a tiny model, `--device
cpu` and tiny sizes (`--max-samples`, `--seq-len`, and an embedding index that exists in a
2048-token vocabulary). The outputs exist and hold sane numbers."""

from __future__ import annotations

import json
import math
import shlex

import pytest

from esa.cli import main
from esa.results.scorefile import open_score_file

# The runbook's commands, with only these substitutions: program name, MODEL for the model,
# cpu for cuda, SMALL for tiny sizes and the embedding row 128000 -> 1280 (tiny vocabulary).
SMALL = "--seq-len 32"
PHASE1 = [
    ("p1_baseline", "baseline --model MODEL --device cpu --max-samples 200 --batch-size 4 "
                    "--out-dir O/p1_baseline/llama31_8b " + SMALL),
]
PHASE2 = [
    ("p1_runner", "profile --model MODEL --metric grad_x_weight --mode per_layer --topk 100 --max-samples 24 "
                  "--device cpu --save-plots --out-dir O/p1_baseline/llama31_8b_profile " + SMALL),
    ("gradxw_perlayer", "profile --model MODEL --metric grad_x_weight --mode per_layer --topk 100 --max-samples 24 "
                        "--device cpu --save-plots --export-topk-csv --export-stats "
                        "--out-dir O/p2/llama31_8b/gradxw_perlayer_k100 " + SMALL),
    ("gradxw_global", "profile --model MODEL --metric grad_x_weight --mode global --topk 300 --max-samples 24 "
                      "--device cpu --save-plots --export-topk-csv --export-stats "
                      "--out-dir O/p2/llama31_8b/gradxw_global_k300 " + SMALL),
    ("gradsq_perlayer", "profile --model MODEL --metric grad_squared --mode per_layer --topk 100 --max-samples 24 "
                        "--device cpu --save-plots --export-topk-csv --export-stats "
                        "--out-dir O/p2/llama31_8b/gradsq_perlayer_k100 " + SMALL),
    ("actmag_perlayer", "profile --model MODEL --metric activation_magnitude --mode per_layer --topk 100 "
                        "--max-samples 24 --device cpu --save-plots --export-topk-csv --export-stats "
                        "--out-dir O/p2/llama31_8b/actmag_perlayer_k100 " + SMALL),
    ("hutch_global", "profile --model MODEL --metric hutchinson_diag --mode global --topk 100 --max-samples 12 "
                     "--device cpu --save-plots --export-topk-csv --export-stats "
                     "--out-dir O/p2/llama31_8b/hutchdiag_global_k100 " + SMALL),
    # The cross-seed overlap command reads these two folders.
    ("gradxw_seed0", "profile --model MODEL --metric grad_x_weight --mode per_layer --topk 100 --max-samples 12 "
                     "--pool-size 48 --seed 0 --device cpu --export-topk-csv "
                     "--out-dir O/p2/llama31_8b/gradxw_perlayer_k100_seed0 " + SMALL),
    ("gradxw_seed1", "profile --model MODEL --metric grad_x_weight --mode per_layer --topk 100 --max-samples 12 "
                     "--pool-size 48 --seed 1 --device cpu --export-topk-csv "
                     "--out-dir O/p2/llama31_8b/gradxw_perlayer_k100_seed1 " + SMALL),
    ("stability_1337", "profile --model MODEL --metric grad_x_weight --mode per_layer --topk 100 --max-samples 8 "
                       "--pool-size 40 --seeds 1337,123,999 --stability-check --device cpu --dtype bf16 "
                       "--save-plots --out-dir O/llama31_8b_stability " + SMALL),
]
OVERLAP = [
    ("overlap_metrics", "overlap --lists O/p2/llama31_8b/gradxw_perlayer_k100/top_weights.csv "
                        "O/p2/llama31_8b/gradsq_perlayer_k100/top_weights.csv --by tensor "
                        "--out O/p2/llama31_8b/overlap_report.json"),
    ("overlap_seeds", "overlap --lists O/p2/llama31_8b/gradxw_perlayer_k100_seed0/top_weights.csv "
                      "O/p2/llama31_8b/gradxw_perlayer_k100_seed1/top_weights.csv --by tensor "
                      "--out O/p2/llama31_8b/seed_stability.json"),
]
PHASE3 = [
    ("signflip", "profile --model MODEL --metric grad_x_weight --mode per_layer --topk 100 --max-samples 8 "
                 "--perturb sign_flip --perturb-scale 1.0 --controls random_k,bottom_k --seeds 0,1,2 "
                 "--stability-check --device cpu --save-plots --out-dir O/p3/llama31_8b/signflip_k100 "
                 "--pool-size 32 --control-repeats 5 " + SMALL),
    ("zero", "profile --model MODEL --metric grad_x_weight --mode per_layer --topk 100 --max-samples 8 "
             "--perturb zero --controls random_k,bottom_k --seeds 0,1,2 --stability-check --device cpu "
             "--save-plots --out-dir O/p3/llama31_8b/zero_k100 --pool-size 32 --control-repeats 5 " + SMALL),
    ("gaussian", "profile --model MODEL --metric grad_x_weight --mode per_layer --topk 100 --max-samples 8 "
                 "--perturb gaussian --perturb-scale 0.02 --controls random_k,bottom_k --seeds 0,1,2 "
                 "--stability-check --device cpu --save-plots --out-dir O/p3/llama31_8b/gaussian_0p02_k100 "
                 "--pool-size 32 --control-repeats 5 " + SMALL),
    ("hutch_signflip", "profile --model MODEL --metric hutchinson_diag --mode global --topk 100 --max-samples 4 "
                       "--perturb sign_flip --perturb-scale 1.0 --controls random_k,bottom_k --seeds 0,1,2 "
                       "--stability-check --device cpu --save-plots "
                       "--out-dir O/p3/llama31_8b/hutch_global_signflip_k100 --pool-size 16 --control-repeats 5 "
                       + SMALL),
    ("enhanced_hutch", "profile --model MODEL --metric hutchinson_diag --topk 100 --mode global --perturb sign_flip "
                       "--perturb-scale 1.0 --controls random_k,bottom_k --seeds 0,1,2 --stability-check "
                       "--save-plots --out-dir O/llama31_8b_hutch_diag_k100 --device cpu --max-samples 4 "
                       "--pool-size 16 --control-repeats 5 " + SMALL),
    ("bitflip_prob", "profile --model MODEL --metric grad_x_weight --mode per_layer --topk 10 --max-samples 8 "
                     "--perturb bit_flip --perturb-prob 0.05 --controls random_k,bottom_k --device cpu "
                     "--out-dir O/p3/llama31_8b/bitflip_k10 --control-repeats 5 " + SMALL),
]
PERTURB_EVAL = [  # the prototype's run_perturb_eval.py commands
    ("p3_zero_single", "perturb --model MODEL --perturbation zero --target model.embed_tokens.weight:1280,3 "
                       "--out-dir O/p3_zero_single --device cpu --max-samples 16 " + SMALL),
    ("p3_scale_single", "perturb --model MODEL --perturbation scale --scale 1.2 "
                        "--target model.embed_tokens.weight:1280,3 --out-dir O/p3_scale1p2_single --device cpu "
                        "--max-samples 16 " + SMALL),
    ("p3_noise_single", "perturb --model MODEL --perturbation noise --noise_sigma 0.05 "
                        "--target model.embed_tokens.weight:1280,3 --out-dir O/p3_noise005_single --device cpu "
                        "--max-samples 16 " + SMALL),
    ("p3_bitflip_single", "perturb --model MODEL --perturbation bitflip --bits 1 "
                          "--target model.embed_tokens.weight:1280,3 --out-dir O/p3_bitflip1_single --device cpu "
                          "--max-samples 16 " + SMALL),
]


def run(cmd: str, model, root) -> int:
    argv = shlex.split(cmd.replace("MODEL", str(model)).replace("O/", f"{root}/")) + ["--quiet"]
    return main(argv)


@pytest.fixture(scope="module")
def outputs(tiny_model_factory, tmp_path_factory):
    """Run the whole runbook once, in order (phase 2 feeds the overlap commands)."""
    model = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("runbook")
    codes = {}
    for name, cmd in PHASE1 + PHASE2 + OVERLAP + PHASE3 + PERTURB_EVAL:
        codes[name] = run(cmd, model, root)
    return root, codes


def test_every_command_succeeds(outputs):
    _, codes = outputs
    assert codes == {name: 0 for name in codes}


def test_phase1_outputs(outputs):
    root, _ = outputs
    ev = json.loads((root / "p1_baseline/llama31_8b/eval.json").read_text())
    assert ev["n_windows"] == 200 and 1.5 < ev["ppl"] < 1e5 and 0 <= ev["token_accuracy"] <= 1
    for f in ("experiment_manifest.json", "config.json"):
        assert (root / "p1_baseline/llama31_8b" / f).exists()


@pytest.mark.parametrize("folder,mode,k", [
    ("p2/llama31_8b/gradxw_perlayer_k100", "per_layer", 100), ("p2/llama31_8b/gradxw_global_k300", "global", 300),
    ("p2/llama31_8b/gradsq_perlayer_k100", "per_layer", 100), ("p2/llama31_8b/actmag_perlayer_k100", "per_layer", 100),
    ("p2/llama31_8b/hutchdiag_global_k100", "global", 100)])
def test_phase2_outputs(outputs, folder, mode, k):
    root, _ = outputs
    out = root / folder
    with open_score_file(out / "scores.h5") as sf:
        topk = sf.topk()
        attrs = sf.attrs()
    assert attrs["complete"] and attrs["mode"] == mode
    assert topk.mode == mode and len(topk) > 0
    assert all(math.isfinite(s) and s >= 0 for s in topk.score)
    if mode == "global":
        assert len(topk) == k and list(topk.rank) == list(range(1, k + 1))
        assert all(a >= b for a, b in zip(topk.score, topk.score[1:]))
        assert len(set(topk.param)) > 1  # not all in one tensor (the runbook's 'bad result')
    rows = (out / "top_weights.csv").read_text().splitlines()
    assert rows[0] == "rank,param,layer,index,flat_index,score,value" and len(rows) == len(topk) + 1
    assert (out / "sensitivity_stats.csv").exists() and (out / "sensitivity_stats.json").exists()
    assert sorted(p.name for p in (out / "plots").glob("*.png"))


def test_activation_magnitude_alias_recorded_as_act_mag(outputs):
    root, _ = outputs
    with open_score_file(root / "p2/llama31_8b/actmag_perlayer_k100/scores.h5") as sf:
        assert sf.attrs()["metric"] == "act_mag"


def test_overlap_reports(outputs):
    root, _ = outputs
    for name in ("overlap_report.json", "seed_stability.json"):
        rep = json.loads((root / "p2/llama31_8b" / name).read_text())
        for key in ("jaccard", "overlap_coefficient", "spearman", "kendall"):
            assert key in rep
        assert 0 <= rep["jaccard"] <= 1


def test_multi_seed_stability(outputs):
    root, _ = outputs
    s = json.loads((root / "llama31_8b_stability/stability_summary.json").read_text())
    assert s["num_seeds"] == 3 and len(s["jaccard_all"]) == 3
    assert 0 <= s["jaccard_mean"] <= 1
    for seed in (1337, 123, 999):
        with open_score_file(root / f"llama31_8b_stability/seed_{seed}/scores.h5") as sf:
            assert sf.attrs()["model_dtype"] == "bf16"


@pytest.mark.parametrize("folder", ["p3/llama31_8b/signflip_k100", "p3/llama31_8b/zero_k100",
                                    "p3/llama31_8b/gaussian_0p02_k100", "p3/llama31_8b/hutch_global_signflip_k100",
                                    "llama31_8b_hutch_diag_k100"])
def test_phase3_outputs(outputs, folder):
    root, _ = outputs
    out = root / folder
    stab = json.loads((out / "stability_summary.json").read_text())
    assert stab["num_seeds"] == 3
    for seed in (0, 1, 2):
        res = json.loads((out / f"seed_{seed}/perturb/perturbation.json").read_text())
        assert set(res["controls"]) == {"random_k", "bottom_k"}
        assert len(res["controls"]["random_k"]["deltas"]) == 5
        assert len(res["controls"]["bottom_k"]["deltas"]) == 1
        assert math.isfinite(res["baseline"]["ppl"]) and res["delta_ppl"] is not None
        assert res["n_targets"] > 0
        assert (out / f"seed_{seed}/perturb/plots/perturbation_vs_controls.png").exists()


def test_perturb_eval_commands(outputs):
    root, _ = outputs
    expect = {"p3_zero_single": "zero", "p3_scale1p2_single": "scale", "p3_noise005_single": "gauss_noise",
              "p3_bitflip1_single": "bit_flip"}
    for folder, kind in expect.items():
        res = json.loads((root / folder / "perturbation.json").read_text())
        assert res["perturbation"]["name"] == kind
        assert res["targets"] == ["model.embed_tokens.weight:1280,3"]
        applied = res["applied"][0]
        if kind == "zero":
            assert applied["new"] == 0.0
        if kind == "scale":
            assert applied["new"] == pytest.approx(1.2 * applied["old"], rel=1e-6)
        if kind == "bit_flip":
            assert len(applied["bits"]) == 1
    bf = json.loads((root / "p3/llama31_8b/bitflip_k10/perturb/perturbation.json").read_text())
    hit = [a for a in bf["applied"] if a["bits"]]
    assert len(hit) == max(1, math.floor(0.05 * bf["n_targets"] + 0.5))  # round half up


def test_analysis_over_the_runbook_outputs(outputs):
    """The offline analysis aggregates everything the runbook wrote."""
    import csv

    from analysis import build_report

    root, _ = outputs
    report = build_report(root)
    assert report.exists() and "Phase 3" in report.read_text()
    with open(root / "report" / "jobs.csv", newline="") as fh:
        jobs = list(csv.DictReader(fh))
    assert {j["status"] for j in jobs} == {"done"}
    phases = [j["phase"] for j in jobs]
    # 1 baseline, the phase-2 jobs (every seed folder counts), and every perturbation.json.
    assert phases.count("1") == 1
    assert phases.count("3") == 5 * 3 + 1 + len(PERTURB_EVAL)
    with open(root / "report" / "delta_ppl.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == phases.count("3")
