"""Perturbations of individual weights, applied in place and undone bit-exactly.

A :class:`Perturbation` maps the stored values of the target weights (a 1-D tensor of k
elements, in the parameter's own dtype) to new values. :func:`apply_perturbation` gathers
those k values per tensor, keeps them, writes the new ones with advanced indexing under
``torch.no_grad()`` and returns an :class:`AppliedPerturbation` whose ``restore()`` writes the
kept values back. Both writes go through the integer view of the stored dtype, so the
restored tensor is bit-identical (NaN payloads and -0.0 included). Extra memory is O(k):
neither the model nor a whole tensor is ever copied.

Random draws (noise, which targets and bits to flip) come from a seeded CPU
``torch.Generator`` and the arithmetic runs on CPU in float64 before one rounding to the
stored dtype, so a result does not depend on the device the model sits on.

On an FSDP2-sharded model every rank calls the same function with the same targets and seed:
the k old values are assembled on every rank (the owner of each coordinate contributes its
stored bits, the others zeros, summed over the ranks: exact for any bit pattern), every rank
makes the same draws, and each writes only the coordinates it holds into its local shard (the
storage the next all-gather reads). Records and results equal the unsharded run's.

Adding a perturbation is one class here, its parameters in esa.spec.params and its entry in
esa.spec.names.PERTURBATIONS.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from esa.core.errors import UserError
from esa.parallel.env import all_sum
from esa.parallel.fsdp import is_dtensor, local_data, local_index
from esa.perturb.targets import WeightTarget
from esa.spec.manifest import PerturbationSpec
from esa.spec.names import PERTURBATIONS
from esa.spec.params import (BitFlipParams, GaussNoiseParams, PerturbationParams, ScaleParams, SignFlipParams,
                             ZeroParams, perturbation_params)

__all__ = [
    "Perturbation", "AppliedPerturbation", "get_perturbation", "perturbation_from_spec", "apply_perturbation",
    "perturbed", "cpu_generator", "int_view_dtype", "set_bits",
]

# Integer type of the same width as each float type: bit flips happen on this view.
_INT_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    """The signed integer dtype of the same width as a floating dtype (fp32 -> int32, ...)."""
    if dtype not in _INT_VIEW:
        raise UserError(f"cannot perturb weights stored as {dtype}; supported: float32, "
                        "float64, bfloat16, float16")
    return _INT_VIEW[dtype]


def cpu_generator(seed: int) -> torch.Generator:
    """A seeded CPU generator: the source of every random draw of perturbations and controls."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


def set_bits(old: torch.Tensor, new: torch.Tensor) -> list[list[int]]:
    """Per element, the bit positions (0 = least significant) where ``old`` and ``new`` differ."""
    itype = int_view_dtype(old.dtype)
    nbits = torch.iinfo(itype).bits
    diff = (old.reshape(-1).view(itype) ^ new.reshape(-1).view(itype)).to(torch.int64).tolist()
    mask = (1 << nbits) - 1
    return [[b for b in range(nbits) if (d & mask) >> b & 1] for d in diff]


