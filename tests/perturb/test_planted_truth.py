"""On the trained tiny Llama with a planted cancelling pair (block 1, down_proj [5,7] and [5,11], V = 10⁴·max|W|):
w²-weighted saliency (obd, fisher_obd, act_mag) ranks the pair first over the whole model, while the squared
gradient and the Hutchinson diagonal (no w²) rank the input weights of the same two neurons first. The exact
ablation confirms the pair among act_mag's choices, and shows those input weights are truly damaging too
(zeroing one breaks the cancellation as well): docs/metrics.md records the numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from esa.cli import main
from esa.model.planting import plant_super_weight
from esa.results.scorefile import read_candidates, read_topk

COMMON = ["--device", "cpu", "--dtype", "fp32", "--seq-len", "64", "--max-samples", "16", "--mode", "global",
          "--quiet"]


@pytest.fixture(scope="module")
def planted(tiny_model_factory, tmp_path_factory):
    """The trained tiny llama (150 steps) with the pair of the issue planted in block 1."""
    src = tiny_model_factory("llama", train_steps=150)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    names = plant_super_weight(model, layer=1, row=5, col=7, col2=11)
    out = tmp_path_factory.mktemp("planted-1")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out, names


@pytest.fixture(scope="module")
def rankings(planted, tmp_path_factory):
    """Global top-10 of each metric on the planted model: metric -> (out dir, ranked weight names)."""
    model_dir, _ = planted
    out = {}
    for metric, extra in (("act_mag", []), ("grad_squared", []), ("hutchinson_diag", []), ("obd", []),
                          ("fisher_obd", []), ("fisher_obd_per_sample", ["--per-sample", "--batch-size", "4"])):
        folder = tmp_path_factory.mktemp(metric)
        assert main(["profile", "--model", str(model_dir), "--metric", metric.replace("_per_sample", ""),
                     "--topk", "10", *extra, "--out-dir", str(folder), *COMMON]) == 0
        out[metric] = (folder, read_topk(folder / "scores.h5").names())
    return out


@pytest.mark.parametrize("metric", ["obd", "fisher_obd", "fisher_obd_per_sample", "act_mag"])
def test_weighting_by_w_squared_ranks_the_pair_first(rankings, planted, metric):
    _, names = planted
    assert set(rankings[metric][1][:2]) == set(names)


@pytest.mark.parametrize("metric", ["grad_squared", "hutchinson_diag"])
def test_scores_without_w_rank_the_neurons_inputs_above_the_pair(rankings, planted, metric):
    _, names = planted
    top3 = rankings[metric][1][:3]
    assert not set(names) & set(top3)
    # What they prefer instead: input weights (gate/up rows) of the two planted neurons.
    assert all(n.startswith(("model.layers.1.mlp.gate_proj.weight:7,", "model.layers.1.mlp.gate_proj.weight:11,",
                             "model.layers.1.mlp.up_proj.weight:7,", "model.layers.1.mlp.up_proj.weight:11,"))
               for n in top3), top3


def _ablate(model_dir, sources, out) -> tuple[list[str], dict[str, float]]:
    args = ["profile", "--model", str(model_dir), "--metric", "ablation", "--topk", "20", "--candidates", "10",
            "--out-dir", str(out), *COMMON]
    for source in sources:
        args += ["--candidates-from", str(source / "scores.h5")]
    assert main(args) == 0
    table = read_candidates(out / "scores.h5")
    return read_topk(out / "scores.h5").names(), dict(zip(table.names(), table.score))


def test_ablation_ranks_the_pair_first_among_act_mags_candidates(rankings, planted, tmp_path):
    model_dir, names = planted
    ranked, delta = _ablate(model_dir, [rankings["act_mag"][0]], tmp_path)
    assert set(ranked[:2]) == set(names)
    others = [d for n, d in delta.items() if n not in names]
    assert min(delta[n] for n in names) > 100 * max(others)  # act_mag's other picks barely matter


def test_ablation_finds_the_neurons_inputs_as_damaging_as_the_pair(rankings, planted, tmp_path):
    """The weights grad_squared ranks first are not false alarms: zeroing an input weight of a planted
    neuron changes its activation, the pair no longer cancels, and the loss rises about as much."""
    model_dir, names = planted
    ranked, delta = _ablate(model_dir, [rankings["grad_squared"][0], rankings["act_mag"][0]], tmp_path)
    pair = min(delta[n] for n in names)
    inputs = [delta[n] for n in rankings["grad_squared"][1]]
    assert ranked[0] in names  # the most damaging of all these candidates is a planted weight
    assert all(d > 0.1 * pair for d in inputs)  # every one of grad_squared's top 10 is truly damaging
    assert sum(d > pair for d in inputs) >= 1  # and some hurt more than one of the pair
    print("ablation ΔNLL: pair", [round(delta[n], 4) for n in names], "grad_squared top-10",
          [round(d, 4) for d in inputs])
