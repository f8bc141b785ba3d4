"""Tiny models of every architecture the runbook names, with an offline-trained tokenizer.

`esa tiny-model --arch llama --out DIR` writes a model and a byte-level BPE tokenizer with
`save_pretrained`, so that `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load them through the same path as a real model. With
`--train-steps` / `--train-seconds` the model is trained briefly on the built-in corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from esa.data import corpus
from esa.core.errors import UserError
from esa.core.io import atomic_write_json
from esa.core.logs import get_logger, progress, quiet_transformers
from esa.core.paths import cache_dir

log = get_logger("tiny")

ARCHS = ("llama", "mistral", "phi3", "mixtral", "gpt_neox", "gpt2")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Training steps of the built-in model (esa:tiny-<arch>, make demo): ~2 minutes on 2 cores.
BUILTIN_TRAIN_STEPS = 300
# The positive control esa:tiny-<arch>-planted: the built-in model with esa.model.planting's
# cancelling pair in block 1 (down[5, 7] and down[5, 11]); the pair is listed in PLANTED_FILE.
PLANTED = {"layer": 1, "row": 5, "col": 7, "col2": 11}
PLANTED_FILE = "esa_planted.json"


@dataclass(frozen=True)
class TinySize:
    """Dimensions of a tiny model (defaults: ~1.4M parameters for llama at vocab 2048)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    experts: int = 4
    experts_per_token: int = 2
    max_positions: int = 2048


