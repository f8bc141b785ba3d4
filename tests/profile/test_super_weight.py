"""super_weight (Yu et al. 2024 spike detector) and act_mag on planted super weights.

Two constructions:
- a *spiking* super weight (the mechanism of the paper): neuron ``col`` of one MLP fires
  strongly and ``down[row, col]`` is large, so the intact model carries a massive activation
  in residual channel ``row``. The detector must name exactly that weight.
- the *cancelling pair* of esa.model.planting: invisible in the intact model's activations (the
  pair cancels), so it is checked with act_mag, and with the detector once the partner is
  zeroed (then the spike is real).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from esa.core.errors import UserError
from esa.profile.metrics import MetricOptions, get_metric
from esa.model.planting import plant_super_weight

VOCAB, HIDDEN, INTER, LAYERS = 64, 16, 32, 3
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                  num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(arch: str) -> nn.Module:
    """A tiny randomly initialised causal LM (fp32, eval mode)."""
    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(**LLAMA_LIKE)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2,
                            n_positions=64, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(arch)
    return tf.AutoModelForCausalLM.from_config(cfg).float().eval()


def batches(n: int = 3, b: int = 2, t: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, t), generator=g) for _ in range(n)]


def run(metric: str, model: nn.Module, data: list[torch.Tensor]):
    return get_metric(metric).score(model, data, MetricOptions())


def global_top(scores: dict[str, torch.Tensor]) -> tuple[str, tuple[int, ...]]:
    """(param, index) of the largest score over all tensors (brute force)."""
    name = max(scores, key=lambda n: float(scores[n].max()))
    flat = int(scores[name].argmax())
    return name, tuple(int(i) for i in torch.unravel_index(torch.tensor(flat),
                                                           scores[name].shape))


def tensor_top(score: torch.Tensor, k: int = 1) -> list[tuple[int, ...]]:
    flat = torch.topk(score.flatten(), k).indices
    return [tuple(int(i) for i in torch.unravel_index(f, score.shape)) for f in flat]


# ---------------------------------------------------------------- spiking super weight

def plant_spike_llama(model: nn.Module, layer: int, row: int, col: int) -> float:
    """Make neuron `col` fire ~100x harder and give it a large weight into channel `row`."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[col] *= 10
        mlp.up_proj.weight[col] *= 10
        v = 100 * float(mlp.down_proj.weight.abs().max())
        mlp.down_proj.weight[row, col] = v
    return v


def test_detector_finds_spiking_super_weight_llama() -> None:
    model = build("llama")
    layer, row, col = 1, 5, 11
    v = plant_spike_llama(model, layer, row, col)
    result = run("super_weight", model, batches())
    top = result.extras["super_weights"][0]
    param = f"model.layers.{layer}.mlp.down_proj.weight"
    assert (top["param"], top["layer"], top["row"], top["col"]) == (param, layer, row, col)
    assert top["index"] == [row, col] and top["weight"] == f"{param}:{row},{col}"
    assert top["weight_value"] == pytest.approx(v) and top["expert"] is None
    assert abs(top["output_spike"]) > abs(result.extras["super_weights"][1]["output_spike"])
    # one candidate per layer, ranked
    assert sorted(c["layer"] for c in result.extras["super_weights"]) == list(range(LAYERS))
    assert [c["rank"] for c in result.extras["super_weights"]] == list(range(LAYERS))
    # the ranking score |W| * max|X| puts it first too; only down projections are scored
    assert set(result.scores) == {f"model.layers.{i}.mlp.down_proj.weight"
                                  for i in range(LAYERS)}
    assert global_top(result.scores) == (param, (row, col))
    assert len(result.unscored) + len(result.scores) == len(list(model.parameters()))
    # act_mag ranks the same weight first in its tensor and over the whole model
    act = run("act_mag", model, batches())
    assert tensor_top(act.scores[param]) == [(row, col)]
    assert global_top(act.scores) == (param, (row, col))


def test_detector_uses_conv1d_indexing_gpt2() -> None:
    model = build("gpt2")
    layer, row, col = 2, 3, 40
    mlp = model.transformer.h[layer].mlp
    with torch.no_grad():
        mlp.c_fc.weight[:, col] *= 10   # Conv1D [in, out]: neuron col is a column
        mlp.c_fc.bias[col] = 1.0        # keep it in GELU's linear regime
        v = 100 * float(mlp.c_proj.weight.abs().max())
        mlp.c_proj.weight[col, row] = v  # c_proj is [in=4H, out=H]
    result = run("super_weight", model, batches())
    top = result.extras["super_weights"][0]
    param = f"transformer.h.{layer}.mlp.c_proj.weight"
    assert (top["param"], top["row"], top["col"]) == (param, row, col)
    assert top["index"] == [col, row] and top["weight"] == f"{param}:{col},{row}"
    assert top["weight_value"] == pytest.approx(v)
    assert global_top(result.scores) == (param, (col, row))
    # attention c_proj is not an MLP down projection
    assert all(".attn." not in n for n in result.scores)


# ---------------------------------------------------------------- cancelling pair

