"""The one registry of the names ESA accepts: metrics, perturbations, controls and phases.

Torch-free. Each entry names its implementation as ``"module:attr"``, imported only when
:meth:`Registry.load` asks for it, so the CLI's parser, the JSON Schema, plan expansion,
`make submit DRY_RUN=1` and the analysis read names and aliases without importing torch.
Adding a metric is one entry here plus its class.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from esa.core.errors import UserError

__all__ = ["Entry", "Registry", "METRICS", "PERTURBATIONS", "CONTROLS", "PHASES"]


@dataclass(frozen=True)
class Entry:
    """One registered name: its implementation (``"module:attr"``), aliases and a summary."""

    name: str
    target: str
    aliases: tuple[str, ...] = ()
    summary: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # kind-specific facts (e.g. a phase's number)


class Registry:
    """Names of one kind, their aliases, and lazy access to what they name."""

    def __init__(self, kind: str, entries: Iterable[Entry]) -> None:
        self.kind = kind
        self._entries = {e.name: e for e in entries}
        self._aliases = {a: e.name for e in self._entries.values() for a in e.aliases}

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def names(self, with_aliases: bool = False) -> list[str]:
        """Canonical names (sorted), followed by the accepted aliases (sorted) when asked."""
        names = sorted(self._entries)
        return names + sorted(self._aliases) if with_aliases else names

    def aliases(self) -> dict[str, str]:
        """alias -> canonical name."""
        return dict(self._aliases)

    def canonical(self, name: str) -> str:
        """The canonical name of `name` (aliases resolved); UserError listing the valid ones."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise UserError(f"unknown {self.kind} {name!r}; valid {self.kind}s: "
                        f"{', '.join(self.names(with_aliases=True))}")

    def parse_list(self, text: str | Iterable[str]) -> list[str]:
        """``"a,b"`` (or a list) -> canonical names in order, repeats dropped; unknown names raise."""
        items = text.split(",") if isinstance(text, str) else list(text)
        return list(dict.fromkeys(self.canonical(s.strip()) for s in items if s and s.strip()))

    def entry(self, name: str) -> Entry:
        """The entry of `name` or of the name it is an alias of."""
        return self._entries[self.canonical(name)]

    def load(self, name: str) -> Any:
        """Import and return what `name` names (the only place an implementation is imported)."""
        module, _, attr = self.entry(name).target.partition(":")
        return getattr(importlib.import_module(module), attr)


METRICS = Registry("metric", [
    Entry("magnitude", "esa.profile.metrics.magnitude:Magnitude", summary="|W|"),
    Entry("grad_x_weight", "esa.profile.metrics.gradient:GradXWeight",
          summary="|W ⊙ mean_b ∇W L_b| (first-order Taylor)"),
    Entry("grad_squared", "esa.profile.metrics.gradient:GradSquared",
          summary="mean_b (∇W L_b)² (empirical Fisher diagonal, batch level)"),
    Entry("hessian_diag", "esa.profile.metrics.curvature:HessianDiag",
          summary="|diag ∇²L| exactly, on candidates or tiny models"),
    Entry("hutchinson_diag", "esa.profile.metrics.curvature:HutchinsonDiag",
          summary="|mean_z z ⊙ Hz| (Hutchinson estimate of the Hessian diagonal)"),
    Entry("act_mag", "esa.profile.metrics.activation:ActMag", aliases=("activation_magnitude",),
          summary="|W_ij| · ‖X_j‖₂ (Wanda)"),
    Entry("super_weight", "esa.profile.metrics.super_weight:SuperWeight",
          summary="activation-spike detector (Yu et al. 2024)"),
    Entry("obd", "esa.profile.metrics.obd:OBD",
          summary="½·w²·|diag H| (Optimal Brain Damage; Hutchinson estimate, exact on candidates)"),
    Entry("fisher_obd", "esa.profile.metrics.obd:FisherOBD",
          summary="½·w²·F_ii, F the empirical Fisher (per batch, or per window with per_sample)"),
    Entry("ablation", "esa.perturb.ablation:Ablation",
          summary="exact ΔNLL when each candidate alone is perturbed (the ground truth)"),
])

PERTURBATIONS = Registry("perturbation", [
    Entry("zero", "esa.perturb.perturbations:Zero", summary="w -> 0"),
    Entry("sign_flip", "esa.perturb.perturbations:SignFlip", summary="w -> -s·w"),
    Entry("scale", "esa.perturb.perturbations:Scale", summary="w -> s·w"),
    Entry("gauss_noise", "esa.perturb.perturbations:GaussNoise", aliases=("gaussian", "noise"),
          summary="w -> w + σ·|w|·ε (relative) or w + σ·ε (absolute)"),
    Entry("bit_flip", "esa.perturb.perturbations:BitFlip", aliases=("bitflip",),
          summary="flip bits of the stored bit pattern"),
])

CONTROLS = Registry("control", [
    Entry("random_k", "esa.perturb.controls:random_k",
          summary="same per-tensor counts, uniformly random other weights"),
    Entry("bottom_k", "esa.perturb.controls:bottom_k",
          summary="the k least sensitive weights of the ranking (needs from_scores)"),
    Entry("magnitude_matched", "esa.perturb.controls:magnitude_matched",
          summary="random among the largest |W| of the same tensors"),
])

PHASES = Registry("phase", [
    Entry("baseline", "esa.baseline.phase:run_baseline", info={"number": 1},
          summary="the unmodified model's perplexity, NLL and token accuracy"),
    Entry("profile", "esa.profile.phase:run_profile", info={"number": 2},
          summary="score and rank every weight"),
    Entry("perturb", "esa.perturb.phase:run_perturb", info={"number": 3},
          summary="damage the top weights against matched controls"),
])


def phase_name(number: int) -> str:
    """baseline / profile / perturb for phase 1 / 2 / 3."""
    for entry in PHASES:
        if entry.info["number"] == number:
            return entry.name
    raise UserError(f"phase {number} is not one of 1, 2, 3")
