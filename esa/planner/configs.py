"""Find and read a model's config.json without torch, transformers or huggingface_hub.

A model is named by one of the bundled short names (published configs of the seed models in
esa/model/configs/<name>/config.json), a local model folder, or a hub id whose snapshot is in
the local Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from esa.core.errors import UserError

# Short name -> the hub id whose published config.json the bundled file reproduces.
BUNDLED: dict[str, str] = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "phi-3-mini-4k": "microsoft/Phi-3-mini-4k-instruct",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "pythia-1.4b": "EleutherAI/pythia-1.4b",
    "gpt2": "openai-community/gpt2",
}


def bundled_config_dir(name: str) -> Path:
    """The folder holding the bundled config.json of short name `name`."""
    if name not in BUNDLED:
        raise UserError(f"no bundled config '{name}'; bundled: {', '.join(BUNDLED)}")
    return Path(__file__).resolve().parent.parent / "model" / "configs" / name


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, following the library's environment variables."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def cached_config_path(model_id: str, revision: str | None = None) -> Path | None:
    """config.json of hub id `model_id` in the local cache (the revision's snapshot), or None."""
    repo = hub_cache_dir() / ("models--" + model_id.replace("/", "--"))
    if not repo.is_dir():
        return None
    ref = revision or "main"
    commit = ref
    ref_file = repo / "refs" / ref
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
    candidate = repo / "snapshots" / commit / "config.json"
    if candidate.is_file():
        return candidate
    if revision is None:  # no refs/main (e.g. a copied cache): take the only snapshot there is
        snaps = sorted((repo / "snapshots").glob("*/config.json")) if (repo / "snapshots").is_dir() else []
        if len(snaps) == 1:
            return snaps[0]
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"model config {path} is not a JSON object")
    return data


def load_config(model: str | dict[str, Any], revision: str | None = None) -> dict[str, Any]:
    """The config dict of a bundled short name, a local folder / config.json file, or a
    cached hub id (a dict is returned as is). Raises UserError naming where it looked."""
    if isinstance(model, dict):
        return model
    if model.startswith("esa:tiny-"):
        raise UserError("the built-in tiny models (esa:tiny-*) have ~1.3M parameters and fit anywhere; "
                        "the planner is for real models")
    if model in BUNDLED:
        return _read(bundled_config_dir(model) / "config.json")
    by_hub_id = {v.lower(): k for k, v in BUNDLED.items()}
    path = Path(os.path.expanduser(model))
    if path.is_file():
        return _read(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder '{model}' has no config.json")
        return _read(path / "config.json")
    cached = cached_config_path(model, revision)
    if cached is not None:
        return _read(cached)
    if model.lower() in by_hub_id:
        return _read(bundled_config_dir(by_hub_id[model.lower()]) / "config.json")
    raise UserError(f"model '{model}' is not a bundled name ({', '.join(BUNDLED)}), a local folder, "
                    f"or a hub id in the local Hugging Face cache ({hub_cache_dir()})")