def tiny_config(arch: str, vocab_size: int, size: TinySize = TinySize()) -> Any:
    """The transformers config of a tiny `arch` model; special-token ids lie inside the vocab."""
    import transformers as tf

    if arch not in ARCHS:
        raise UserError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHS)}")
    ids = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    llama_like = dict(vocab_size=vocab_size, hidden_size=size.hidden, num_hidden_layers=size.layers,
                      num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                      intermediate_size=size.intermediate, max_position_embeddings=size.max_positions,
                      tie_word_embeddings=False, **ids)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    if arch == "phi3":
        return tf.Phi3Config(**llama_like)
    if arch == "mixtral":
        # Experts are narrower so the MoE model stays near the dense ones in size.
        moe = {**llama_like, "intermediate_size": max(8, size.intermediate // 2)}
        return tf.MixtralConfig(num_local_experts=size.experts,
                                num_experts_per_tok=size.experts_per_token, **moe)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=size.hidden,
                                num_hidden_layers=size.layers, num_attention_heads=size.heads,
                                intermediate_size=size.intermediate,
                                max_position_embeddings=size.max_positions,
                                tie_word_embeddings=False, **ids)
    # gpt2: GPT2Config's default bos/eos is 50256, outside a tiny vocab; GPT-2 ties lm_head.
    return tf.GPT2Config(vocab_size=vocab_size, n_embd=size.hidden, n_layer=size.layers,
                         n_head=size.heads, n_inner=size.intermediate, n_positions=size.max_positions,
                         **ids)


def train_tokenizer(documents: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer offline and wrap it for `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level BPE")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>",
                                   model_max_length=1_000_000_000)


def builtin_tokenizer(vocab_size: int = 2048, max_bytes: int = 8_000_000) -> Any:
    """The tokenizer trained on the built-in training split, cached on disk by its inputs."""
    from transformers import AutoTokenizer

    key = hashlib.sha256(f"{corpus.builtin_fingerprint('train', max_bytes)}:{vocab_size}".encode())
    path = cache_dir() / "tokenizers" / key.hexdigest()[:16]
    with _build_lock(path):
        if not (path / "tokenizer.json").exists():
            t0 = time.perf_counter()
            tok = train_tokenizer(corpus.builtin_documents("train", max_bytes), vocab_size)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tok.save_pretrained(tmp)
            tmp.replace(path)
            log.info("trained a %d-token BPE tokenizer in %.1f s", vocab_size, time.perf_counter() - t0)
    return AutoTokenizer.from_pretrained(path)


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Exclusive lock for building a cached artefact: array tasks that start together on a
    fresh cache build it once (the others wait, then find it)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0, size: TinySize = TinySize()) -> Any:
    """A randomly initialised tiny model; the same seed gives bit-identical weights."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()

    config = tiny_config(arch, vocab_size, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@dataclass
class TrainReport:
    """What a training run did (written next to the model as esa_tiny.json)."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    final_train_loss: float = float("nan")


def train_tiny_model(model: Any, windows: torch.Tensor, *, steps: int | None = None,
                     seconds: float | None = None, batch_size: int = 16, lr: float = 3e-3,
                     seed: int = 0) -> TrainReport:
    """Train with AdamW on random windows until `steps` or `seconds` run out (whichever first).

    A step budget is deterministic for a seed; a time budget is not (it depends on the
    machine), so the report records the steps actually taken.
    """
    if steps is None and seconds is None:
        return TrainReport()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    planned = steps if steps is not None else 10**9
    warmup = 50
    model.train()
    report = TrainReport()
    start = time.perf_counter()
    loss_ema = None
    for step in progress(range(planned), total=steps, desc="train"):
        if seconds is not None and time.perf_counter() - start >= seconds:
            break
        # Cosine decay over a step budget; a pure time budget keeps lr flat after warm-up.
        frac = step / planned if steps is not None else 0.0
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        batch = windows[torch.randint(len(windows), (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        report.steps += 1
        report.tokens += batch.numel()
    report.seconds = time.perf_counter() - start
    report.final_train_loss = float("nan") if loss_ema is None else loss_ema
    model.eval()
    return report


def write_tiny_model(arch: str, out: str | Path, *, seed: int = 0, vocab_size: int = 2048,
                     train_steps: int | None = None, train_seconds: float | None = None,
                     seq_len: int = 128, size: TinySize = TinySize()) -> Path:
    """Build (and optionally train) a tiny model and save model + tokenizer to `out`."""
    from esa.data.windows import DataSpec, load_windows

    if arch not in ARCHS:
        raise UserError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHS)}")
    out = Path(out)
    tokenizer = builtin_tokenizer(vocab_size)
    model = build_tiny_model(arch, vocab_size, seed, size)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny %s: %d parameters, vocab %d", arch, n_params, vocab_size)
    report = TrainReport()
    if train_steps or train_seconds:
        windows = load_windows(DataSpec(dataset="builtin", split="train", seq_len=seq_len), tokenizer).ids
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            report = train_tiny_model(model, windows, steps=train_steps, seconds=train_seconds, seed=seed)
        log.info("trained %d steps in %.0f s (train loss %.3f)", report.steps, report.seconds,
                 report.final_train_loss)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    atomic_write_json(out / "esa_tiny.json", {"arch": arch, "seed": seed, "vocab_size": vocab_size,
                                              "size": asdict(size), "n_params": n_params,
                                              "train": asdict(report), "train_seq_len": seq_len})
    return out


def builtin_tiny_model(arch: str = "llama", train_steps: int = BUILTIN_TRAIN_STEPS, seed: int = 0) -> Path:
    """The demo's trained tiny model, built once and cached (key: arch, steps, seed, corpus)."""
    key = hashlib.sha256(json.dumps([arch, train_steps, seed, corpus.builtin_fingerprint("train", 8_000_000),
                                     asdict(TinySize())]).encode()).hexdigest()[:12]
    path = cache_dir() / "models" / f"tiny-{arch}-{key}"
    with _build_lock(path):
        if not (path / "esa_tiny.json").exists():
            log.info("building the built-in tiny %s model (once; cached at %s)", arch, path)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
            write_tiny_model(arch, tmp, seed=seed, train_steps=train_steps)
            if path.exists():  # a half-written folder from a killed build
                import shutil

                shutil.rmtree(path)
            tmp.replace(path)
    return path


def builtin_planted_model(arch: str = "llama", train_steps: int = BUILTIN_TRAIN_STEPS, seed: int = 0) -> Path:
    """The built-in model with a planted cancelling pair (esa:tiny-<arch>-planted), built once and cached.

    A copy of :func:`builtin_tiny_model` with :func:`esa.model.planting.plant_super_weight` applied at
    PLANTED (V = 10⁴ times the largest |W| of that down projection); PLANTED_FILE next to the weights
    names the two planted weights, which the jobs record with the model (LoadedModel.describe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esa.model.planting import DEFAULT_RELATIVE_MAGNITUDE, plant_super_weight

    base = builtin_tiny_model(arch, train_steps, seed)
    path = base.with_name(f"{base.name}-planted")
    with _build_lock(path):
        if not (path / PLANTED_FILE).exists():
            quiet_transformers()
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            weights = plant_super_weight(model, **PLANTED)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
            (tmp / "esa_tiny.json").write_text((base / "esa_tiny.json").read_text())
            atomic_write_json(tmp / PLANTED_FILE, {
                "weights": weights, **PLANTED, "relative_magnitude": DEFAULT_RELATIVE_MAGNITUDE,
                "base_model": base.name, "construction": "esa.model.planting.plant_super_weight"})
            if path.exists():
                import shutil

                shutil.rmtree(path)
            tmp.replace(path)
            log.info("planted %s in a copy of the built-in tiny %s (%s)", ", ".join(weights), arch, path)
    return path
