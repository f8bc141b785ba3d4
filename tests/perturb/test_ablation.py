"""The ablation ground truth against first principles: an independent evaluation of a model copy with
the weight changed, bit-exact restores, candidate shards that merge into the unsharded run."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import transformers

from esa.cli import main
from esa.core.errors import UserError
from esa.profile.candidates import read_candidates, resolve_candidates
from esa.profile.metrics import MetricOptions, get_metric
from esa.results.scorefile import open_score_file, read_candidates as read_candidate_scores
from esa.spec.manifest import MetricSpec, PerturbationSpec
from fixtures.tiny import make_batches, tiny_model

transformers.utils.logging.set_verbosity_error()


def mean_nll(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-token NLL over every predicted token of the batches, in the model's dtype, plain torch."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b).logits[:, :-1]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             b[:, 1:].reshape(-1), reduction="sum"))
            n += b[:, 1:].numel()
    return total / n


def one_weight_per_parameter(model: torch.nn.Module, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, p in model.named_parameters():
        index = [int(torch.randint(0, d, (1,), generator=g)) for d in p.shape]
        out.append(f"{name}:{','.join(map(str, index))}")
    return out


def set_weight(model: torch.nn.Module, name: str, value: float) -> torch.nn.Module:
    """A deep copy of `model` with weight `name` ('param:i,j') set to `value`."""
    other = copy.deepcopy(model)
    param, _, idx = name.rpartition(":")
    with torch.no_grad():
        other.get_parameter(param)[tuple(int(i) for i in idx.split(","))] = value
    return other


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi3", "mixtral"])
def test_delta_nll_equals_an_independent_evaluation_of_a_zeroed_copy(arch):
    model = tiny_model(arch, torch.float64, layers=3)
    if arch == "mixtral":
        model.set_experts_implementation("eager")  # grouped_mm has no fp64 kernel
    batches = make_batches(3, batch=2, seq=10)
    cands = one_weight_per_parameter(model)
    res = get_metric("ablation").score(model, batches, MetricOptions(candidates=cands, seed=0))
    table = res.candidates
    assert table.names() == cands and res.scores == {}
    base = mean_nll(model, batches)
    assert table.attrs["baseline_nll"] == pytest.approx(base, rel=1e-12)
    for i, name in enumerate(table.names()):
        truth = mean_nll(set_weight(model, name, 0.0), batches) - base
        assert table.score[i] == pytest.approx(truth, rel=1e-6, abs=1e-14), name
        assert table.columns["delta_nll"][i] == table.score[i]
        assert table.columns["delta_ppl"][i] == pytest.approx(math.exp(base + truth) - math.exp(base), rel=1e-6,
                                                              abs=1e-14)
        assert table.columns["new_value"][i] == 0.0
    # Not vacuous: most nonzero weights change the loss (GPT-2's biases start at zero), and most candidates
    # skipped some blocks.
    assert (np.abs(table.score[table.value != 0]) > 1e-9).mean() > 0.5
    skipped = table.columns["blocks_skipped"]
    assert (skipped > 0).mean() > 0.5 and skipped.max() == 3  # the final norm / head skip all three blocks
    assert max(res.extras["fast_path_check"].values()) < 1e-12  # the shortcut equals a full forward


def test_the_model_is_restored_bit_exactly():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cands = one_weight_per_parameter(model, seed=1)
    get_metric("ablation").score(model, make_batches(2), MetricOptions(
        candidates=cands, perturbation=PerturbationSpec("bit_flip", {"bit_index": 30})))
    for k, v in model.state_dict().items():
        assert torch.equal(before[k].view(torch.int32), v.view(torch.int32)), k
    assert all("forward" not in b.__dict__ for b in model.model.layers)  # the stand-in forwards are gone


@pytest.mark.parametrize("spec", [PerturbationSpec("sign_flip"), PerturbationSpec("scale", {"scale": 3.0}),
                                  PerturbationSpec("gauss_noise", {"sigma": 0.5})])
def test_any_registered_perturbation(spec):
    model = tiny_model("gpt2", torch.float64, layers=3)
    batches = make_batches(2, batch=2, seq=10)
    cands = one_weight_per_parameter(model, seed=2)[:10]
    res = get_metric("ablation").score(model, batches, MetricOptions(candidates=cands, perturbation=spec, seed=4))
    table = res.candidates
    base = mean_nll(model, batches)
    params = dict(model.named_parameters())
    for i, name in enumerate(table.names()):
        new = float(table.columns["new_value"][i])
        param, _, idx = name.rpartition(":")
        old = float(params[param].detach()[tuple(int(v) for v in idx.split(","))])
        assert table.value[i] == old
        if spec.name == "sign_flip":
            assert new == -old
        elif spec.name == "scale":
            assert new == pytest.approx(3.0 * old, rel=1e-15)
        assert table.score[i] == pytest.approx(mean_nll(set_weight(model, name, new), batches) - base,
                                               rel=1e-6, abs=1e-14)
    # Random draws are tied to the candidate's place in the whole list, not to the order of evaluation.
    again = get_metric("ablation").score(model, batches, MetricOptions(
        candidates=cands, perturbation=spec, seed=4, candidate_shard=(1, 2)))
    half = again.candidates
    assert np.array_equal(half.columns["new_value"], table.columns["new_value"][half.order])


def test_a_destroyed_model_scores_plus_infinity():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[3, 2] = 1.5  # flipping bit 30 of 1 <= |w| < 2 gives Inf/NaN
    res = get_metric("ablation").score(model, make_batches(1), MetricOptions(
        candidates=["lm_head.weight:3,2", "lm_head.weight:0,0"],
        perturbation=PerturbationSpec("bit_flip", {"bit_index": 30})))
    table = res.candidates
    assert table.score[0] == math.inf and table.columns["non_finite"][0] == 1.0
    assert math.isfinite(table.score[1]) and table.columns["non_finite"][1] == 0.0
    assert float(model.lm_head.weight[3, 2]) == 1.5


def test_ablation_needs_candidates():
    with pytest.raises(UserError, match="--candidates-from"):
        get_metric("ablation").score(tiny_model("llama"), make_batches(1), MetricOptions())


# ----------------------------------------------------------------------------- candidate sources
def test_candidates_come_from_scores_super_weights_and_csv(tmp_path, tiny_llama):
    common = ["--device", "cpu", "--seq-len", "32", "--max-samples", "4", "--quiet"]
    assert main(["profile", "--model", str(tiny_llama), "--metric", "magnitude", "--mode", "per_layer", "--topk", "3",
                 "--out-dir", str(tmp_path / "m"), *common]) == 0
    with open_score_file(tmp_path / "m" / "scores.h5") as sf:
        ranking = sf.topk()
    by_score = [ranking.names()[i] for i in np.argsort(-ranking.score, kind="stable")]
    assert read_candidates(tmp_path / "m" / "scores.h5", 5) == by_score[:5]  # tensors interleaved by score
    assert read_candidates(tmp_path / "m", None) == by_score  # a job folder: its scores.h5
    rows = [{"rank": 1, "weight": "a.weight:1,2"}, {"rank": 0, "param": "b.weight", "index": [3, 4]}]
    (tmp_path / "super_weights.json").write_text(json.dumps(rows))
    assert read_candidates(tmp_path / "super_weights.json", None) == ["b.weight:3,4", "a.weight:1,2"]
    assert read_candidates(tmp_path / "m" / "top_weights.csv", 2) == ranking.names()[:2]  # file order
    spec = MetricSpec("ablation", candidates=("b.weight:3,4", "c.weight:0"),
                      candidates_from=(str(tmp_path / "super_weights.json"), str(tmp_path / "super_weights.json")),
                      n_candidates=1)
    assert resolve_candidates(spec) == ["b.weight:3,4", "c.weight:0"]  # a union without repeats
    with pytest.raises(UserError, match="--candidates-from"):
        resolve_candidates(MetricSpec("ablation", n_candidates=3))
    with pytest.raises(UserError, match="does not exist"):
        read_candidates(tmp_path / "nope.h5")


def test_candidate_shards_merge_into_the_unsharded_run(tmp_path, tiny_llama, capsys):
    """--shard i/n splits the candidates; esa reduce concatenates the shards' rows: equal to one run."""
    common = ["--device", "cpu", "--dtype", "fp32", "--seq-len", "32", "--max-samples", "6", "--batch-size", "2",
              "--quiet"]
    assert main(["profile", "--model", str(tiny_llama), "--metric", "magnitude", "--mode", "global", "--topk", "20",
                 "--out-dir", str(tmp_path / "m"), *common]) == 0
    ablation = ["profile", "--model", str(tiny_llama), "--metric", "ablation", "--candidates-from",
                str(tmp_path / "m" / "scores.h5"), "--candidates", "10", "--candidates", "model.norm.weight:0",
                "--ablate", "gauss_noise", "--ablate-param", "sigma=2", "--mode", "global", "--topk", "5", *common]
    assert main([*ablation, "--out-dir", str(tmp_path / "whole")]) == 0
    shards = [tmp_path / f"s{i}" for i in range(3)]
    for i, folder in enumerate(shards):
        assert main([*ablation, "--shard", f"{i}/3", "--out-dir", str(folder)]) == 0
    assert main(["reduce", *map(str, shards), "--out-dir", str(tmp_path / "merged"), "--quiet"]) == 0
    whole = read_candidate_scores(tmp_path / "whole" / "scores.h5")
    merged = read_candidate_scores(tmp_path / "merged" / "scores.h5")
    assert len(whole) == 11 and whole.names()[0] == "model.norm.weight:0"
    assert merged.names() == whole.names()
    assert np.array_equal(merged.order, whole.order) and np.array_equal(merged.score, whole.score)
    for name, col in whole.columns.items():
        assert np.array_equal(merged.columns[name], col, equal_nan=True), name
    assert (tmp_path / "merged" / "ablation.csv").read_text() == (tmp_path / "whole" / "ablation.csv").read_text()
    with open_score_file(tmp_path / "merged" / "scores.h5") as a, open_score_file(tmp_path / "whole" / "scores.h5") as b:
        assert a.topk().names() == b.topk().names() and np.array_equal(a.topk().score, b.topk().score)
        assert a.attrs()["manifest_id"] == b.attrs()["manifest_id"]  # the reduced file is the unsharded job's
        assert a.attrs()["save"] == "candidates" and "scores" not in a.h5
    manifest = json.loads((tmp_path / "whole" / "experiment_manifest.json").read_text())["manifest"]
    assert manifest["metric"]["perturbation"] == {"name": "gauss_noise", "params": {"sigma": 2.0, "mode": "relative"}}
    assert manifest["metric"]["n_candidates"] == 10
    # A shard given twice, or shards of another job, are refused.
    capsys.readouterr()
    assert main(["reduce", str(shards[0]), str(shards[0]), "--out-dir", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "given twice" in capsys.readouterr().err
    header = (tmp_path / "whole" / "ablation.csv").read_text().splitlines()[0].split(",")
    assert header[:8] == ["rank", "candidate", "param", "layer", "index", "flat_index", "value", "score"]
    assert {"delta_nll", "delta_ppl", "window_delta_nll_std", "windows_worse"} <= set(header)
