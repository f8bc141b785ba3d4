"""First-principles tests of obd (½·w²·|diag H|) and fisher_obd (½·w²·F_ii)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from esa.cli import main
from esa.profile.metrics import MetricOptions, get_metric
from fixtures.tiny import make_batches, tiny_model, window_loss

transformers.utils.logging.set_verbosity_error()

PARAM = "transformer.h.1.attn.c_proj.weight"  # [8, 8] in an 8-wide GPT-2: 64 coordinates


def exact_hessian(model: torch.nn.Module, name: str, batches: list[torch.Tensor]) -> torch.Tensor:
    """The Hessian block of the mean loss over `batches` w.r.t. one parameter, by torch.func.hessian."""
    p0 = model.get_parameter(name).detach().clone()

    def loss(w: torch.Tensor) -> torch.Tensor:
        total = 0
        for b in batches:
            logits = torch.func.functional_call(model, {name: w}, (b,)).logits[:, :-1]
            total = total + torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                              b[:, 1:].reshape(-1))
        return total / len(batches)

    return torch.func.hessian(loss)(p0).reshape(p0.numel(), p0.numel()).detach()


@pytest.fixture(scope="module")
def gpt2_fp64():
    model = tiny_model("gpt2", torch.float64, attn="eager", width=8)
    batches = make_batches(2)
    return model, batches, exact_hessian(model, PARAM, batches)


def test_obd_on_candidates_is_half_w_squared_times_the_exact_hessian_diagonal(gpt2_fp64):
    model, batches, H = gpt2_fp64
    w = model.get_parameter(PARAM).detach()
    diag = torch.diagonal(H).reshape(w.shape)
    expected = 0.5 * w ** 2 * diag.abs()
    cands = [f"{PARAM}:3,5", f"{PARAM}:7,0", f"{PARAM}:0,0"]
    res = get_metric("obd").score(model, batches, MetricOptions(candidates=cands))
    assert res.extras["partial"] == {PARAM: [0, 3 * 8 + 5, 7 * 8]}
    for c in res.extras["candidates"]:
        i, j = (int(v) for v in c["weight"].split(":")[1].split(","))
        assert c["obd"] == pytest.approx(float(expected[i, j]), rel=1e-10)
        assert res.scores[PARAM][i, j] == pytest.approx(float(expected[i, j]), rel=1e-6)  # stored in fp32
    assert float(expected.abs().max()) > 1e-6  # not vacuous


def test_obd_is_half_w_squared_times_the_hutchinson_estimate(gpt2_fp64):
    """Without candidates obd is ½·w²·|hutchinson_diag| with the same probes (seed); its error against
    ½·w²·|diag H| of torch.func.hessian is what the probes' variance predicts."""
    model, batches, _ = gpt2_fp64
    w = model.get_parameter(PARAM).detach()
    opts = dict(include=[PARAM], probes=4, seed=11)
    obd = get_metric("obd").score(model, batches, MetricOptions(**opts))
    hutch = get_metric("hutchinson_diag").score(model, batches, MetricOptions(**opts))
    torch.testing.assert_close(obd.scores[PARAM], (0.5 * w * w).float() * hutch.scores[PARAM], rtol=1e-6, atol=0)
    assert "spread" in obd.extras
    # One batch, n probes: each z ⊙ Hz has per-coordinate variance Σ_{j≠i} H_ij², so the weighted error
    # ||obd - exact||² has expectation Σ_i (½w_i²)² Σ_{j≠i} H_ij² / n (before the absolute value).
    H = exact_hessian(model, PARAM, batches[:1])
    weight = (0.5 * w * w).reshape(-1)
    exact = weight * torch.diagonal(H).abs()
    off = (H ** 2).sum(1) - torch.diagonal(H) ** 2
    for n in (16, 256):
        errors = []
        for seed in range(4):
            est = get_metric("obd").score(model, batches[:1], MetricOptions(include=[PARAM], probes=n, seed=seed))
            errors.append(float((est.scores[PARAM].double().reshape(-1) - exact).norm()))
        predicted = float((weight ** 2 * off).sum().sqrt()) / n ** 0.5
        seen = sum(errors) / len(errors)
        assert 0.4 * predicted < seen < 1.3 * predicted, (n, seen, predicted)


def test_obd_shards_reduce_to_the_unsharded_run():
    model = tiny_model("llama")
    batches = make_batches(4)
    m = get_metric("obd")
    full = m.score(model, batches, MetricOptions(probes=2, seed=3))
    a = m.score(model, batches[:2], MetricOptions(probes=2, seed=3, batch_offset=0))
    b = m.score(model, batches[2:], MetricOptions(probes=2, seed=3, batch_offset=2))
    acc = {k: {n: a.accumulators[k][n] + b.accumulators[k][n] for n in a.accumulators[k]} for k in a.accumulators}
    counts = {k: a.counts[k] + b.counts[k] if k != "probes" else a.counts[k] for k in a.counts}
    reduced = m.finalize(acc, counts, model)
    for n, s in full.scores.items():
        torch.testing.assert_close(reduced[n], s, rtol=1e-5, atol=1e-6 * float(s.max()))


