"""The one registry of names (esa.spec.names): aliases, lists, errors, and lazy loading."""

from __future__ import annotations

import subprocess
import sys

import pytest

from esa.core.errors import UserError
from esa.spec.names import CONTROLS, METRICS, PERTURBATIONS, PHASES, phase_name


def test_parse_control_names() -> None:
    assert CONTROLS.parse_list("random_k,bottom_k") == ["random_k", "bottom_k"]
    assert CONTROLS.parse_list(["magnitude_matched", "random_k", "random_k"]) == [
        "magnitude_matched", "random_k"]
    with pytest.raises(UserError, match="unknown control 'top_k'"):
        CONTROLS.parse_list("random_k,top_k")


def test_aliases_resolve_and_unknown_names_list_the_valid_ones() -> None:
    assert METRICS.canonical("activation_magnitude") == "act_mag"
    assert PERTURBATIONS.canonical("bitflip") == "bit_flip"
    with pytest.raises(UserError, match="unknown metric 'grad_x_wieght'; valid metrics: ablation, act_mag, "):
        METRICS.canonical("grad_x_wieght")
    assert [phase_name(n) for n in (1, 2, 3)] == ["baseline", "profile", "perturb"]


def test_every_entry_loads_what_it_names() -> None:
    """Each "module:attr" imports and names a class (or function) of that name."""
    for registry in (METRICS, PERTURBATIONS, CONTROLS, PHASES):
        for entry in registry:
            target = registry.load(entry.name)
            assert target.__name__ == entry.target.split(":")[1], entry
    for entry in METRICS:
        assert METRICS.load(entry.name).name == entry.name
    for entry in PERTURBATIONS:
        assert PERTURBATIONS.load(entry.name).name == entry.name


def test_reading_names_imports_no_torch() -> None:
    code = ("import sys; from esa.spec.names import METRICS, PERTURBATIONS; METRICS.names(True); "
            "PERTURBATIONS.canonical('noise'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