class Perturbation(ABC):
    """One kind of weight perturbation, with its typed parameters (esa.spec.params)."""

    name: ClassVar[str] = ""
    params_type: ClassVar[type[PerturbationParams]] = PerturbationParams

    def __init__(self, params: PerturbationParams | None = None) -> None:
        self.p = params if params is not None else self.params_type()

    @abstractmethod
    def new_values(self, old: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Map k stored values (1-D, CPU, stored dtype) to k new values of the same dtype."""

    def select(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """Boolean mask of the k targets this perturbation hits (default: all of them)."""
        return torch.ones(k, dtype=torch.bool)

    def params(self) -> dict[str, Any]:
        """The parameters, JSON-serialisable (for result files)."""
        return self.p.to_dict()

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., "params": {...}}`` for result files."""
        return {"name": self.name, "params": self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _round_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 values once to ``dtype``."""
    return values.to(dtype)


class Zero(Perturbation):
    """w -> 0 (positive zero)."""

    name = "zero"
    params_type = ZeroParams

    def new_values(self, old: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.zeros_like(old)


class SignFlip(Perturbation):
    """w -> -s*w (s = 1: exact negation, only the sign bit changes)."""

    name = "sign_flip"
    params_type = SignFlipParams
    p: SignFlipParams

    def new_values(self, old: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _round_to(old.to(torch.float64) * -self.p.scale, old.dtype)


class Scale(Perturbation):
    """w -> s*w, rounded once to the stored dtype."""

    name = "scale"
    params_type = ScaleParams
    p: ScaleParams

    def new_values(self, old: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _round_to(old.to(torch.float64) * self.p.scale, old.dtype)


class GaussNoise(Perturbation):
    """w -> w + sigma*|w|*eps (mode 'relative', default) or w + sigma*eps ('absolute'),
    eps ~ N(0, 1) drawn independently per target from the generator."""

    name = "gauss_noise"
    params_type = GaussNoiseParams
    p: GaussNoiseParams

    def new_values(self, old: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        w = old.to(torch.float64)
        eps = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        step = self.p.sigma * eps * (w.abs() if self.p.mode == "relative" else 1.0)
        return _round_to(w + step, old.dtype)


class BitFlip(Perturbation):
    """Flip bits of the stored bit pattern (fp32: 32 bits, bf16/fp16: 16 bits).

    ``bit_index`` i flips that bit (0 = least significant mantissa bit, top = sign bit);
    otherwise ``bits`` N distinct random positions per target. ``prob`` p hits a fraction of
    the targets: round(p*k) of them (at least one when p > 0), chosen by the generator.
    """

    name = "bit_flip"
    params_type = BitFlipParams
    p: BitFlipParams

    def select(self, k: int, generator: torch.Generator) -> torch.Tensor:
        n_hit = int(math.floor(self.p.prob * k + 0.5))
        if self.p.prob > 0 and k > 0:
            n_hit = max(n_hit, 1)
        mask = torch.zeros(k, dtype=torch.bool)
        if n_hit >= k:
            mask[:] = True
        elif n_hit > 0:
            mask[torch.randperm(k, generator=generator)[:n_hit]] = True
        return mask

    def new_values(self, old: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        itype = int_view_dtype(old.dtype)
        nbits = torch.iinfo(itype).bits
        k = old.numel()
        if self.p.bit_index is not None:
            if self.p.bit_index >= nbits:
                raise UserError(f"bit_index {self.p.bit_index} out of range for {old.dtype} "
                                f"({nbits} bits: 0..{nbits - 1})")
            positions = torch.full((k, 1), self.p.bit_index, dtype=torch.int64)
        else:
            if self.p.bits > nbits:
                raise UserError(f"cannot flip {self.p.bits} distinct bits of a {nbits}-bit "
                                f"{old.dtype}")
            # N distinct positions per target: the first N of a random permutation of 0..nbits-1.
            keys = torch.rand((k, nbits), generator=generator, dtype=torch.float64)
            positions = keys.argsort(dim=1)[:, : self.p.bits]
        mask = (torch.ones_like(positions) << positions).sum(dim=1)  # int64, distinct bits
        # Two's complement of the same width, so that the top (sign) bit fits the int view.
        mask = torch.where(mask >= (1 << (nbits - 1)), mask - (1 << nbits), mask).to(itype)
        return (old.view(itype) ^ mask).view(old.dtype)


def get_perturbation(name: str, **params: Any) -> Perturbation:
    """Build a perturbation by name or alias (esa.spec.names.PERTURBATIONS) with its parameters;
    unknown names or parameters raise UserError listing the valid ones."""
    typed = perturbation_params(name, params)
    cls = PERTURBATIONS.load(typed.kind)
    return cls(typed)


def perturbation_from_spec(spec: PerturbationSpec) -> Perturbation:
    """The perturbation a manifest's perturbation section describes."""
    return PERTURBATIONS.load(spec.name)(spec.params)


@dataclass
class _Group:
    """The targets of one parameter tensor, as applied."""

    data: torch.Tensor  # this rank's storage of the parameter: a flat view when contiguous, else as is
    positions: list[int]  # positions of these targets in the target list
    owned: torch.Tensor  # which of the group's targets this rank holds (all of them unsharded)
    index: tuple[torch.Tensor, ...]  # LongTensors indexing `data` at the owned targets, on its device
    old: torch.Tensor  # k stored values (CPU, stored dtype), the same on every rank
    new: torch.Tensor  # k new values (CPU, stored dtype)

    def write(self, values: torch.Tensor) -> None:
        """Write the owned targets' entries of ``values`` (k values) into the storage."""
        _write(self.data, self.index, values[self.owned])


@dataclass
class AppliedPerturbation:
    """A perturbation in effect on a model; ``restore()`` undoes it bit-exactly."""

    perturbation: Perturbation
    targets: list[WeightTarget]
    groups: list[_Group] = field(default_factory=list)
    restored: bool = False

    def restore(self) -> None:
        """Write the kept original values back (idempotent)."""
        if self.restored:
            return
        with torch.no_grad():
            for g in reversed(self.groups):
                g.write(g.old)
        self.restored = True

    @property
    def n_original_values(self) -> int:
        """How many original values are kept (equals the number of targets: O(k) memory)."""
        return sum(g.old.numel() for g in self.groups)

    def changed(self) -> list[bool]:
        """Per target (in target order), whether its bit pattern changed."""
        out = [False] * len(self.targets)
        for g in self.groups:
            itype = int_view_dtype(g.old.dtype)
            diff = (g.old.view(itype) != g.new.view(itype)).tolist()
            for pos, d in zip(g.positions, diff):
                out[pos] = bool(d)
        return out

    def records(self) -> list[dict[str, Any]]:
        """Per target (in target order): weight name, old and new value, flipped bit positions.

        Values are Python floats and may be inf/nan after a bit flip; bits lists the
        positions (0 = least significant) where the stored bit patterns differ.
        """
        out: list[dict[str, Any]] = [{} for _ in self.targets]
        for g in self.groups:
            bits = set_bits(g.old, g.new)
            for j, pos in enumerate(g.positions):
                out[pos] = {"weight": self.targets[pos].name,
                            "old": float(g.old[j]), "new": float(g.new[j]), "bits": bits[j]}
        return out


def _write(data: torch.Tensor, index: tuple[torch.Tensor, ...], values: torch.Tensor) -> None:
    """Write ``values`` at ``index`` through the integer view: an exact bit copy."""
    itype = int_view_dtype(data.dtype)
    data.view(itype)[index] = values.view(itype).to(data.device)


def _locate(param: torch.Tensor, targets: list[WeightTarget]
            ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(storage, owned, index): the tensor to index (a flat view of a contiguous unsharded
    parameter, which also covers 0-D ones; a sharded one's local shard), which targets this rank
    holds, and their index tensors in the storage."""
    if not is_dtensor(param):
        data = param.data
        owned = torch.arange(len(targets))
        if data.is_contiguous():
            flat = torch.tensor([t.flat_index for t in targets], dtype=torch.int64)
            return data.view(-1), owned, (flat.to(data.device),)
        rows = torch.tensor([t.index for t in targets], dtype=torch.int64)
        return data, owned, tuple(rows[:, d].to(data.device) for d in range(rows.shape[1]))
    data = local_data(param)
    mine = [(j, li) for j, t in enumerate(targets) if (li := local_index(param, t.index)) is not None]
    owned = torch.tensor([j for j, _ in mine], dtype=torch.int64)
    rows = torch.tensor([li for _, li in mine], dtype=torch.int64).reshape(len(mine), param.ndim)
    return data, owned, tuple(rows[:, d].to(data.device) for d in range(param.ndim))


def _read_old(param: torch.Tensor, data: torch.Tensor, owned: torch.Tensor,
              index: tuple[torch.Tensor, ...], k: int) -> torch.Tensor:
    """The k stored values (CPU), on every rank: a sharded tensor's owners contribute their bits."""
    values = data[index].to("cpu")
    if not is_dtensor(param):
        return values
    itype = int_view_dtype(param.dtype)
    bits = torch.zeros(k, dtype=torch.int64)
    bits[owned] = values.view(itype).to(torch.int64)
    all_sum(bits)  # one owner per coordinate, zeros elsewhere: the sum is its bit pattern
    return bits.to(itype).view(param.dtype)  # narrowing keeps the low bits: the original pattern


def _named_params(model: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        return dict(model.named_parameters())
    return model


def apply_perturbation(
    model: Any,
    targets: Sequence[WeightTarget],
    perturbation: Perturbation,
    generator: torch.Generator | None = None,
) -> AppliedPerturbation:
    """Perturb the target weights of ``model`` (a module or a name->tensor mapping) in place
    (a sharded model: on every rank, with the same arguments).

    Targets are grouped by tensor (in order of first appearance); random draws follow that
    order, so a seed and a target list give one result on any device (no generator: seed
    0). Returns the record whose ``restore()`` undoes the change exactly; see
    :func:`perturbed` for a context manager. Raises UserError for unknown parameters or duplicate targets.
    """
    generator = generator if generator is not None else cpu_generator(0)
    params = _named_params(model)
    targets = list(targets)
    by_param: dict[str, list[int]] = {}
    seen: set[tuple[str, int]] = set()
    for pos, t in enumerate(targets):
        if t.param not in params:
            raise UserError(f"target {t.name!r}: the model has no parameter {t.param!r}")
        shape = tuple(params[t.param].shape)
        if len(t.index) != len(shape) or not 0 <= t.flat_index < params[t.param].numel():
            raise UserError(f"target {t.name!r} does not fit {t.param!r} of shape {shape}")
        if (t.param, t.flat_index) in seen:
            raise UserError(f"target {t.name!r} is listed twice; a weight is perturbed once")
        seen.add((t.param, t.flat_index))
        by_param.setdefault(t.param, []).append(pos)

    hit = perturbation.select(len(targets), generator)
    applied = AppliedPerturbation(perturbation, targets)
    try:
        with torch.no_grad():
            for name, positions in by_param.items():
                param = params[name]
                itype = int_view_dtype(param.dtype)  # refuses integer / exotic dtypes clearly
                data, owned, index = _locate(param, [targets[p] for p in positions])
                old = _read_old(param, data, owned, index, len(positions))
                sel = hit[positions]
                new = old.clone()
                if bool(sel.any()):
                    new.view(itype)[sel] = perturbation.new_values(old[sel], generator).view(itype)
                group = _Group(data, positions, owned, index, old, new)
                group.write(new)
                applied.groups.append(group)
    except BaseException:
        applied.restore()  # leave the model as it was if anything fails half way
        raise
    return applied


@contextmanager
def perturbed(
    model: Any,
    targets: Sequence[WeightTarget],
    perturbation: Perturbation,
    generator: torch.Generator | None = None,
) -> Iterator[AppliedPerturbation]:
    """Context manager: the targets are perturbed inside the block and restored on exit,
    also when the block raises."""
    applied = apply_perturbation(model, targets, perturbation, generator)
    try:
        yield applied
    finally:
        applied.restore()
