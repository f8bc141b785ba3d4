"""Data convention: join with blank lines, tokenise once without special tokens, cut windows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from esa.data import windows as data_mod
from esa.data.windows import DataSpec, load_documents, load_windows
from esa.core.errors import UserError

DOCS = [f"document {i}: " + " ".join(f"word{j}" for j in range(i * 7 % 40 + 5)) for i in range(30)]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def expected_windows(tok, docs, seq_len):
    ids = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def test_jsonl_windows_follow_the_convention(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    w = load_windows(DataSpec(dataset=str(path), seq_len=16), tok, use_cache=False)
    exp = expected_windows(tok, DOCS, 16)
    assert torch.equal(w.ids, exp)
    assert w.n_tokens_stream == len(tok("\n\n".join(DOCS), add_special_tokens=False)["input_ids"])
    assert w.n_tokens_stream - exp.numel() < 16  # only the remainder is dropped
    assert tok.bos_token_id not in w.ids[:, 0].tolist()  # no special tokens added


def test_txt_parquet_and_folder(tmp_path, tok):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(DOCS[0])
    pd.DataFrame({"body": DOCS[1:4]}).to_parquet(folder / "b.parquet")
    (folder / "c.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS[4:6]))
    docs, _ = load_documents(DataSpec(dataset=str(folder), text_field="body"))
    assert docs == DOCS[:6]
    single, _ = load_documents(DataSpec(dataset=str(folder / "a.txt")))
    assert single == [DOCS[0]]


def test_max_samples_takes_the_first_windows(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("\n\n".join(DOCS))
    full = load_windows(DataSpec(dataset=str(path), seq_len=8), tok, use_cache=False)
    first = load_windows(DataSpec(dataset=str(path), seq_len=8, max_samples=3), tok, use_cache=False)
    assert torch.equal(first.ids, full.ids[:3])
    assert first.n_windows_available == full.ids.shape[0]


def test_second_run_reads_the_cache(tmp_path, tok, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    spec = DataSpec(dataset=str(path), seq_len=12)
    first = load_windows(spec, tok)
    assert not first.cache_hit

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(data_mod, "tokenize_stream", no_tokenising)
    second = load_windows(spec, tok)
    assert second.cache_hit and torch.equal(first.ids, second.ids)
    # A different seq_len is a different cache key.
    with pytest.raises(AssertionError, match="tokenised again"):
        load_windows(DataSpec(dataset=str(path), seq_len=13), tok)


def test_builtin_splits_do_not_share_files():
    from esa.data.corpus import builtin_files

    train = set(builtin_files("train"))
    val = set(builtin_files("validation"))
    test = set(builtin_files("test"))
    assert val and test and len(train) > 10 * len(val)
    assert not train & val and not train & test and not val & test


def test_missing_text_field(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(UserError, match=r"no text field 'text' \(its fields: content\)"):
        load_windows(DataSpec(dataset=str(path), seq_len=8), tok)


def test_seq_len_longer_than_data(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("tiny")
    with pytest.raises(UserError, match="--seq-len 512 is longer than the data"):
        load_windows(DataSpec(dataset=str(path), seq_len=512), tok, use_cache=False)


def test_bad_settings_and_paths(tmp_path, tok):
    from esa.spec.manifest import Manifest

    # Settings are checked where every manifest is built (the schema), before any data is read.
    with pytest.raises(UserError, match=r"\$\.data\.max_samples: 0 is less than the minimum of 1"):
        Manifest.from_dict({"phase": 1, "model": {"id": "m"}, "data": {"seq_len": 8, "max_samples": 0},
                            "outputs": {"dir": str(tmp_path)}}, partial=True)
    with pytest.raises(UserError, match="does not exist"):
        load_windows(DataSpec(dataset=str(tmp_path / "nope.jsonl"), seq_len=8), tok)


def test_hub_dataset_offline_is_a_clear_error(tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load dataset 'esa-no-such-org/no-such-dataset'"):
        load_documents(DataSpec(dataset="esa-no-such-org/no-such-dataset", config="x"))


def test_windows_are_int64_and_contiguous(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("\n\n".join(DOCS))
    w = load_windows(DataSpec(dataset=str(path), seq_len=10), tok)
    assert w.ids.dtype == torch.int64 and w.ids.is_contiguous()
    assert np.array_equal(w.ids.numpy(), expected_windows(tok, ["\n\n".join(DOCS)], 10).numpy())
