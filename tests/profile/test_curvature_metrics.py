"""First-principles tests of hessian_diag (exact) and hutchinson_diag (stochastic)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
)

from esa.cli import main
from esa.core.errors import UserError
from esa.profile.metrics import MetricOptions, get_metric
from esa.profile.metrics.loss import next_token_nll

transformers.utils.logging.set_verbosity_error()

VOCAB = 64
ARCHS = ["llama", "mistral", "phi3", "mixtral", "gpt_neox", "gpt2"]
# GPT-2 runs entirely in the model dtype (Llama's RMSNorm computes in fp32 even in an fp64
# model, which would blur fp64 comparisons); an 8-wide GPT-2 keeps torch.func.hessian fast.
PARAM = "transformer.h.1.attn.c_proj.weight"  # [8, 8] = 64 coordinates


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0,
               attn: str = "sdpa", width: int = 16) -> torch.nn.Module:
    """A 2-layer model of `arch`, `width` wide, with random weights (initializer 0.1)."""
    common = dict(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                  num_attention_heads=2, initializer_range=0.1, attn_implementation=attn)
    cfg = {
        "llama": lambda: LlamaConfig(num_key_value_heads=1, **common),
        "mistral": lambda: MistralConfig(num_key_value_heads=1, **common),
        "phi3": lambda: Phi3Config(num_key_value_heads=1, pad_token_id=0, **common),
        "mixtral": lambda: MixtralConfig(num_key_value_heads=1, num_local_experts=4,
                                         num_experts_per_tok=2, **common),
        "gpt_neox": lambda: GPTNeoXConfig(**common),
        "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=2, n_head=2, n_positions=32,
                                   bos_token_id=0, eos_token_id=0, initializer_range=0.1,
                                   attn_implementation=attn),
    }[arch]()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def make_batches(n: int = 2, batch: int = 2, seq: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def func_hessian(model: torch.nn.Module, name: str, batches: list[torch.Tensor]) -> torch.Tensor:
    """Full Hessian block of the mean loss w.r.t. one parameter, by torch.func.hessian."""
    p0 = model.get_parameter(name).detach().clone()

    def loss(w: torch.Tensor) -> torch.Tensor:
        total = 0
        for b in batches:
            logits = torch.func.functional_call(model, {name: w}, (b,)).logits[:, :-1]
            total = total + torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), b[:, 1:].reshape(-1))
        return total / len(batches)

    return torch.func.hessian(loss)(p0).reshape(p0.numel(), p0.numel()).detach()


@pytest.fixture(scope="module")
def gpt2_fp64():
    model = tiny_model("gpt2", torch.float64, attn="eager", width=8)
    batches = make_batches()
    per_batch = [func_hessian(model, PARAM, [b]) for b in batches]
    return model, batches, per_batch


def test_hessian_diag_equals_torch_func_hessian(gpt2_fp64):
    model, batches, per_batch = gpt2_fp64
    H = sum(per_batch) / 2  # Hessian of the mean loss over both batches (linearity)
    res = get_metric("hessian_diag").score(model, batches, MetricOptions(include=[PARAM]))
    assert list(res.scores) == [PARAM]
    diag = torch.diagonal(H).reshape(8, 8)
    torch.testing.assert_close(res.accumulators["h_diag_sum"][PARAM] / 2, diag, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(res.scores[PARAM], diag.abs().float(), rtol=1e-6, atol=0)
    assert float(diag.abs().max()) > 1e-3  # the test is not vacuous


def test_hessian_diag_candidates_and_size_limit(gpt2_fp64):
    model, batches, per_batch = gpt2_fp64
    H = sum(per_batch) / 2
    diag = torch.diagonal(H).reshape(8, 8)
    res = get_metric("hessian_diag").score(model, batches, MetricOptions(
        candidates=[f"{PARAM}:3,5", f"{PARAM}:7,0"]))
    assert res.extras["partial"] == {PARAM: [3 * 8 + 5, 7 * 8]}
    by_name = {c["weight"]: c["hessian_diag"] for c in res.extras["candidates"]}
    assert by_name[f"{PARAM}:3,5"] == pytest.approx(float(diag[3, 5]), rel=1e-10)
    assert by_name[f"{PARAM}:7,0"] == pytest.approx(float(diag[7, 0]), rel=1e-10)
    with pytest.raises(UserError, match="hutchinson_diag"):
        get_metric("hessian_diag").score(model, batches, MetricOptions(include=["mlp"], max_exact_coords=500))
    with pytest.raises(UserError, match="limit 50"):
        get_metric("hessian_diag").score(model, batches, MetricOptions(include=[PARAM], max_exact_coords=50))
    with pytest.raises(UserError, match="no parameter"):
        get_metric("hessian_diag").score(model, batches, MetricOptions(candidates=["nope.weight:0,0"]))
    with pytest.raises(UserError, match="out of range"):
        get_metric("hessian_diag").score(model, batches, MetricOptions(candidates=[f"{PARAM}:8,0"]))


def _hutchinson_estimate(model, batches, probes: int, seed: int) -> torch.Tensor:
    res = get_metric("hutchinson_diag").score(model, batches, MetricOptions(
        include=[PARAM], probes=probes, generator=torch.Generator().manual_seed(seed)))
    return res.accumulators["hz_sum"][PARAM] / res.counts["samples"]


def test_hutchinson_error_shrinks_as_one_over_sqrt_probes(gpt2_fp64):
    model, batches, per_batch = gpt2_fp64
    batches, H = batches[:1], per_batch[0]  # one batch: the error is the probes' alone
    diag = torch.diagonal(H).reshape(8, 8)
    probes = [2, 8, 32, 128]
    errors = []
    for n in probes:
        errs = [float((_hutchinson_estimate(model, batches, n, s) - diag).norm() / diag.norm())
                for s in range(3)]
        errors.append(sum(errs) / len(errs))
    slope = np.polyfit(np.log(probes), np.log(errors), 1)[0]
    print(f"hutchinson relative error by probes {dict(zip(probes, errors))}, log-log slope {slope:.3f}")
    assert -0.75 <= slope <= -0.3
    assert errors[-1] < errors[0] / 4  # 64x the probes: 8x smaller error in theory
    # Theory: a sample z ⊙ H z has per-weight variance Σ_{j≠i} H_ij², so with n probes
    # E||est - diag||² = (||H||² - ||diag H||²) / n.
    off = float((H ** 2).sum() - (torch.diagonal(H) ** 2).sum())
    predicted = [math.sqrt(off / n) / float(diag.norm()) for n in probes]
    print(f"predicted {dict(zip(probes, predicted))}")
    for seen, expect in zip(errors, predicted):
        assert 0.5 * expect < seen < 1.5 * expect


def test_hutchinson_seeds_reproducible_and_distinct(gpt2_fp64):
    model, batches, _ = gpt2_fp64
    a = _hutchinson_estimate(model, batches, 4, seed=7)
    b = _hutchinson_estimate(model, batches, 4, seed=7)
    c = _hutchinson_estimate(model, batches, 4, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_hutchinson_shards_sum_to_the_unsharded_run():
    """Probes are a function of (seed, global batch index): shards given their batch offset draw
    what the unsharded run draws, so their summed accumulators reproduce it."""
    model = tiny_model("gpt_neox")
    batches = make_batches(4)
    m = get_metric("hutchinson_diag")
    full = m.score(model, batches, MetricOptions(probes=2, seed=3))
    a = m.score(model, batches[:2], MetricOptions(probes=2, seed=3, batch_offset=0))
    b = m.score(model, batches[2:], MetricOptions(probes=2, seed=3, batch_offset=2))
    acc = {k: {n: a.accumulators[k][n] + b.accumulators[k][n] for n in a.accumulators[k]}
           for k in a.accumulators}
    counts = {k: a.counts[k] + b.counts[k] if k != "probes" else a.counts[k] for k in a.counts}
    assert counts == full.counts == {"batches": 4, "tokens": 56, "probes": 2, "samples": 8}
    reduced = m.finalize(acc, counts, model)
    for n, s in full.scores.items():  # fp32 sums in a different order: scale-relative tolerance
        torch.testing.assert_close(reduced[n], s, rtol=1e-5, atol=1e-6 * float(s.max()))
    # A shard that forgets its offset draws batch 0's probes again: a different estimate.
    wrong = m.score(model, batches[2:], MetricOptions(probes=2, seed=3, batch_offset=0))
    assert any(not torch.equal(wrong.accumulators["hz_sum"][n], b.accumulators["hz_sum"][n])
               for n in b.accumulators["hz_sum"])


def test_hutchinson_reports_spread_and_keeps_no_grads():
    model = tiny_model("llama")
    res = get_metric("hutchinson_diag").score(model, make_batches(2), MetricOptions(
        probes=3, generator=torch.Generator().manual_seed(0), keep_accumulators=False))
    spread = res.extras["spread"]
    assert spread["samples"] == 6 and res.accumulators == {}
    row = spread["per_tensor"]["model.layers.0.mlp.down_proj.weight"]
    assert row["stderr_mean"] == pytest.approx(row["sample_std_mean"] / math.sqrt(6))
    assert row["rel_stderr"] > 0 and math.isfinite(row["rel_stderr"])
    assert all(p.grad is None for p in model.parameters())
    # The metric switched to eager attention for double backward and switched back.
    assert model.config._attn_implementation == "sdpa"
    one = get_metric("hutchinson_diag").score(model, make_batches(1), MetricOptions(
        generator=torch.Generator().manual_seed(0)))
    assert "note" in one.extras["spread"]
    with pytest.raises(UserError, match="at least one probe"):
        get_metric("hutchinson_diag").score(model, make_batches(1), MetricOptions(probes=0))


@pytest.mark.parametrize("arch", ARCHS)
def test_hutchinson_runs_on_every_architecture(arch):
    model = tiny_model(arch)  # loaded with sdpa, as from_pretrained would by default
    res = get_metric("hutchinson_diag").score(model, make_batches(1), MetricOptions(
        generator=torch.Generator().manual_seed(0)))
    params = dict(model.named_parameters())
    assert set(res.scores) == set(params)
    for n, p in params.items():
        assert res.scores[n].shape == p.shape and res.scores[n].dtype == torch.float32
        assert res.scores[n].isfinite().all()
    assert sum(bool(s.any()) for s in res.scores.values()) > len(params) // 2
    assert model.config._attn_implementation == "sdpa"


def test_mixtral_grouped_mm_double_backward_matches_eager_experts():
    """transformers' default fused experts (grouped_mm) support double backward in torch
    2.13: the Hutchinson estimate equals the one through the per-expert eager loop."""
    model = tiny_model("mixtral")
    assert model.config._experts_implementation == "grouped_mm"
    batches = make_batches(1)
    def opts() -> MetricOptions:
        return MetricOptions(include=["experts"], probes=2, generator=torch.Generator().manual_seed(5))

    fused = get_metric("hutchinson_diag").score(model, batches, opts())
    model.set_experts_implementation("eager")
    loop = get_metric("hutchinson_diag").score(model, batches, opts())
    for n in fused.scores:
        assert "experts" in n
        torch.testing.assert_close(fused.scores[n], loop.scores[n], rtol=1e-4, atol=1e-7)


def test_mixtral_fp64_switches_to_eager_experts_and_back():
    """grouped_mm has no fp64 kernel: second-order metrics on fp64 Mixtral use eager experts."""
    model = tiny_model("mixtral", torch.float64)
    res = get_metric("hessian_diag").score(model, make_batches(1), MetricOptions(
        include=["model.layers.1.mlp.gate.weight"]))
    assert res.scores["model.layers.1.mlp.gate.weight"].shape == (4, 16)
    assert model.config._experts_implementation == "grouped_mm"
    assert model.config._attn_implementation == "sdpa"


def test_loss_helper_is_mean_next_token_nll():
    model = tiny_model("gpt2", torch.float64)
    b = make_batches(1)[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(b).logits, -1)
        expected = -sum(float(logp[i, t, b[i, t + 1]]) for i in range(2) for t in range(7)) / 14
        assert float(next_token_nll(model, b)) == pytest.approx(expected, rel=1e-12)


CLI_SMALL = ["--device", "cpu", "--seq-len", "32", "--max-samples", "8", "--quiet"]


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_hessian_candidates_rank_only_computed_coordinates(tiny_llama, tmp_path, mode):
    wanted = {"model.norm.weight:3", "model.layers.0.mlp.down_proj.weight:1,2"}
    args = ["profile", "--model", str(tiny_llama), "--metric", "hessian_diag", "--mode", mode, "--topk", "3",
            "--export-topk-csv", "--out-dir", str(tmp_path), *CLI_SMALL]
    for w in wanted:
        args += ["--candidates", w]
    assert main(args) == 0
    rows = (tmp_path / "top_weights.csv").read_text().splitlines()[1:]
    got = {f"{r.split(',')[1]}:{r.split(chr(34))[1] if chr(34) in r else r.split(',')[3]}" for r in rows}
    assert got == wanted
    extras = json.loads((tmp_path / "profile.json").read_text())["metric_extras"]
    assert {c["weight"] for c in extras["candidates"]} == wanted
