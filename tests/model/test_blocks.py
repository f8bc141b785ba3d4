"""Decoder blocks of every seed architecture, and activation checkpointing over them."""

from __future__ import annotations

import pytest
import torch

from esa.model.blocks import checkpoint_blocks, decoder_blocks
from esa.model.loading import load_model
from esa.profile.metrics import MetricOptions, get_metric
from esa.spec.manifest import ModelSpec

ARCHS = ("llama", "mistral", "phi3", "mixtral", "gpt_neox", "gpt2")


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_are_the_decoder_layers(tiny_model_factory, arch):
    model = load_model(ModelSpec(id=str(tiny_model_factory(arch)), dtype="fp32", device="cpu")).model
    blocks = decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert len({type(b) for b in blocks}) == 1


@pytest.mark.parametrize("arch", ["llama", "mixtral", "gpt2"])
def test_checkpointing_recomputes_and_keeps_scores(tiny_model_factory, arch):
    spec = ModelSpec(id=str(tiny_model_factory(arch)), dtype="fp32", device="cpu")
    batches = [torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plain = load_model(spec).model
    expected = get_metric("grad_x_weight").score(plain, batches, MetricOptions()).scores
    model = load_model(spec).model
    names = [n for n, _ in model.named_parameters()]
    assert checkpoint_blocks(model) == model.config.num_hidden_layers
    assert checkpoint_blocks(model) == model.config.num_hidden_layers  # patching twice changes nothing
    assert [n for n, _ in model.named_parameters()] == names  # no wrapper module renames parameters
    got = get_metric("grad_x_weight").score(model, batches, MetricOptions()).scores
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # the same operations again: bit-equal


def test_checkpointing_recomputes_block_forwards(tiny_model_factory, monkeypatch):
    model = load_model(ModelSpec(id=str(tiny_model_factory("llama")), dtype="fp32", device="cpu")).model
    blocks = decoder_blocks(model)
    inner = type(blocks[0]).forward
    count = {"n": 0}

    def counting(self, *args, **kwargs):
        count["n"] += 1
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(type(blocks[0]), "forward", counting)
    checkpoint_blocks(model)
    ids = torch.randint(0, 200, (1, 16))
    model(input_ids=ids).logits.sum().backward()
    assert count["n"] == 2 * len(blocks)  # each block once forward, once again in backward
    count["n"] = 0
    with torch.no_grad():
        model(input_ids=ids)
    assert count["n"] == len(blocks)  # nothing to recompute without grad