def explicit_fisher(model: torch.nn.Module, samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """mean over samples of (∇ mean NLL of the sample)², by plain autograd, one sample at a time."""
    names, params = zip(*model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in zip(names, params)}
    for s in samples:
        for n, g in zip(names, torch.autograd.grad(window_loss(model, s), params)):
            out[n] += g * g
    return {n: v / len(samples) for n, v in out.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: lm_head tied to wte
def test_fisher_obd_batch_level_equals_the_explicit_loop(arch):
    model = tiny_model(arch, torch.float64)
    batches = make_batches(3, batch=2)
    res = get_metric("fisher_obd").score(model, batches, MetricOptions())
    fisher = explicit_fisher(model, batches)
    assert res.counts["samples"] == 3 and res.counts["batches"] == 3 and res.counts["per_sample"] == 0
    for name, p in model.named_parameters():
        expected = (0.5 * p.detach() ** 2 * fisher[name]).float()
        torch.testing.assert_close(res.scores[name], expected, rtol=1e-6, atol=1e-12 * float(expected.max()))


def test_fisher_obd_per_sample_uses_each_windows_gradient():
    model = tiny_model("llama", torch.float64)
    batches = make_batches(2, batch=3)
    windows = [w for b in batches for w in b.split(1)]
    per = get_metric("fisher_obd").score(model, batches, MetricOptions(per_sample=True))
    batch = get_metric("fisher_obd").score(model, batches, MetricOptions())
    fisher = explicit_fisher(model, windows)
    assert per.counts == {"batches": 2, "tokens": 42, "samples": 6, "per_sample": 1}
    # Per-window gradients by torch.func (vmap over the windows) agree with the loop as well.
    name = "model.layers.1.mlp.down_proj.weight"
    p0 = {name: model.get_parameter(name).detach()}

    def loss(params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, params, (ids[None],)).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[None, 1:].reshape(-1))

    ids = torch.cat(windows)
    g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(p0, ids)[name]
    torch.testing.assert_close((g * g).mean(0), fisher[name], rtol=1e-10, atol=1e-16)
    for n, p in model.named_parameters():
        expected = (0.5 * p.detach() ** 2 * fisher[n]).float()
        torch.testing.assert_close(per.scores[n], expected, rtol=1e-6, atol=1e-12 * float(expected.max()))
    # Windows of one batch have different gradients: the per-window Fisher is not the batch one.
    assert not torch.allclose(per.scores[name], batch.scores[name], rtol=1e-3)


def test_fisher_obd_resumes_and_reduces_with_its_setting_kept(tmp_path):
    model = tiny_model("gpt_neox")
    batches = make_batches(4, batch=2)
    m = get_metric("fisher_obd")
    full = m.score(model, batches, MetricOptions(per_sample=True))
    first = m.score(model, batches[:1], MetricOptions(per_sample=True, finalize=False))
    rest = m.score(model, batches[1:], MetricOptions(per_sample=True, initial_accumulators=first.accumulators,
                                                     initial_counts=first.counts))
    assert rest.counts == full.counts  # the per_sample setting is not summed like a count
    for n, s in full.scores.items():
        torch.testing.assert_close(rest.scores[n], s, rtol=1e-5, atol=1e-7 * float(s.max()))


def test_cli_writes_the_new_metric_fields(tiny_llama, tmp_path):
    common = ["--mode", "global", "--topk", "5", "--device", "cpu", "--seq-len", "32", "--max-samples", "4",
              "--batch-size", "2", "--quiet"]
    args = ["profile", "--model", str(tiny_llama), "--metric", "fisher_obd", "--per-sample", *common,
            "--out-dir", str(tmp_path / "f")]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "f" / "experiment_manifest.json").read_text())["manifest"]
    assert manifest["metric"]["per_sample"] is True
    profile = json.loads((tmp_path / "f" / "profile.json").read_text())
    assert profile["metric"] == "fisher_obd" and profile["n_ranked"] == 5
    # A metric section at its defaults does not write the fields added later (ids stay the same).
    assert main(["profile", "--model", str(tiny_llama), "--metric", "obd", *common,
                 "--out-dir", str(tmp_path / "o")]) == 0
    manifest = json.loads((tmp_path / "o" / "experiment_manifest.json").read_text())["manifest"]
    assert not {"per_sample", "candidates_from", "n_candidates", "perturbation"} & set(manifest["metric"])


@pytest.mark.parametrize("metric, instead", [("obd", "split the calibration windows"),
                                             ("fisher_obd", "split the calibration windows"),
                                             ("ablation", "split the candidates")])
def test_a_sharded_job_refuses_them_with_one_line(metric, instead, monkeypatch):
    from esa.core.errors import UserError
    from esa.profile import phase

    monkeypatch.setattr(phase, "world_size", lambda: 2)
    with pytest.raises(UserError) as err:
        phase._refuse_if_unshardable(get_metric(metric))
    text = str(err.value)
    assert text.startswith(metric + " ") and "\n" not in text and instead in text
    assert "parallel = {nodes = 1, gpus_per_node = 1}" in text
