"""The set-up the CPU benchmarks share: a random-init GPT-2 small and random token windows.

Run the benchmarks as scripts (``python benchmarks/bench_x.py``): this folder is then first on
sys.path, so ``from gpt2_small import gpt2_small`` finds this file.
"""

from __future__ import annotations

from typing import Any


def gpt2_small(*, device: str, windows: int, seq: int, threads: int) -> tuple[Any, Any]:
    """(model, token ids [windows, seq]) on ``device``: GPT2Config() defaults, seeded, eval mode, quiet logs."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GPT2Config

    from esa.core.logs import setup_logging

    setup_logging(quiet=True)
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = GPT2Config()
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (windows, seq), generator=torch.Generator().manual_seed(1))
    return model, ids.to(device)
