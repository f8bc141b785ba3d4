"""Phase 1 equals an independent computation with the model's own loss on the same windows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from esa.data.windows import DataSpec, load_windows
from esa.core.errors import NonFiniteLossError
from esa.baseline.evaluate import evaluate, sanity_flags
from esa.results.records import EvalFigures as EvalResult
from esa.runner import run


def manifest(model_dir, out_dir, **data):
    d = {"dataset": "builtin", "config": None, "split": "validation", "text_field": "text",
         "seq_len": 32, "max_samples": 12, "batch_size": 5, **data}
    return {"schema_version": 1, "phase": 1, "experiment": "t", "seed": 0,
            "model": {"id": str(model_dir), "revision": None, "dtype": "fp32", "device": "cpu",
                      "attention": "auto", "trust_remote_code": False},
            "data": d, "outputs": {"dir": str(out_dir)}}


@pytest.fixture(scope="module")
def trained_llama(tiny_model_factory):
    return tiny_model_factory("llama", train_steps=150)


def test_ppl_and_accuracy_equal_the_models_own_loss(trained_llama, tmp_path):
    summary = run(manifest(trained_llama, tmp_path))
    ev = json.loads((tmp_path / "eval.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(trained_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(trained_llama)
    windows = load_windows(DataSpec(dataset="builtin", split="validation", seq_len=32, max_samples=12), tok).ids
    losses, hits = [], 0
    with torch.no_grad():
        for w in windows:
            out = model(input_ids=w[None], labels=w[None])  # HF shifts labels internally
            losses.append(out.loss.item())
            hits += (out.logits[0, :-1].argmax(-1) == w[1:]).sum().item()
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = sum(losses) / len(losses)  # equal window lengths: mean of means = mean over tokens
    assert ev["n_tokens"] == n_tokens and ev["n_windows"] == 12
    assert ev["nll"] == pytest.approx(nll, rel=1e-5)
    assert ev["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert ev["token_accuracy"] == pytest.approx(hits / n_tokens, abs=1e-12)
    assert ev["per_window_nll"] == pytest.approx(losses, rel=1e-5)
    assert summary["ppl"] == ev["ppl"]
    # Training lowered the perplexity well below uniform over the vocabulary.
    assert ev["ppl"] < 0.5 * model.config.vocab_size


def test_outputs_and_provenance(tiny_llama, tmp_path):
    run(manifest(tiny_llama, tmp_path))
    record = json.loads((tmp_path / "experiment_manifest.json").read_text())
    assert record["manifest"]["phase"] == 1 and record["manifest"]["id"]
    prov = record["provenance"]
    for key in ("versions", "git", "host", "cpu", "memory_bytes", "slurm", "start_time", "end_time"):
        assert key in prov
    for pkg in ("python", "torch", "transformers", "datasets", "esa"):
        assert prov["versions"][pkg]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (tmp_path / "esa.log").read_text().count("baseline: ppl") == 1


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                               ("fp32", torch.float32)])
def test_dtype_handling(trained_llama, tmp_path, dtype, torch_dtype):
    from esa.model.loading import ModelSpec, load_model

    loaded = load_model(ModelSpec(id=str(trained_llama), dtype=dtype, device="cpu"))
    assert all(p.dtype == torch_dtype for p in loaded.model.parameters())
    m = manifest(trained_llama, tmp_path / dtype)
    m["model"]["dtype"] = dtype
    ev = run(m)
    ref = run(manifest(trained_llama, tmp_path / "ref"))
    # Lower precision changes the figure a little, not its meaning.
    assert ev["nll"] == pytest.approx(ref["nll"], rel=0.03)


def test_auto_dtype_is_fp32_on_cpu():
    from esa.model.loading import resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_nan_loss_is_an_error(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="NaN/Inf"):
        evaluate(model, torch.randint(4, 100, (3, 16)), batch_size=2)


def test_suspiciously_low_ppl_and_repeats_are_flagged():
    result = EvalResult(nll=0.03, ppl=1.03, token_accuracy=0.99, n_tokens=10, n_windows=2,
                        per_window_nll=[0.03, 0.03], per_window_accuracy=[1, 1])
    windows = torch.zeros(3, 8, dtype=torch.long)
    flags = sanity_flags(result, windows)
    assert any("1.030 < 1.5" in f for f in flags)
    assert any("2 of 3 windows are exact repeats" in f for f in flags)
    assert any("token id 0 makes up 100%" in f for f in flags)
    healthy = EvalResult(nll=4.0, ppl=math.exp(4), token_accuracy=0.3, n_tokens=10, n_windows=2,
                         per_window_nll=[4, 4], per_window_accuracy=[0.3, 0.3])
    assert sanity_flags(healthy, torch.arange(16).view(2, 8)) == []


def test_seq_len_defaults_to_the_models_context_capped_at_2048(tiny_llama, tmp_path):
    m = manifest(tiny_llama, tmp_path, seq_len=None, max_samples=1)
    summary = run(m)
    assert summary["n_tokens"] == 512 - 1  # the small test model's context is 512
