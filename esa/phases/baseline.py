"""Phase 1: the unmodified model's reference perplexity, NLL and token accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esa.evaluate import evaluate
from esa.io import atomic_write_json
from esa.logs import get_logger
from esa.phases.common import load_model_and_windows, seed_everything
from esa.runner import register_phase

log = get_logger("baseline")


@register_phase(1)
def run_baseline(manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    """Evaluate the model; writes eval.json and config.json into `out`."""
    seed_everything(int(manifest.get("seed", 0)))
    loaded, windows, batch_size = load_model_and_windows(manifest)
    result = evaluate(loaded.model, windows.ids.to(loaded.device), batch_size=batch_size, desc="baseline")
    record = {**result.to_dict(), "model": loaded.describe(), "data": windows.info(),
              "manifest_id": manifest["id"]}
    atomic_write_json(out / "eval.json", record)
    atomic_write_json(out / "config.json", loaded.model.config.to_dict())
    log.info("baseline: ppl %.4f, nll %.4f, token accuracy %.4f over %d tokens (%d windows)",
             result.ppl, result.nll, result.token_accuracy, result.n_tokens, result.n_windows)
    return {"ppl": result.ppl, "nll": result.nll, "token_accuracy": result.token_accuracy,
            "n_tokens": result.n_tokens, "n_windows": result.n_windows, "flags": result.flags,
            "eval_json": str(out / "eval.json")}
