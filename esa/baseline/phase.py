"""Phase 1: the unmodified model's reference perplexity, NLL and token accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esa.baseline.evaluate import evaluate
from esa.core.io import atomic_write_json
from esa.core.logs import get_logger
from esa.inputs import load_model_and_windows, seed_everything
from esa.parallel.env import is_rank0
from esa.results.records import EvalRecord, write_record
from esa.spec.manifest import BaselineManifest

log = get_logger("baseline")


def run_baseline(manifest: BaselineManifest, out: Path) -> dict[str, Any]:
    """Evaluate the model; writes eval.json and config.json into `out`."""
    seed_everything(manifest.seed)
    loaded, windows = load_model_and_windows(manifest)
    result = evaluate(loaded.model, windows.ids.to(loaded.device), batch_size=manifest.data.batch_size,
                      desc="baseline")
    if is_rank0():
        record = EvalRecord(**result.to_dict(), model=loaded.describe(), data=windows.info(), manifest_id=manifest.id)
        write_record(out, record)
        atomic_write_json(out / "config.json", loaded.model.config.to_dict())
    log.info("baseline: ppl %.4f, nll %.4f, token accuracy %.4f over %d tokens (%d windows)",
             result.ppl, result.nll, result.token_accuracy, result.n_tokens, result.n_windows)
    return {"ppl": result.ppl, "nll": result.nll, "token_accuracy": result.token_accuracy,
            "n_tokens": result.n_tokens, "n_windows": result.n_windows, "flags": result.flags,
            "eval_json": str(out / EvalRecord.FILE)}
