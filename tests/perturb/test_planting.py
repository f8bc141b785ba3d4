"""The planted super weight: exact cancellation, the ±V·x spike, and its causal signature."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from esa.perturb.controls import random_k
from esa.core.errors import UserError
from esa.perturb.perturbations import cpu_generator, get_perturbation, int_view_dtype, perturbed
from esa.model.planting import find_mlp, plant_super_weight
from esa.perturb.significance import empirical_p
from esa.perturb.targets import resolve_targets

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **SMALL),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, **SMALL),
    "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, **SMALL),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                            n_inner=64, n_positions=64, bos_token_id=0,
                                            eos_token_id=0),
}
LAYER, ROW, COL, COL2, V = 1, 3, 2, 5, 1.0e4


def build(arch: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    return model.to(dtype).eval()


def down_module(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    down = find_mlp(model, layer).down
    return next(m for m in model.modules() if getattr(m, "weight", None) is down)


def remove_neuron(model: torch.nn.Module, layer: int, col: int) -> None:
    """The reference: neuron `col` of the MLP contributes nothing."""
    mlp = find_mlp(model, layer)
    with torch.no_grad():
        mlp.down.select(0 if mlp.down_transposed else 1, col).zero_()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_planted_model_equals_original_without_neuron_col2(arch) -> None:
    original = build(arch)
    reference = copy.deepcopy(original)
    remove_neuron(reference, LAYER, COL2)
    planted = copy.deepcopy(original)
    names = plant_super_weight(planted, LAYER, ROW, COL, COL2, V)
    ids = torch.randint(0, 128, (2, 12), generator=cpu_generator(0))
    with torch.no_grad():
        out_o, out_r, out_p = (m(ids).logits for m in (original, reference, planted))
    # Removing neuron col2 is visible, so the comparison below has teeth ...
    assert (out_o - out_r).abs().max() > 1e-6
    # ... and the planted pair cancels: in float64 only rounding of the ±V terms remains.
    assert (out_p - out_r).abs().max() < 1e-9 * V
    targets = resolve_targets(planted, names)
    down = find_mlp(planted, LAYER).down
    assert float(down.detach()[targets[1].index]) == -V
    old = find_mlp(original, LAYER).down.detach()
    assert float(down.detach()[targets[0].index]) == pytest.approx(float(old[targets[0].index]) + V,
                                                                   rel=1e-15)
    stored = [(ROW, COL), (ROW, COL2)] if arch != "gpt2" else [(COL, ROW), (COL2, ROW)]
    assert [t.index for t in targets] == stored
    # Only the neuron copy and the down column changed; every other parameter is untouched.
    for (n, a), (_, b) in zip(original.named_parameters(), planted.named_parameters()):
        if f".{LAYER}." not in n or "mlp" not in n:
            assert torch.equal(a, b), n


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_zeroing_either_planted_weight_adds_v_times_x_col(arch) -> None:
    model = build(arch)
    names = plant_super_weight(model, LAYER, ROW, COL, COL2, V)
    targets = resolve_targets(model, names)
    mlp_module = down_module(model, LAYER)
    captured = {}
    mlp_module.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    mlp_module.register_forward_hook(lambda m, args, out: captured.__setitem__("y", out))
    ids = torch.randint(0, 128, (2, 12), generator=cpu_generator(1))
    with torch.no_grad():
        model(ids)
        x, y0 = captured["x"], captured["y"]
        assert torch.equal(x[..., COL], x[..., COL2])  # neuron col2 is an exact copy of col
        down = find_mlp(model, LAYER).down
        planted_col = float(down[targets[0].index])
        for target, expected in ((targets[1], V), (targets[0], -planted_col)):
            with perturbed(model, [target], get_perturbation("zero")):
                model(ids)
            # Same layer input (earlier layers untouched), so the output difference is exact.
            diff = captured["y"] - y0
            spike = expected * x[..., COL]
            assert torch.allclose(diff[..., ROW], spike, rtol=1e-9, atol=1e-9 * V)
            others = torch.cat([diff[..., :ROW], diff[..., ROW + 1:]], dim=-1)
            assert others.abs().max() < 1e-12
            assert spike.abs().median() > 1.0  # a real spike, not a rounding effect


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, above all on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_planted_weight_dominates_controls_end_to_end(one_thread) -> None:
    """Zeroing a planted weight wrecks the loss; 100 matched random controls do not.

    An untrained model predicts random tokens about uniformly, and no damage can make it
    worse at that by much. So the model is made confident (a larger lm_head) and scored
    against its own greedy predictions: any change of its function raises that NLL.
    """
    model = build("llama", torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    names = plant_super_weight(model, 0, ROW, COL, COL2)  # default V = 1e4 * max|W_down|
    targets = resolve_targets(model, names[1:])
    # The planted pair are the two largest |W| of the whole model.
    flat = sorted(((float(p.detach().abs().max()), n) for n, p in model.named_parameters()),
                  reverse=True)
    assert flat[0][1] == targets[0].param
    down = find_mlp(model, 0).down.detach().abs().reshape(-1)
    assert set(down.topk(2).indices.tolist()) == {ROW * 64 + COL, ROW * 64 + COL2}

    ids = torch.randint(0, 128, (2, 16), generator=cpu_generator(2))
    with torch.no_grad():
        labels = model(ids).logits.argmax(-1).reshape(-1)
    before = {n: p.detach().clone().view(int_view_dtype(p.dtype))
              for n, p in model.named_parameters()}

    def nll() -> float:
        with torch.no_grad():
            logits = model(ids).logits.reshape(-1, 128)
            return float(torch.nn.functional.cross_entropy(logits, labels))

    base = nll()
    with perturbed(model, targets, get_perturbation("zero")):
        target_delta = nll() - base
    control_deltas = []
    for seed in range(100):
        controls = random_k(model, targets, cpu_generator(seed))
        with perturbed(model, controls, get_perturbation("zero")):
            control_deltas.append(nll() - base)
    assert target_delta > 3.0  # nats per token (measured: about 7)
    assert max(abs(d) for d in control_deltas) < 0.05  # measured: below 0.001
    assert empirical_p(target_delta, control_deltas) == pytest.approx(1 / 101)
    for n, p in model.named_parameters():  # every perturbation was undone bit-exactly
        assert torch.equal(p.detach().view(int_view_dtype(p.dtype)), before[n]), n


def test_bf16_values_and_errors() -> None:
    model = build("llama", torch.bfloat16)
    names = plant_super_weight(model, 0, 1, 0, 1, 1000.0)
    down = find_mlp(model, 0).down
    [_, t2] = resolve_targets(model, names)
    assert down[t2.index].item() == -1000.0 and down.dtype == torch.bfloat16
    with pytest.raises(UserError, match="col and col2 must be different"):
        plant_super_weight(model, 0, 1, 3, 3, 1.0)
    with pytest.raises(UserError, match="row 32 out of range: the hidden size is 32"):
        plant_super_weight(model, 0, 32, 0, 1, 1.0)
    with pytest.raises(UserError, match="col2 64 out of range: the MLP has 64 neurons"):
        plant_super_weight(model, 0, 0, 0, 64, 1.0)
    with pytest.raises(UserError, match="layer 2 out of range: the model has 2 blocks"):
        plant_super_weight(model, 2, 0, 0, 1, 1.0)
    with pytest.raises(UserError, match="magnitude must be a positive"):
        plant_super_weight(model, 0, 0, 0, 1, -1.0)
    moe = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, **SMALL))
    with pytest.raises(UserError, match="mixture-of-experts"):
        plant_super_weight(moe, 0, 0, 0, 1, 1.0)
