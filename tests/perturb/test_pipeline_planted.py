"""End to end on a planted super weight: phase 2 ranks it first, phase 3 proves it matters."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from esa.cli import main
from esa.model.planting import plant_super_weight
from esa.results.scorefile import read_topk


def _plant(src, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    names = plant_super_weight(model, layer=0, row=3, col=5, col2=6)
    out = tmp_path_factory.mktemp("planted")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out, names


@pytest.fixture(scope="module")
def planted(tiny_model_factory, tmp_path_factory):
    """A trained tiny llama with a cancelling super-weight pair planted in layer 0."""
    return _plant(tiny_model_factory("llama", train_steps=150), tmp_path_factory)


@pytest.fixture(scope="module")
def planted_untrained(tiny_model_factory, tmp_path_factory):
    """The same construction in an untrained tiny llama."""
    return _plant(tiny_model_factory("llama"), tmp_path_factory)


COMMON = ["--device", "cpu", "--dtype", "fp32", "--seq-len", "64", "--max-samples", "16", "--quiet"]


# grad_x_weight is a first-order Taylor estimate, |W·g|. For the planted pair the step from
# W = ±V to 0 is far outside the linear regime, and the input weights of neuron col (whose
# gradients also scale with V) can outscore the pair over the whole model: zeroing one of them
# breaks the cancellation too. Within its own tensor the pair is first; act_mag (|W|·||x||)
# ranks it first over the whole model. docs/metrics.md records this; the tests pin both facts.
@pytest.mark.parametrize("which", ["planted", "planted_untrained"])
def test_act_mag_ranks_the_planted_pair_first_over_the_model(request, tmp_path, which):
    model_dir, names = request.getfixturevalue(which)
    assert main(["profile", "--model", str(model_dir), "--metric", "act_mag", "--mode", "global",
                 "--topk", "10", "--export-topk-csv", "--out-dir", str(tmp_path), *COMMON]) == 0
    topk = read_topk(tmp_path / "scores.h5")
    ranked = [f"{p}:{','.join(map(str, i))}" for p, i in zip(topk.param, topk.index)]
    assert set(ranked[:2]) == set(names)
    first_csv_row = (tmp_path / "top_weights.csv").read_text().splitlines()[1]
    assert first_csv_row.split(",")[1] == names[0].split(":")[0]


@pytest.mark.parametrize("which", ["planted", "planted_untrained"])
def test_grad_x_weight_ranks_the_planted_pair_first_in_its_tensor(request, tmp_path, which):
    model_dir, names = request.getfixturevalue(which)
    down = "model.layers.0.mlp.down_proj.weight"
    assert main(["profile", "--model", str(model_dir), "--metric", "grad_x_weight", "--mode", "per_layer",
                 "--topk", "2", "--include", down, "--out-dir", str(tmp_path), *COMMON]) == 0
    topk = read_topk(tmp_path / "scores.h5")
    assert {f"{p}:{','.join(map(str, i))}" for p, i in zip(topk.param, topk.index)} == set(names)


def test_first_order_score_can_rank_neuron_inputs_above_the_pair(planted, tmp_path):
    model_dir, names = planted
    assert main(["profile", "--model", str(model_dir), "--metric", "grad_x_weight", "--mode", "per_layer",
                 "--topk", "1", "--include", "layers.0.mlp", "--out-dir", str(tmp_path), *COMMON]) == 0
    topk = read_topk(tmp_path / "scores.h5")
    best = dict(zip(topk.param, topk.score))
    top_input = max(best["model.layers.0.mlp.up_proj.weight"], best["model.layers.0.mlp.gate_proj.weight"])
    assert top_input > best["model.layers.0.mlp.down_proj.weight"]


def test_zeroing_the_planted_weight_beats_100_random_controls(planted, tmp_path):
    model_dir, names = planted
    assert main(["perturb", "--model", str(model_dir), "--perturb", "zero", "--target", names[1],
                 "--controls", "random_k", "--control-repeats", "100", "--out-dir", str(tmp_path),
                 "--device", "cpu", "--seq-len", "64", "--max-samples", "8", "--quiet", "--save-plots"]) == 0
    res = json.loads((tmp_path / "perturbation.json").read_text())
    for key in ("baseline", "perturbed"):
        assert set(res[key]) >= {"ppl", "nll", "token_accuracy"}
    ctl = res["controls"]["random_k"]
    assert len(ctl["deltas"]) == 100
    assert res["delta_ppl"] > 10 * max(abs(d) for d in ctl["deltas"])
    assert res["perturbed"]["ppl"] > 2 * res["baseline"]["ppl"]
    assert ctl["p_value"] == pytest.approx(1 / 101) and ctl["p_value"] <= 0.01
    assert ctl["z"] > 10
    assert res["delta_nll_ci"]["low"] > 0
    assert (tmp_path / "plots" / "perturbation_vs_controls.png").stat().st_size > 1000


def test_model_is_bit_identical_after_phase3(planted, tmp_path):
    """Phase 3 perturbs in place and restores: the model state is unchanged bit for bit."""
    from esa.perturb.perturbations import apply_perturbation, get_perturbation
    from esa.perturb.targets import resolve_targets

    model_dir, names = planted
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    applied = apply_perturbation(model, resolve_targets(model, names), get_perturbation("sign_flip"))
    assert not torch.equal(model.state_dict()["model.layers.0.mlp.down_proj.weight"],
                           before["model.layers.0.mlp.down_proj.weight"])
    applied.restore()
    assert all(torch.equal(before[k].view(torch.int32), v.view(torch.int32)) for k, v in model.state_dict().items())
