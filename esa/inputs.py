"""Steps several phases share: seed the job and load the model and windows its manifest names."""

from __future__ import annotations

from dataclasses import replace

import torch

from esa.core.errors import UserError
from esa.core.logs import get_logger
from esa.data.windows import Windows, load_windows
from esa.model.loading import LoadedModel, load_model, max_positions
from esa.parallel.env import sharded
from esa.spec.manifest import DataSpec, Manifest, ModelSpec

log = get_logger("inputs")


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's legacy global RNG."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_seq_len(spec: DataSpec, model: object) -> DataSpec:
    """The data spec with seq_len filled (default min(2048, the model's context)) and checked."""
    context = max_positions(model)
    if spec.seq_len is None:
        spec = replace(spec, seq_len=min(2048, context or 2048))
    if context is not None and spec.seq_len is not None and spec.seq_len > context:
        raise UserError(f"--seq-len {spec.seq_len} exceeds the model's context of {context} tokens")
    return spec


def load_for_job(spec: ModelSpec) -> LoadedModel:
    """The model of a job: sharded over the ranks when the job has several (FSDP2), else whole."""
    if sharded():
        from esa.parallel.fsdp import load_sharded

        return load_sharded(spec)
    return load_model(spec)


def load_model_and_windows(manifest: Manifest) -> tuple[LoadedModel, Windows]:
    """Model and tokenised windows of a manifest."""
    loaded = load_for_job(manifest.model)
    spec = resolve_seq_len(manifest.data, loaded.model)
    windows = load_windows(spec, loaded.tokenizer)
    log.info("data: %s windows of %d tokens (%s of %d available)", windows.ids.shape[0], spec.seq_len,
             spec.dataset, windows.n_windows_available)
    return loaded, windows
