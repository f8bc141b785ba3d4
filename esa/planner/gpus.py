"""GPU presets (memory and dense peak FLOP/s) and byte-size parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass

from esa.core.errors import UserError

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model: memory as nvidia-smi reports it, dense (no sparsity) peak FLOP/s."""

    name: str
    memory_bytes: int
    bf16_flops: float  # dense bf16/fp16 tensor-core peak
    fp32_flops: float  # plain fp32 (PyTorch's default matmul precision, no TF32)

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for a model dtype (bf16/fp16 use tensor cores; fp32 does not)."""
        return self.fp32_flops if dtype == "fp32" else self.bf16_flops


GPU_PRESETS: dict[str, GpuSpec] = {
    "a100-40g": GpuSpec("a100-40g", 40960 * MIB, 312e12, 19.5e12),
    "a100-80g": GpuSpec("a100-80g", 81920 * MIB, 312e12, 19.5e12),
    "h100-80g": GpuSpec("h100-80g", 81559 * MIB, 989e12, 67e12),
    "h200": GpuSpec("h200", 143771 * MIB, 989e12, 67e12),
    "l40s": GpuSpec("l40s", 46068 * MIB, 362e12, 91.6e12),
}


def gpu_preset(name: str) -> GpuSpec:
    """The preset called `name` (case-insensitive); UserError lists the valid ones."""
    key = name.lower()
    if key not in GPU_PRESETS:
        raise UserError(f"unknown GPU preset '{name}'; choose one of {', '.join(GPU_PRESETS)}")
    return GPU_PRESETS[key]


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int | float) -> int:
    """'80G', '80GiB', '40960M', '1.5T' or a plain number of bytes -> bytes.

    Suffixes are binary (K = 2^10, M = 2^20, G = 2^30, T = 2^40), as in Slurm's --mem.
    """
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise UserError(f"'{text}' is not a memory size (examples: 80G, 40960M, 85899345920)")
        power = " kmgt".index(m.group(2).lower() or " ")
        value = int(float(m.group(1)) * (1 << (10 * power)))
    if value <= 0:
        raise UserError(f"a memory size must be positive, got '{text}'")
    return value
