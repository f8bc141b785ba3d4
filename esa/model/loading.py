"""Loading a causal LM and its tokenizer by hub id or local directory."""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from esa.core.errors import UserError
from esa.core.logs import get_logger, quiet_transformers
from esa.spec.manifest import ATTENTION, DEVICES, ModelSpec

log = get_logger("models")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


@dataclass
class LoadedModel:
    """A model ready for evaluation, with where it came from."""

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    source: str
    spec: ModelSpec

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for manifests and reports (with `planted`: the weights a planted
        model's esa_planted.json names, for a model built with a known super weight)."""
        out = {**asdict(self.spec), "resolved_device": str(self.device),
               "resolved_dtype": dtype_name(self.dtype), "source": self.source,
               "class": model_class_name(self.model),
               "n_parameters": sum(p.numel() for p in self.model.parameters())}
        planted = Path(self.source) / "esa_planted.json"
        if planted.is_file():
            import json

            out["planted"] = json.loads(planted.read_text()).get("weights", [])
        return out


def model_class_name(model: Any) -> str:
    """The model's own class name (FSDP2 wraps the class of a sharded model in a subclass of its own)."""
    return next(c.__name__ for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed"))


def dtype_name(dtype: torch.dtype) -> str:
    """bf16 / fp16 / fp32 for a torch dtype."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; asking for cuda without a GPU is an error."""
    if name not in DEVICES:
        raise UserError(f"unknown --device '{name}'; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible (use --device cpu)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 on GPU, fp32 on CPU; bf16/fp16/fp32 (and their long names) as given."""
    key = _DTYPE_ALIASES.get(name, name)
    if key == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if key not in DTYPES:
        raise UserError(f"unknown --dtype '{name}'; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[key]


BUILTIN_PREFIX = "esa:tiny-"
PLANTED_SUFFIX = "-planted"


def builtin_model_dir(model_id: str) -> Path:
    """`esa:tiny-<arch>`: the built-in tiny model, trained once on the built-in corpus and cached.

    ESA_TINY_STEPS sets its training steps (default esa.model.tiny.BUILTIN_TRAIN_STEPS); each value is
    cached separately.
    """
    from esa.model.tiny import ARCHS, BUILTIN_TRAIN_STEPS, builtin_planted_model, builtin_tiny_model

    arch = model_id[len(BUILTIN_PREFIX):]
    planted = arch.endswith(PLANTED_SUFFIX)
    arch = arch.removesuffix(PLANTED_SUFFIX)
    if arch not in ARCHS:
        raise UserError(f"unknown built-in model '{model_id}'; use esa:tiny-<arch> (or esa:tiny-<arch>-planted, "
                        f"with a planted super weight) with arch one of {', '.join(ARCHS)}")
    build = builtin_planted_model if planted else builtin_tiny_model
    return build(arch, train_steps=int(os.environ.get("ESA_TINY_STEPS", BUILTIN_TRAIN_STEPS)))


def _looks_like_path(model_id: str) -> bool:
    # A hub id is "name" or "org/name"; anything else that names a file-system location is a path.
    return (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
            or model_id.endswith("/") or os.sep != "/" and os.sep in model_id)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def locate_model(spec: ModelSpec) -> str:
    """A local directory, or a hub id that is loadable now; fails fast with a clear line.

    With HF_HUB_OFFLINE=1 a model missing from the cache fails at once (transformers would
    otherwise retry the network for tens of seconds before failing).
    """
    if spec.id.startswith(BUILTIN_PREFIX):
        return str(builtin_model_dir(spec.id))
    path = Path(os.path.expanduser(spec.id))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"model directory '{spec.id}' has no config.json (not a saved model)")
        return str(path)
    if path.exists() or _looks_like_path(spec.id):
        raise UserError(f"model path '{spec.id}' does not exist")
    if _offline():
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(spec.id, "config.json", revision=spec.revision)
        if not isinstance(cached, str):
            raise UserError(f"model '{spec.id}' is not in the local Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading it; "
                            f"fetch it where there is network (hf download {spec.id}) or pass a local directory")
    return spec.id


def _kwargs(spec: ModelSpec) -> dict[str, Any]:
    if spec.trust_remote_code:
        log.warning("trust_remote_code is on: the model's own Python code will run")
    attn = {} if spec.attention == "auto" else {"attn_implementation": spec.attention}
    return {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code, **attn}


def _failed(spec: ModelSpec, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"could not load model '{spec.id}': {first}")


def load_tokenizer(spec: ModelSpec, source: str) -> Any:
    """The model's tokenizer (UserError when it cannot be read)."""
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in _kwargs(spec).items() if k != "attn_implementation"}
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _failed(spec, exc) from exc


def from_pretrained(spec: ModelSpec, source: str, dtype: torch.dtype) -> Any:
    """The whole model, on the CPU, in eval mode (UserError when it cannot be read)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **_kwargs(spec))
    except pickle.UnpicklingError as exc:
        raise UserError(refused_pickle_line(spec.id, str(exc))) from None
    except (OSError, ValueError) as exc:
        raise _failed(spec, exc) from exc
    return model.eval()


def from_config_on_meta(spec: ModelSpec, source: str, dtype: torch.dtype) -> Any:
    """The model's structure without weights (on the meta device), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    kwargs = _kwargs(spec)
    try:
        config = AutoConfig.from_pretrained(source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _failed(spec, exc) from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=spec.trust_remote_code,
            **{k: v for k, v in kwargs.items() if k == "attn_implementation"})
    return model.eval()


def check_spec(spec: ModelSpec) -> None:
    """What a model spec can get wrong before anything is read."""
    if spec.attention not in ATTENTION:
        raise UserError(f"unknown --attention '{spec.attention}'; choose one of {', '.join(ATTENTION)}")


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model + tokenizer in eval mode on the resolved device and dtype (one process)."""
    check_spec(spec)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    source = locate_model(spec)
    tokenizer = load_tokenizer(spec, source)
    model = from_pretrained(spec, source, dtype)
    model.to(device)
    log.info("loaded %s (%s, %s, %s attention) on %s", spec.id, type(model).__name__,
             dtype_name(dtype), getattr(model.config, "_attn_implementation", "?"), device)
    return LoadedModel(model, tokenizer, device, dtype, source, spec)


def refused_pickle_line(model_id: str, text: str) -> str:
    """One line for a pickled checkpoint (pytorch_model.bin) that torch's weights-only loading refused."""
    import re

    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    what = f"an object ({found.group(1)})" if found else "objects"
    return (f"model '{model_id}': its pickled checkpoint (pytorch_model.bin) holds {what} that weights-only "
            "loading refuses, so nothing from it ran (safe); use a safetensors checkpoint, or convert this one "
            "where you trust its source")


def max_positions(model: Any) -> int | None:
    """The model's context length from its config, when it declares one."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
