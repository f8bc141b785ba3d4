"""Evaluation and calibration data: documents -> one token stream -> fixed-length windows.

Convention (the one GPTQ and Wanda results use): documents are joined with "\\n\\n", tokenised
once without added special tokens, and cut into non-overlapping windows of `seq_len` tokens;
the remainder is dropped. `max_samples` keeps the first K windows. Windows are cached on disk
(key: tokenizer, data, seq_len) so a second run does not tokenise again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esa.data import corpus
from esa.core.errors import UserError
from esa.core.logs import get_logger
from esa.core.paths import cache_dir
from esa.spec.manifest import DataSpec

log = get_logger("data")

LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_CACHE_FORMAT = 1


@dataclass
class Windows:
    """Tokenised windows plus what a reader needs to judge them."""

    ids: torch.Tensor  # LongTensor [n_windows, seq_len]
    n_windows_available: int  # before max_samples
    n_tokens_stream: int  # tokens in the joined stream (before dropping the remainder)
    fingerprint: str
    cache_hit: bool

    def info(self) -> dict[str, Any]:
        """JSON-ready description of the windows."""
        return {"n_windows": int(self.ids.shape[0]), "seq_len": int(self.ids.shape[1]),
                "n_windows_available": self.n_windows_available,
                "n_tokens_stream": self.n_tokens_stream, "fingerprint": self.fingerprint,
                "cache_hit": self.cache_hit}


def _is_local(dataset: str) -> bool:
    return os.path.exists(dataset) or Path(dataset).suffix.lower() in LOCAL_SUFFIXES


def _local_files(path: Path) -> list[Path]:
    if not path.exists():
        raise UserError(f"dataset path '{path}' does not exist")
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise UserError(f"dataset file '{path}' has an unsupported type; use "
                            f"{', '.join(sorted(LOCAL_SUFFIXES))}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise UserError(f"dataset folder '{path}' holds no {', '.join(sorted(LOCAL_SUFFIXES))} files")
    return files


def check_data_source(spec: DataSpec) -> None:
    """Fail early (before any model is loaded) when a local dataset path is missing or unusable.

    The built-in corpus always exists; hub datasets are checked when they are loaded."""
    if spec.dataset != "builtin" and _is_local(spec.dataset):
        _local_files(Path(spec.dataset))


def _texts_from_table(table: Any, field: str, where: str) -> list[str]:
    columns = list(table.column_names)
    if field not in columns:
        raise UserError(f"dataset {where} has no text field '{field}' (its fields: "
                        f"{', '.join(columns) or 'none'}); choose one with --text-field")
    return ["" if t is None else str(t) for t in table[field]]


def _load_with_datasets(*args: Any, **kwargs: Any) -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets.load_dataset(*args, **kwargs)


def load_documents(spec: DataSpec) -> tuple[list[str], str]:
    """Read the documents of `spec` and a fingerprint of their content for the cache key."""
    if spec.dataset == "builtin":
        split = spec.resolved_split()
        return corpus.builtin_documents(split), corpus.builtin_fingerprint(split)
    if _is_local(spec.dataset):
        docs: list[str] = []
        digest = hashlib.sha256()
        for path in _local_files(Path(spec.dataset)):
            digest.update(str(path).encode() + b"\0" + path.read_bytes())
            kind = LOCAL_SUFFIXES[path.suffix.lower()]
            if kind == "text":
                docs.append(path.read_text(encoding="utf-8", errors="replace"))
                continue
            try:
                table = _load_with_datasets(kind, data_files=str(path), split="train")
            except Exception as exc:  # datasets raises many types for unreadable files
                raise UserError(f"could not read '{path}': {str(exc).splitlines()[0]}") from exc
            docs.extend(_texts_from_table(table, spec.text_field, f"'{path}'"))
        return docs, f"local:{digest.hexdigest()}:{spec.text_field}"
    split = spec.resolved_split()
    try:
        table = _load_with_datasets(spec.dataset, spec.config, split=split)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load dataset '{spec.dataset}' (config {spec.config}, split "
                        f"{split}): {msg}") from exc
    where = f"'{spec.dataset}' ({spec.config}, {split})"
    fingerprint = getattr(table, "_fingerprint", None) or f"{spec.dataset}:{spec.config}:{split}"
    return _texts_from_table(table, spec.text_field, where), f"hub:{fingerprint}:{spec.text_field}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normalisation)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenize_stream(tokenizer: Any, documents: list[str]) -> np.ndarray:
    """Join documents with blank lines and tokenise once, without special tokens."""
    text = "\n\n".join(documents)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def cut_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of `seq_len` tokens; the remainder is dropped."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def load_windows(spec: DataSpec, tokenizer: Any, use_cache: bool = True) -> Windows:
    """Tokenised windows of `spec`, from the on-disk cache when the same data was seen before."""
    documents, data_fp = load_documents(spec)
    key_src = json.dumps({"format": _CACHE_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer),
                          "data": data_fp, "seq_len": spec.seq_len}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    path = cache_dir() / "windows" / f"{key}.npz"
    cache_hit = False
    if use_cache and path.exists():
        with np.load(path) as cached:
            windows, n_stream = cached["windows"], int(cached["n_stream"])
        cache_hit = True
        log.info("tokenised windows from cache %s", path)
    else:
        stream = tokenize_stream(tokenizer, documents)
        windows, n_stream = cut_windows(stream, spec.seq_len), len(stream)
        if use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, windows=windows.astype(np.int32), n_stream=np.int64(n_stream))
            os.replace(tmp, path)
    if len(windows) == 0:
        raise UserError(f"--seq-len {spec.seq_len} is longer than the data: dataset "
                        f"'{spec.dataset}' has only {n_stream} tokens")
    available = len(windows)
    if spec.max_samples is not None:
        windows = windows[: spec.max_samples]
    return Windows(ids=torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64)),
                   n_windows_available=available, n_tokens_stream=n_stream,
                   fingerprint=key, cache_hit=cache_hit)

