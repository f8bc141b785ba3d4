"""Typed parameters of each perturbation: their defaults, their checks, and the CLI's spellings.

Torch-free, so plans, manifests and the schema know every perturbation's parameters without
loading a model; esa.perturb.perturbations builds the in-place operation from these objects.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from esa.core.errors import UserError
from esa.spec.fields import spec_field
from esa.spec.names import PERTURBATIONS

__all__ = ["PerturbationParams", "ZeroParams", "ScaleParams", "SignFlipParams", "GaussNoiseParams",
           "BitFlipParams", "PARAMS", "perturbation_params", "params_from_options"]


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise UserError(f"{what} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise UserError(f"{what} must be finite, got {value!r}")
    return out


@dataclass(frozen=True)
class PerturbationParams:
    """Base of the per-kind parameter records; `doc` describes the kind for the schema."""

    kind: ClassVar[str] = ""
    doc: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a manifest's ``perturbation.params``."""
        return asdict(self)


@dataclass(frozen=True)
class ZeroParams(PerturbationParams):
    """zero takes no parameters."""

    kind: ClassVar[str] = "zero"
    doc: ClassVar[str] = "zero (w -> 0) takes no parameters."


@dataclass(frozen=True)
class SignFlipParams(PerturbationParams):
    """w -> -s*w."""

    scale: float = spec_field(1.0, "The factor s.")
    kind: ClassVar[str] = "sign_flip"
    doc: ClassVar[str] = "sign_flip: w -> -s*w (s = 1: exact negation)."

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _finite(self.scale, "sign_flip scale"))


@dataclass(frozen=True)
class ScaleParams(PerturbationParams):
    """w -> s*w."""

    scale: float = spec_field(1.2, "The factor s.")
    kind: ClassVar[str] = "scale"
    doc: ClassVar[str] = "scale: w -> s*w, rounded once to the stored dtype."

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _finite(self.scale, "scale factor"))


NOISE_MODES = ("relative", "absolute")


@dataclass(frozen=True)
class GaussNoiseParams(PerturbationParams):
    """w -> w + sigma*|w|*eps (relative) or w + sigma*eps (absolute)."""

    sigma: float = spec_field(0.05, "Noise scale.", minimum=0)
    mode: str = spec_field("relative", "relative (to |w|) or absolute.", enum=NOISE_MODES)
    kind: ClassVar[str] = "gauss_noise"
    doc: ClassVar[str] = "gauss_noise: w -> w + sigma*|w|*eps (relative) or w + sigma*eps (absolute)."

    def __post_init__(self) -> None:
        sigma = _finite(self.sigma, "noise sigma")
        if sigma < 0:
            raise UserError(f"noise sigma must be >= 0, got {self.sigma!r}")
        if self.mode not in NOISE_MODES:
            raise UserError(f"unknown noise mode {self.mode!r}; valid: {', '.join(NOISE_MODES)}")
        object.__setattr__(self, "sigma", sigma)


MAX_BIT_INDEX = 31  # the widest weights esa loads are fp32


@dataclass(frozen=True)
class BitFlipParams(PerturbationParams):
    """Flip `bits` random bits per target, or the bit `bit_index`; hit a fraction `prob`."""

    bits: int = spec_field(1, "Distinct random bits flipped per target.", minimum=1)
    bit_index: int | None = spec_field(None, "Flip this bit (0 = least significant; at most 31 for fp32 weights, "
                                       "15 for bf16/fp16); null: random bits.", minimum=0, maximum=MAX_BIT_INDEX)
    prob: float = spec_field(1.0, "Fraction of the targets hit.", minimum=0, maximum=1)
    kind: ClassVar[str] = "bit_flip"
    doc: ClassVar[str] = ("bit_flip: flip bits of the stored bit pattern; bit_index fixes the bit, "
                          "otherwise `bits` random bits.")

    def __post_init__(self) -> None:
        bits, index = self.bits, self.bit_index
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise UserError(f"bit_flip bits must be a positive integer, got {bits!r}")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
            raise UserError(f"bit_flip bit_index must be a non-negative integer, got {index!r}")
        if index is not None and index > MAX_BIT_INDEX:
            raise UserError(f"bit_flip bit_index {index} is out of range: weights have at most 32 bits "
                            f"(0..{MAX_BIT_INDEX} for fp32, 0..15 for bf16/fp16)")
        if index is not None and bits != 1:
            raise UserError("bit_flip takes either bits (random positions) or bit_index, not both")
        prob = _finite(self.prob, "bit_flip prob")
        if not 0.0 <= prob <= 1.0:
            raise UserError(f"bit_flip prob must lie in [0, 1], got {self.prob!r}")
        object.__setattr__(self, "prob", prob)


PARAMS: dict[str, type[PerturbationParams]] = {
    cls.kind: cls for cls in (ZeroParams, SignFlipParams, ScaleParams, GaussNoiseParams, BitFlipParams)}
assert set(PARAMS) == set(PERTURBATIONS.names()), "every registered perturbation needs a parameter type"


def perturbation_params(name: str, params: dict[str, Any] | None = None) -> PerturbationParams:
    """The typed parameters of perturbation `name` (alias accepted), defaults filled.

    Unknown names or parameters raise UserError listing the valid ones."""
    kind = PERTURBATIONS.canonical(name)
    cls = PARAMS[kind]
    given = dict(params or {})
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise UserError(f"perturbation {kind!r} takes parameters {valid or 'none'}, got {sorted(given)}")
    return cls(**given)


def params_from_options(name: str, *, perturb_scale: float | None = None, scale: float | None = None,
                        noise_sigma: float | None = None, noise_mode: str | None = None,
                        bits: int | None = None, bit_index: int | None = None,
                        prob: float | None = None) -> PerturbationParams:
    """The parameters the CLI's options give perturbation `name`, taking only those that apply.

    ``perturb_scale`` (the runbook's ``--perturb-scale``) is s for sign_flip and scale and sigma
    for gauss_noise; ``scale`` / ``noise_sigma`` are the prototype's spellings. Unset (None)
    options keep the defaults; options that do not apply to the kind are ignored. Two different
    values for the same knob raise UserError.
    """
    kind = PERTURBATIONS.canonical(name)

    def one(what: str, *values: float | None) -> dict[str, float]:
        given = {float(v) for v in values if v is not None}
        if len(given) > 1:
            raise UserError(f"conflicting values for the {kind} {what}: {sorted(given)}")
        return {what: given.pop()} if given else {}

    params: dict[str, Any] = {}
    if kind in ("sign_flip", "scale"):
        params = one("scale", perturb_scale, scale)
    elif kind == "gauss_noise":
        params = one("sigma", perturb_scale, noise_sigma)
        if noise_mode is not None:
            params["mode"] = noise_mode
    elif kind == "bit_flip":
        if bit_index is not None:
            params["bit_index"] = int(bit_index)
        if bits is not None and not (bit_index is not None and bits == 1):
            params["bits"] = int(bits)
        if prob is not None:
            params["prob"] = float(prob)
    return perturbation_params(kind, params)
