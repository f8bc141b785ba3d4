"""Targets: references checked against shapes, one clear line per problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from esa.core.errors import UserError
from esa.perturb.targets import (WeightTarget, check_targets_against_shapes, flat_to_index,
                         param_shapes_from_checkpoint, read_target_list, resolve_targets)

SHAPES = {"model.layers.0.mlp.down_proj.weight": (8, 16),
          "model.layers.1.mlp.down_proj.weight": (8, 16),
          "model.norm.weight": (8,),
          "model.embed_tokens.weight": (300, 8),
          "experts": (2, 6, 4)}


def test_resolve_every_reference_form_and_flat_index() -> None:
    refs = ["model.embed_tokens.weight:128,3", ("model.norm.weight", (5,)),
            ("model.norm.weight", 6), ("experts", "1,5,2"), ("experts", [0, 0, 3]),
            WeightTarget("model.layers.1.mlp.down_proj.weight", (7, 15), 127)]
    out = check_targets_against_shapes(SHAPES, refs)
    assert [t.name for t in out] == ["model.embed_tokens.weight:128,3", "model.norm.weight:5",
                                     "model.norm.weight:6", "experts:1,5,2", "experts:0,0,3",
                                     "model.layers.1.mlp.down_proj.weight:7,15"]
    for t in out:
        shape = SHAPES[t.param]
        assert t.flat_index == int(np.ravel_multi_index(t.index, shape))
        assert flat_to_index(t.flat_index, shape) == t.index


def test_flat_index_matches_tensor_layout() -> None:
    model = torch.nn.Linear(7, 5)
    refs = [f"weight:{i},{j}" for i in range(5) for j in range(0, 7, 3)] + ["bias:4"]
    params = dict(model.named_parameters())
    for t in resolve_targets(model, refs):
        p = params[t.param].detach()
        assert p.reshape(-1)[t.flat_index] == p[t.index]


def test_each_problem_is_one_clear_line() -> None:
    with pytest.raises(UserError) as e:
        check_targets_against_shapes(SHAPES, ["model.layers.0.mlp.down_prj.weight:1,2"])
    msg = str(e.value)
    assert "unknown parameter 'model.layers.0.mlp.down_prj.weight'" in msg
    assert "did you mean 'model.layers.0.mlp.down_proj.weight'" in msg
    with pytest.raises(UserError, match=r"index 300 out of range in dimension 0 of "
                                        r"'model.embed_tokens.weight' with shape \(300, 8\)"):
        check_targets_against_shapes(SHAPES, ["model.embed_tokens.weight:300,3"])
    with pytest.raises(UserError, match=r"1 index given but 'model.embed_tokens.weight' is 2-D "
                                        r"with shape \(300, 8\); "
                                        r"write model.embed_tokens.weight:i,j"):
        check_targets_against_shapes(SHAPES, ["model.embed_tokens.weight:3"])
    with pytest.raises(UserError, match="3 indices given but 'model.norm.weight' is 1-D"):
        check_targets_against_shapes(SHAPES, [("model.norm.weight", (1, 2, 3))])
    with pytest.raises(UserError, match="malformed weight name"):
        check_targets_against_shapes(SHAPES, ["model.norm.weight"])
    with pytest.raises(UserError) as e:
        check_targets_against_shapes(SHAPES, ["nope:1", "model.norm.weight:8", "experts:0,0,4",
                                              "model.norm.weight:1"])
    msg = str(e.value)
    assert msg.startswith("3 invalid targets: ") and "\n" not in msg
    assert "'nope'" in msg and "index 8" in msg and "index 4 out of range in dimension 2" in msg


def test_duplicates_are_dropped_keeping_first() -> None:
    out = check_targets_against_shapes(SHAPES, ["model.norm.weight:3", ("model.norm.weight", 1),
                                                ("model.norm.weight", (3,))])
    assert [t.index for t in out] == [(3,), (1,)]


def test_tied_lm_head_resolves_to_the_embedding() -> None:
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    [t] = resolve_targets(model, ["lm_head.weight:5,3"])
    assert t.name == "transformer.wte.weight:5,3"
    assert t.flat_index == 5 * 16 + 3


def test_read_target_list_formats(tmp_path) -> None:
    full = tmp_path / "top_weights.csv"
    full.write_text("rank,param,layer,index,flat_index,score,value\n"
                    '1,model.layers.0.mlp.down_proj.weight,0,"3,4",52,9.5,0.1\n'
                    '2,model.norm.weight,,"7",7,1.0,\n')
    assert read_target_list(full) == [("model.layers.0.mlp.down_proj.weight", (3, 4)),
                                      ("model.norm.weight", (7,))]
    short = tmp_path / "short.csv"
    short.write_text('param,index\nexperts,"1,2,3"\nmodel.norm.weight,0\n')
    got = read_target_list(short)
    assert got == [("experts", (1, 2, 3)), ("model.norm.weight", (0,))]
    assert [t.flat_index for t in check_targets_against_shapes(SHAPES, got)] == [24 + 8 + 3, 0]
    weights = tmp_path / "weights.csv"
    weights.write_text("weight\nmodel.embed_tokens.weight:128,3\n")
    assert read_target_list(weights) == [("model.embed_tokens.weight", (128, 3))]
    with pytest.raises(UserError, match="does not exist"):
        read_target_list(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,value\nx,1\n")
    with pytest.raises(UserError):
        read_target_list(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("param,index\n")
    with pytest.raises(UserError, match="holds no weights"):
        read_target_list(empty)


def test_shapes_from_safetensors_headers(tmp_path) -> None:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    shapes = param_shapes_from_checkpoint(tmp_path)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == expected
    [t] = check_targets_against_shapes(shapes, ["model.layers.1.mlp.down_proj.weight:15,23"])
    assert t.flat_index == 15 * 24 + 23
    with pytest.raises(UserError, match="out of range"):
        check_targets_against_shapes(shapes, ["model.layers.1.mlp.down_proj.weight:16,0"])
    with pytest.raises(UserError, match="no .safetensors files"):
        param_shapes_from_checkpoint(tmp_path / "nowhere")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(UserError, match="not a safetensors file"):
        param_shapes_from_checkpoint(junk)


def test_a_ranking_resolves_directly() -> None:
    from esa.profile.ranking import rank_scores

    scores = {"model.norm.weight": torch.arange(8.0), "experts": torch.zeros(2, 6, 4)}
    top = rank_scores(scores, k=3, mode="global")
    out = check_targets_against_shapes(SHAPES, top)
    assert [t.name for t in out] == ["model.norm.weight:7", "model.norm.weight:6",
                                     "model.norm.weight:5"]