def pair_setup() -> tuple[nn.Module, int, int, int, int, list[torch.Tensor]]:
    """A llama with esa.model.planting's pair in layer 1; col is the neuron that fires hardest
    on the data (so the input spike is there), col2 the last neuron (overwritten by a copy
    of col), row a channel where down[row, col] > 0 so (row, col) is the larger of the pair."""
    model, data, layer = build("llama"), batches(), 1
    mlp = model.model.layers[layer].mlp
    seen: list[torch.Tensor] = []
    h = mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].flatten(0, 1)))
    with torch.no_grad():
        for ids in data:
            model(input_ids=ids)
    h.remove()
    col2 = INTER - 1
    col = int(torch.cat(seen).abs().amax(dim=0)[:col2].argmax())
    row = int(mlp.down_proj.weight[:, col].argmax())
    assert mlp.down_proj.weight[row, col] > 0
    plant_super_weight(model, layer, row, col, col2, magnitude=None)
    return model, layer, row, col, col2, data


def test_act_mag_ranks_planted_pair_first() -> None:
    model, layer, row, col, col2, data = pair_setup()
    param = f"model.layers.{layer}.mlp.down_proj.weight"
    act = run("act_mag", model, data)
    # ||X_col|| == ||X_col2|| (copied neuron) and |old + V| > |-V|:
    # the planted weight comes first, its partner second.
    assert tensor_top(act.scores[param], 2) == [(row, col), (row, col2)]
    assert global_top(act.scores) == (param, (row, col))


def test_detector_finds_planted_weight_once_partner_is_zeroed() -> None:
    model, layer, row, col, col2, data = pair_setup()
    down = model.model.layers[layer].mlp.down_proj.weight
    with torch.no_grad():
        down[row, col2] = 0.0  # the perturbation: now +V*x_col really reaches channel row
    top = run("super_weight", model, data).extras["super_weights"][0]
    assert (top["layer"], top["row"], top["col"]) == (layer, row, col)
    assert top["weight_value"] == pytest.approx(float(down[row, col].detach()))


# ---------------------------------------------------------------- first principles

def collect_io(module: nn.Module, model: nn.Module, data: list[torch.Tensor]):
    xs, ys = [], []

    def hook(m, args, out):
        xs.append(args[0].reshape(-1, args[0].shape[-1]).clone())
        ys.append(out.reshape(-1, out.shape[-1]).clone())
    h = module.register_forward_hook(hook)
    with torch.no_grad():
        for ids in data:
            model(input_ids=ids)
    h.remove()
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_detector_and_scores_equal_brute_force(arch: str) -> None:
    model, data = build(arch), batches()
    result = run("super_weight", model, data)
    cands = {c["param"]: c for c in result.extras["super_weights"]}
    for i in range(LAYERS):
        if arch == "llama":
            mod = model.model.layers[i].mlp.down_proj
            param = f"model.layers.{i}.mlp.down_proj.weight"
        else:
            mod, param = model.transformer.h[i].mlp.c_proj, f"transformer.h.{i}.mlp.c_proj.weight"
        x, y = collect_io(mod, model, data)
        xmax = x.abs().amax(dim=0)
        w = mod.weight.detach().abs()
        expected = w * (xmax[:, None] if isinstance(mod, Conv1D) else xmax[None, :])
        torch.testing.assert_close(result.scores[param], expected)
        c = cands[param]
        assert c["col"] == int(xmax.argmax()) and c["row"] == int(y.abs().amax(dim=0).argmax())
        assert abs(c["input_spike"]) == pytest.approx(float(x.abs().max()))
        assert abs(c["output_spike"]) == pytest.approx(float(y.abs().max()))
        # the recorded token really carries the spike: (batch, sequence, position)
        b, s, t = c["input_token"]
        flat = b * data[0].numel() + s * data[0].shape[1] + t
        assert float(x[flat, c["col"]]) == pytest.approx(c["input_spike"])


def test_mixtral_experts_use_routed_tokens() -> None:
    model, data = build("mixtral"), batches()
    result = run("super_weight", model, data)
    layer = model.model.layers[0]
    hs: list[torch.Tensor] = []
    h = layer.mlp.register_forward_pre_hook(lambda m, a: hs.append(a[0].flatten(0, 1)))
    with torch.no_grad():
        for ids in data:
            model(input_ids=ids)
    h.remove()
    hidden = torch.cat(hs)
    top = torch.topk(torch.softmax(hidden @ layer.mlp.gate.weight.T, -1), 2, dim=-1).indices
    gate_up, down = layer.mlp.experts.gate_up_proj.detach(), layer.mlp.experts.down_proj.detach()
    param = "model.layers.0.mlp.experts.down_proj"
    cands = {c["expert"]: c for c in result.extras["super_weights"] if c["param"] == param}
    for e in range(4):
        xe = hidden[(top == e).any(-1)]
        inter = torch.nn.functional.silu(xe @ gate_up[e, :INTER].T) * (xe @ gate_up[e, INTER:].T)
        out = inter @ down[e].T
        xmax = inter.abs().amax(dim=0)
        torch.testing.assert_close(result.scores[param][e], down[e].abs() * xmax[None, :])
        row, col = int(out.abs().amax(0).argmax()), int(xmax.argmax())
        assert (cands[e]["row"], cands[e]["col"], cands[e]["index"]) == (row, col, [e, row, col])


def test_not_shardable_and_needs_down_projections() -> None:
    model = build("llama")
    with pytest.raises(UserError, match="without --shard"):
        get_metric("super_weight").finalize({}, {}, model)
    with pytest.raises(UserError, match="down projection"):
        get_metric("super_weight").score(model, batches(n=1),
                                         MetricOptions(include=["self_attn"]))
