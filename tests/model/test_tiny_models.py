"""Tiny models of the six seed architectures: save/load round trip, forward+backward, seeds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from esa.core.errors import UserError
from esa.model.tiny import ARCHS, BOS_ID, EOS_ID, PAD_ID, TinySize, build_tiny_model, tiny_config

SMALL = TinySize(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, max_positions=512)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_forward_backward(arch, tiny_model_factory):
    path = tiny_model_factory(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch
    # Special ids inside the vocab (Phi3Config/GPT2Config defaults lie outside a tiny vocab).
    for tid in (model.config.bos_token_id, model.config.eos_token_id):
        assert tid is not None and 0 <= tid < model.config.vocab_size
    text = "def add(a, b):\n    return a + b\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    batch = torch.tensor([ids[:16], ids[:16]])
    out = model(input_ids=batch, labels=batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # The saved model is the one that was built: reloading gives identical weights.
    again = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    meta = json.loads((path / "esa_tiny.json").read_text())
    assert meta["arch"] == arch and meta["n_params"] == sum(p.numel() for p in model.parameters())


def test_special_token_ids_match_tokenizer(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_model(arch):
    a = build_tiny_model(arch, 300, seed=7, size=SMALL)
    b = build_tiny_model(arch, 300, seed=7, size=SMALL)
    c = build_tiny_model(arch, 300, seed=8, size=SMALL)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].dim() >= 2)


def test_only_gpt2_ties_embeddings():
    for arch in ARCHS:
        model = build_tiny_model(arch, 300, size=SMALL)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert tied == (arch == "gpt2"), arch


def test_mixtral_fused_experts_in_memory_per_expert_on_disk(tiny_model_factory):
    path = tiny_model_factory("mixtral")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    names = dict(model.named_parameters())
    fused = names["model.layers.0.mlp.experts.down_proj"]
    assert fused.dim() == 3 and fused.shape[0] == model.config.num_local_experts
    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    # transformers converts the checkpoint's per-expert tensors into the fused parameter on load.
    assert any("experts.0." in k for k in keys) or "model.layers.0.mlp.experts.down_proj" in keys


def test_training_steps_are_deterministic_and_lower_the_loss(tmp_path):
    from esa.model.tiny import train_tiny_model

    torch.manual_seed(0)
    windows = torch.randint(4, 64, (32, 16))
    windows[:, 1::2] = windows[:, 0::2]  # a learnable pattern: every odd token repeats its left neighbour
    losses, states = [], []
    for _ in range(2):
        model = build_tiny_model("llama", 64, seed=3, size=SMALL)
        before = model(input_ids=windows, labels=windows).loss.item()
        report = train_tiny_model(model, windows, steps=30, batch_size=8, seed=5)
        after = model(input_ids=windows, labels=windows).loss.item()
        losses.append((before, after))
        states.append(model.state_dict())
        assert report.steps == 30
    assert losses[0][1] < losses[0][0] - 0.2
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="unknown architecture 'bert'"):
        tiny_config("bert", 300)


def test_concurrent_first_use_builds_the_builtin_model_once(tmp_path):
    """Array tasks that start together on a fresh cache share one build (file lock)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ESA_CACHE_DIR": str(tmp_path)}
    code = "from esa.model.tiny import builtin_tiny_model; print(builtin_tiny_model('llama', train_steps=2))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    built = [p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")]
    assert built == [os.path.basename(outs[0])]  # no leftover partial folder
    assert AutoModelForCausalLM.from_pretrained(outs[0]) is not None
