"""Steps several phases share: load the model and the windows a manifest names."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from esa.data import Windows, load_windows
from esa.errors import UserError
from esa.logs import get_logger
from esa.manifest import data_spec, model_spec
from esa.models import LoadedModel, load_model, max_positions

log = get_logger("phases")


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's legacy global RNG."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model_and_windows(manifest: dict[str, Any]) -> tuple[LoadedModel, Windows, int]:
    """Model, tokenised windows and batch size of a manifest; seq_len defaults to min(2048, context)."""
    spec, batch_size = data_spec(manifest)
    loaded = load_model(model_spec(manifest))
    context = max_positions(loaded.model)
    if spec.seq_len is None or spec.seq_len <= 0:
        spec = replace(spec, seq_len=min(2048, context or 2048))
    if context is not None and spec.seq_len > context:
        raise UserError(f"--seq-len {spec.seq_len} exceeds the model's context of {context} tokens")
    windows = load_windows(spec, loaded.tokenizer)
    log.info("data: %s windows of %d tokens (%s of %d available)", windows.ids.shape[0], spec.seq_len,
             spec.dataset, windows.n_windows_available)
    return loaded, windows, batch_size
