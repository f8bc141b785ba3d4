"""act_mag against first principles: |W_ij| * ||X_j||_2 from explicitly collected inputs.

The brute force never uses esa.model.linear_modules: it hooks nn.Linear / Conv1D modules directly,
and for Mixtral it recomputes the routing from the router weight exactly as the model does.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from esa.core.errors import UserError
from esa.model.linear_modules import find_linear_weights
from esa.profile.metrics import MetricOptions, get_metric

VOCAB, HIDDEN, INTER, LAYERS = 64, 16, 32, 2
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                  num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(arch: str) -> nn.Module:
    """A tiny randomly initialised causal LM of `arch` (fp32, eval mode)."""
    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(**LLAMA_LIKE)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**LLAMA_LIKE)
    elif arch == "phi3":
        cfg = tf.Phi3Config(**LLAMA_LIKE)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                               num_hidden_layers=LAYERS, num_attention_heads=2,
                               bos_token_id=1, eos_token_id=2)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2,
                            n_positions=64, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(arch)
    return tf.AutoModelForCausalLM.from_config(cfg).float().eval()


def batches(n: int = 4, b: int = 2, t: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, t), generator=g) for _ in range(n)]


def collect_dense_inputs(model: nn.Module, data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """module name -> all its input rows [N, in] for every nn.Linear / Conv1D."""
    rows: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, Conv1D)):
            def hook(m, args, out, name=name):
                rows.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).clone())
            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for ids in data:
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


def brute_force_dense(model: nn.Module, data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """param name -> |W| * column norms, from explicitly collected inputs."""
    inputs = collect_dense_inputs(model, data)
    canonical = {id(p): n for n, p in model.named_parameters()}
    expected = {}
    for name, mod in model.named_modules():
        if name not in inputs:
            continue
        norms = torch.linalg.norm(inputs[name], dim=0)
        w = mod.weight.detach().abs()
        # nn.Linear weight is [out, in] (input j = column j); Conv1D is [in, out] (row j).
        scaled = w * norms[None, :] if isinstance(mod, nn.Linear) else w * norms[:, None]
        expected[canonical[id(mod.weight)]] = scaled
    return expected


def run(metric: str, model: nn.Module, data: list[torch.Tensor], **opts):
    return get_metric(metric).score(model, data, MetricOptions(**opts))


@pytest.mark.parametrize("arch", ["llama", "mistral", "phi3", "gpt_neox", "gpt2"])
def test_act_mag_equals_brute_force(arch: str) -> None:
    model = build(arch)
    data = batches()
    expected = brute_force_dense(model, data)
    result = run("act_mag", model, data)
    assert set(result.scores) == set(expected)
    for name, exp in expected.items():
        got = result.scores[name]
        assert got.dtype == torch.float32 and got.shape == exp.shape, name
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-7, msg=name)
    # every calibration token reached every dense module
    n_tokens = sum(ids.numel() for ids in data)
    assert all(c == n_tokens for c in result.counts.values())


def test_fused_projections_are_scored() -> None:
    names = set(run("act_mag", build("phi3"), batches(n=1)).scores)
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    names = set(run("act_mag", build("gpt_neox"), batches(n=1)).scores)
    assert "gpt_neox.layers.1.attention.query_key_value.weight" in names


def test_gpt2_conv1d_layout_and_tied_head() -> None:
    model = build("gpt2")
    data = batches()
    inputs = collect_dense_inputs(model, data)
    result = run("act_mag", model, data)
    # c_fc is Conv1D [in=16, out=64]: row j is scaled by the norm of input feature j.
    w = model.transformer.h[0].mlp.c_fc.weight.detach()
    norms = torch.linalg.norm(inputs["transformer.h.0.mlp.c_fc"], dim=0)
    assert w.shape == (HIDDEN, 4 * HIDDEN)
    torch.testing.assert_close(result.scores["transformer.h.0.mlp.c_fc.weight"],
                               w.abs() * norms[:, None])
    # lm_head is tied to wte: one parameter, scored from the lm_head inputs, named wte.
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in result.scores
    head_norms = torch.linalg.norm(inputs["lm_head"], dim=0)
    torch.testing.assert_close(result.scores["transformer.wte.weight"],
                               model.lm_head.weight.detach().abs() * head_norms[None, :])
    assert result.extras["scored_via"] == {"transformer.wte.weight": "lm_head"}


def mixtral_brute_force(model: nn.Module, data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Recompute routing from the router logits and score each expert on its own tokens."""
    cfg = model.config
    hidden: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(m, args, i=i):
            hidden.setdefault(i, []).append(args[0].reshape(-1, cfg.hidden_size).clone())
        handles.append(layer.mlp.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in data:
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    expected = {}
    for i, layer in enumerate(model.model.layers):
        h = torch.cat(hidden[i])
        router_w = layer.mlp.gate.weight.detach()
        expected[f"model.layers.{i}.mlp.gate.weight"] = (
            router_w.abs() * torch.linalg.norm(h, dim=0)[None, :])
        # Routing: softmax over router logits, top-k experts per token.
        probs = torch.softmax(h @ router_w.T, dim=-1)
        top = torch.topk(probs, cfg.num_experts_per_tok, dim=-1).indices
        gate_up = layer.mlp.experts.gate_up_proj.detach()
        down = layer.mlp.experts.down_proj.detach()
        exp_gu, exp_down = torch.zeros_like(gate_up), torch.zeros_like(down)
        for e in range(cfg.num_local_experts):
            xe = h[(top == e).any(dim=-1)]
            assert xe.shape[0] > 0, "test data should reach every expert"
            w_gate, w_up = gate_up[e, :cfg.intermediate_size], gate_up[e, cfg.intermediate_size:]
            inter = torch.nn.functional.silu(xe @ w_gate.T) * (xe @ w_up.T)
            exp_gu[e] = gate_up[e].abs() * torch.linalg.norm(xe, dim=0)[None, :]
            exp_down[e] = down[e].abs() * torch.linalg.norm(inter, dim=0)[None, :]
        expected[f"model.layers.{i}.mlp.experts.gate_up_proj"] = exp_gu
        expected[f"model.layers.{i}.mlp.experts.down_proj"] = exp_down
    return expected


def test_act_mag_mixtral_experts_use_routed_tokens() -> None:
    model = build("mixtral")
    data = batches(n=3, t=16)
    result = run("act_mag", model, data)
    expected = mixtral_brute_force(model, data)
    expected.update({k: v for k, v in brute_force_dense(model, data).items()})
    assert set(result.scores) == set(expected)
    for name, exp in expected.items():
        torch.testing.assert_close(result.scores[name], exp, rtol=1e-5, atol=1e-6, msg=name)
    # Each token goes to exactly top_k experts, so the routed row counts add up to N * k.
    n_tokens = sum(ids.numel() for ids in data)
    assert result.counts["model.layers.0.mlp.experts.down_proj"] == 2 * n_tokens
    assert sum(result.extras["expert_tokens"]["model.layers.0.mlp.experts.down_proj"]) == \
        2 * n_tokens


LLAMA_NORMS = [f"model.layers.{i}.{n}.weight" for i in range(LAYERS)
               for n in ("input_layernorm", "post_attention_layernorm")]
UNSCORED = {
    "llama": {"model.embed_tokens.weight", "model.norm.weight", *LLAMA_NORMS},
    "mixtral": {"model.embed_tokens.weight", "model.norm.weight", *LLAMA_NORMS},
    "gpt2": {"transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
             *(f"transformer.h.{i}.{m}.bias" for i in range(LAYERS)
               for m in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
             *(f"transformer.h.{i}.{m}.weight" for i in range(LAYERS) for m in ("ln_1", "ln_2"))},
    "gpt_neox": {"gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight",
                 "gpt_neox.final_layer_norm.bias",
                 *(f"gpt_neox.layers.{i}.{m}.{p}" for i in range(LAYERS)
                   for m in ("input_layernorm", "post_attention_layernorm")
                   for p in ("weight", "bias")),
                 *(f"gpt_neox.layers.{i}.{m}.bias" for i in range(LAYERS)
                   for m in ("attention.query_key_value", "attention.dense",
                             "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))},
}


@pytest.mark.parametrize("arch", sorted(UNSCORED))
def test_unscored_lists_exactly_the_non_linear_weights(arch: str) -> None:
    model = build(arch)
    result = run("act_mag", model, batches(n=1, t=16))
    assert set(result.unscored) == UNSCORED[arch]
    # scored + unscored cover every parameter exactly once; nothing is silently zero-filled
    all_names = [n for n, _ in model.named_parameters()]
    assert sorted([*result.scores, *result.unscored]) == sorted(all_names)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_sharded_accumulators_sum_to_the_full_run(arch: str) -> None:
    model = build(arch)
    data = batches(n=4, t=16)
    metric = get_metric("act_mag")
    full = metric.score(model, data, MetricOptions())
    halves = [metric.score(model, part, MetricOptions()) for part in (data[:2], data[2:])]
    summed = {
        key: {p: halves[0].accumulators[key][p] + halves[1].accumulators[key][p]
              for p in halves[0].accumulators[key]}
        for key in halves[0].accumulators}
    counts = {p: halves[0].counts[p] + halves[1].counts[p] for p in halves[0].counts}
    assert counts == full.counts
    reduced = metric.finalize(summed, counts, model)
    assert set(reduced) == set(full.scores)
    for name in full.scores:
        torch.testing.assert_close(reduced[name], full.scores[name], rtol=1e-5, atol=1e-7)


def test_deterministic_and_restores_training_flag() -> None:
    model = build("gpt2").train()  # dropout on: the metric must switch it off while scoring
    model.transformer.h[0].eval()  # a mixed state must come back as it was
    data = batches(n=2)
    a = run("act_mag", model, data)
    b = run("act_mag", model, data)
    assert model.training and model.transformer.h[1].training
    assert not model.transformer.h[0].training and not model.transformer.h[0].mlp.training
    for name in a.scores:
        assert torch.equal(a.scores[name], b.scores[name])


def test_alias_include_and_bad_input() -> None:
    model = build("llama")
    result = run("activation_magnitude", model, batches(n=1), include=["mlp"])
    assert set(result.scores) == {f"model.layers.{i}.mlp.{p}_proj.weight"
                                  for i in range(LAYERS) for p in ("gate", "up", "down")}
    assert all("mlp" in n for n in result.unscored)
    with pytest.raises(UserError):
        run("act_mag", model, [])
    with pytest.raises(UserError):
        get_metric("act_mag").finalize({}, {}, model)


def test_find_linear_weights_layouts() -> None:
    by_name = {w.param_name: w for w in find_linear_weights(build("mixtral"))}
    gu = by_name["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gu.kind, gu.in_axis, gu.expert_axis, gu.accumulator_shape) == \
        ("experts_in", 2, 0, (4, HIDDEN))
    dn = by_name["model.layers.0.mlp.experts.down_proj"]
    assert (dn.kind, dn.accumulator_shape) == ("experts_down", (4, INTER))
    assert by_name["model.layers.0.mlp.gate.weight"].kind == "router"
    c_fc = {w.param_name: w for w in find_linear_weights(build("gpt2"))}[
        "transformer.h.0.mlp.c_fc.weight"]
    assert (c_fc.kind, c_fc.in_axis, c_fc.in_features) == ("conv1d", 0, HIDDEN)
