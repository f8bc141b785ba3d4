"""First-principles tests of magnitude, grad_x_weight and grad_squared (and the loss helper)."""

from __future__ import annotations

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

from esa.core.errors import NonFiniteLossError, UserError
from esa.profile.metrics import MetricOptions, get_metric
from esa.profile.metrics.loss import next_token_nll

transformers.utils.logging.set_verbosity_error()

VOCAB = 64
ARCHS = ["llama", "mistral", "phi3", "mixtral", "gpt_neox", "gpt2"]


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0,
               attn: str = "sdpa") -> torch.nn.Module:
    """A 2-layer, 16-wide model of `arch` with random weights (initializer 0.1, so the
    loss surface has some structure)."""
    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, initializer_range=0.1, attn_implementation=attn)
    cfg = {
        "llama": lambda: LlamaConfig(num_key_value_heads=1, **common),
        "mistral": lambda: MistralConfig(num_key_value_heads=1, **common),
        "phi3": lambda: Phi3Config(num_key_value_heads=1, pad_token_id=0, **common),
        "mixtral": lambda: MixtralConfig(num_key_value_heads=1, num_local_experts=4,
                                         num_experts_per_tok=2, **common),
        "gpt_neox": lambda: GPTNeoXConfig(**common),
        "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                   bos_token_id=0, eos_token_id=0, initializer_range=0.1,
                                   attn_implementation=attn),
    }[arch]()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def make_batches(n: int = 3, batch: int = 2, seq: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def explicit_grads(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per-batch gradients by plain torch.autograd.grad (no hooks, nothing folded)."""
    names, params = zip(*model.named_parameters())
    out = []
    for b in batches:
        logits = model(input_ids=b).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), b[:, 1:].reshape(-1))
        out.append(dict(zip(names, torch.autograd.grad(loss, params))))
    return out


def mean_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(next_token_nll(model, b)) for b in batches) / len(batches)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: lm_head tied to wte
def test_grad_x_weight_equals_explicit_autograd_loop(arch):
    model = tiny_model(arch, torch.float64)
    batches = make_batches()
    res = get_metric("grad_x_weight").score(model, batches, MetricOptions())
    grads = explicit_grads(model, batches)
    assert set(res.scores) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        mean_g = sum(g[name] for g in grads) / len(batches)
        # fp64 model -> fp64 sums: equal to the explicit loop up to summation order.
        torch.testing.assert_close(res.accumulators["grad_sum"][name] / 3, mean_g, rtol=1e-12, atol=1e-15)
        expected = (p.detach() * mean_g).abs()
        assert res.scores[name].dtype == torch.float32
        torch.testing.assert_close(res.scores[name], expected.float(), rtol=1e-6, atol=0)
    assert res.counts == {"batches": 3, "tokens": 3 * 2 * 7}


def test_grad_x_weight_agrees_with_central_finite_differences():
    # GPT-2 runs fully in fp64 once cast; Llama's RMSNorm upcasts to fp32 internally,
    # which would limit a finite difference to ~1e-7 of the loss.
    model = tiny_model("gpt2", torch.float64)
    batches = make_batches()
    res = get_metric("grad_x_weight").score(model, batches, MetricOptions())
    mean_grad = {n: s / 3 for n, s in res.accumulators["grad_sum"].items()}
    coords = [("transformer.wte.weight", (5, 3)),  # tied: input embedding and lm_head
              ("transformer.h.0.attn.c_attn.weight", (2, 7)),
              ("transformer.h.1.mlp.c_proj.weight", (30, 9)), ("transformer.ln_f.weight", (4,)),
              ("transformer.h.0.mlp.c_fc.bias", (17,))]
    h = 1e-4
    for name, idx in coords:
        p = model.get_parameter(name)
        w = float(p.detach()[idx])
        with torch.no_grad():
            p[idx] = w + h
            up = mean_loss(model, batches)
            p[idx] = w - h
            down = mean_loss(model, batches)
            p[idx] = w
        fd = (up - down) / (2 * h)
        assert float(mean_grad[name][idx]) == pytest.approx(fd, rel=1e-6, abs=1e-10), name
        assert float(res.scores[name][idx]) == pytest.approx(abs(w * fd), rel=1e-5, abs=1e-10)


def test_grad_squared_equals_explicit_per_batch_loop():
    model = tiny_model("gpt_neox", torch.float64)
    batches = make_batches(4)
    res = get_metric("grad_squared").score(model, batches, MetricOptions())
    grads = explicit_grads(model, batches)
    for name, _ in model.named_parameters():
        expected = sum(g[name] ** 2 for g in grads) / len(batches)
        torch.testing.assert_close(res.accumulators["grad_sq_sum"][name] / 4, expected,
                                   rtol=1e-12, atol=1e-20)
        torch.testing.assert_close(res.scores[name], expected.float(), rtol=1e-6, atol=0)


def test_magnitude_is_abs_weight_and_respects_filters():
    model = tiny_model("llama")
    res = get_metric("magnitude").score(model, [], MetricOptions(include=["mlp"], exclude=["down_proj"]))
    assert res.scores and all("mlp" in n and "down_proj" not in n for n in res.scores)
    for name, s in res.scores.items():
        assert torch.equal(s, model.get_parameter(name).detach().abs())
    assert get_metric("magnitude").needs_data is False
    with pytest.raises(UserError, match="no parameter matches"):
        get_metric("magnitude").score(model, [], MetricOptions(include=["nothing_like_this"]))


def test_gradient_is_folded_during_backward_and_never_kept(monkeypatch):
    """At every fold exactly one parameter holds a .grad (the one being folded), the fold
    runs inside backward, and afterwards no grad, no hook and no requires_grad change remain."""
    model = tiny_model("gpt2")
    params = dict(model.named_parameters())
    state = {"in_backward": False, "folds": 0, "folds_in_backward": 0, "max_live_grads": 0}
    original_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        state["in_backward"] = True
        try:
            return original_backward(self, *args, **kwargs)
        finally:
            state["in_backward"] = False

    def spy(p):
        state["folds"] += 1
        state["folds_in_backward"] += state["in_backward"]
        live = sum(q.grad is not None for q in params.values())
        state["max_live_grads"] = max(state["max_live_grads"], live)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    # A spy hook registered first runs before the metric's own hook on the same parameter.
    spies = [p.register_post_accumulate_grad_hook(spy) for p in params.values()]
    res = get_metric("grad_x_weight").score(model, make_batches(2), MetricOptions())
    for h in spies:
        h.remove()
    assert state["folds"] == 2 * len(params)
    assert state["folds_in_backward"] == state["folds"]
    assert state["max_live_grads"] == 1
    for p in params.values():
        assert p.grad is None and p.requires_grad
        assert not p._post_accumulate_grad_hooks
    assert all(s.isfinite().all() for s in res.scores.values())


def test_hooks_removed_and_state_restored_when_a_batch_fails():
    model = tiny_model("llama").train()
    frozen = model.get_parameter("model.norm.weight")
    frozen.requires_grad_(False)

    def batches():
        yield make_batches(1)[0]
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        get_metric("grad_squared").score(model, batches(), MetricOptions())
    assert model.training and not frozen.requires_grad
    for p in model.parameters():
        assert p.grad is None and not p._post_accumulate_grad_hooks


def test_nan_loss_raises_non_finite_loss_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_parameter("model.layers.0.mlp.down_proj.weight")[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="batch 0"):
        get_metric("grad_x_weight").score(model, make_batches(), MetricOptions())
    for p in model.parameters():
        assert p.grad is None and not p._post_accumulate_grad_hooks
    with pytest.raises(NonFiniteLossError):
        get_metric("hutchinson_diag").score(model, make_batches(), MetricOptions(
            generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("metric,acc_name", [("grad_x_weight", "grad_sum"), ("grad_squared", "grad_sq_sum")])
def test_shard_accumulators_sum_to_the_unsharded_run(metric, acc_name):
    model = tiny_model("mistral")
    batches = make_batches(4)
    m = get_metric(metric)
    full = m.score(model, batches, MetricOptions())
    a = m.score(model, batches[:2], MetricOptions())
    b = m.score(model, batches[2:], MetricOptions())
    summed = {acc_name: {n: a.accumulators[acc_name][n] + b.accumulators[acc_name][n]
                         for n in a.accumulators[acc_name]}}
    counts = {k: a.counts[k] + b.counts[k] for k in a.counts}
    assert counts == full.counts
    reduced = m.finalize(summed, counts, model)
    for n, s in full.scores.items():  # fp32 sums in a different order: scale-relative tolerance
        torch.testing.assert_close(reduced[n], s, rtol=1e-5, atol=1e-6 * float(s.max()))


def test_keep_accumulators_false_gives_the_same_scores_without_sums():
    model = tiny_model("llama")
    batches = make_batches(2)
    for metric in ("grad_x_weight", "grad_squared"):
        kept = get_metric(metric).score(model, batches, MetricOptions())
        lean = get_metric(metric).score(model, batches, MetricOptions(keep_accumulators=False))
        assert lean.accumulators == {}
        for n in kept.scores:
            torch.testing.assert_close(lean.scores[n], kept.scores[n], rtol=0, atol=0)


def test_bf16_model_keeps_fp32_sums_and_scores():
    model = tiny_model("llama", torch.bfloat16)
    res = get_metric("grad_squared").score(model, make_batches(2), MetricOptions())
    assert all(s.dtype == torch.float32 for s in res.accumulators["grad_sq_sum"].values())
    res = get_metric("grad_x_weight").score(model, make_batches(2), MetricOptions())
    assert all(s.dtype == torch.float32 and s.isfinite().all() for s in res.scores.values())


def test_dropout_is_off_while_scoring_and_train_mode_is_restored():
    """GPT-2 has dropout 0.1: scores must be the eval-mode (deterministic) gradients."""
    model = tiny_model("gpt2", torch.float64).train()
    batches = make_batches(2)
    res = get_metric("grad_x_weight").score(model, batches, MetricOptions())
    assert model.training
    grads = explicit_grads(model.eval(), batches)
    name = "transformer.h.0.mlp.c_fc.weight"
    expected = (model.get_parameter(name).detach() * (grads[0][name] + grads[1][name]) / 2).abs()
    torch.testing.assert_close(res.scores[name], expected.float(), rtol=1e-6, atol=0)


def test_include_filter_scores_only_selected_and_progress_is_reported():
    model = tiny_model("phi3")
    seen = []
    res = get_metric("grad_x_weight").score(model, make_batches(3), MetricOptions(
        include=["*.o_proj.weight"], progress=seen.append))
    assert sorted(res.scores) == ["model.layers.0.self_attn.o_proj.weight",
                                  "model.layers.1.self_attn.o_proj.weight"]
    assert seen == [1, 2, 3]
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_grad_x_weight_runs_on_every_architecture(arch):
    model = tiny_model(arch)
    res = get_metric("grad_x_weight").score(model, make_batches(2), MetricOptions())
    params = dict(model.named_parameters())
    assert set(res.scores) == set(params)
    for n, p in params.items():
        assert res.scores[n].shape == p.shape and res.scores[n].isfinite().all()
    # Every parameter receives some gradient on random tokens (zero-initialised biases
    # then score 0 through |W| = 0, which is correct).
    assert all(bool(g.any()) for g in res.accumulators["grad_sum"].values())
    if arch == "mixtral":
        assert res.scores["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 16)


def test_batches_of_one_token_are_refused():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="seq_len >= 2"):
        get_metric("grad_x_weight").score(model, [torch.zeros(2, 1, dtype=torch.long)], MetricOptions())
    with pytest.raises(UserError, match="no calibration batches"):
        get_metric("grad_x_weight").score(model, [], MetricOptions())


def test_leftover_grads_are_not_added_into_the_scores():
    model = tiny_model("llama")
    batches = make_batches(1)
    clean = get_metric("grad_squared").score(model, batches, MetricOptions())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    dirty = get_metric("grad_squared").score(model, batches, MetricOptions())
    for n in clean.scores:
        torch.testing.assert_close(dirty.scores[n], clean.scores[n], rtol=0, atol=0)
