"""Control sets: matched counts, exclusion, determinism, uniformity and the magnitude pool."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

import esa.perturb.controls as controls
from esa.perturb.controls import (bottom_k, magnitude_matched, magnitude_pool, random_k)
from esa.core.errors import UserError
from esa.perturb.perturbations import cpu_generator
from esa.profile.ranking import rank_scores
from esa.perturb.targets import WeightTarget, check_targets_against_shapes

# A 600M-element tensor given by shape only: drawing from it must not build a permutation.
SHAPES = {"a": (50, 40), "b": (7,), "big": (30000, 20000)}


def targets_for(shapes, refs) -> list[WeightTarget]:
    return check_targets_against_shapes(shapes, refs)


TARGETS = targets_for(SHAPES, ["a:0,0", "a:3,7", "a:49,39", "big:123,456", "b:0", "b:1", "b:2",
                               "big:29999,19999"])


def test_random_k_matched_distinct_excluded_deterministic() -> None:
    out = random_k(SHAPES, TARGETS, cpu_generator(0))
    assert Counter(t.param for t in out) == Counter(t.param for t in TARGETS)
    keys = [(t.param, t.flat_index) for t in out]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {(t.param, t.flat_index) for t in TARGETS}
    for t in out:
        assert t.flat_index == int(np.ravel_multi_index(t.index, SHAPES[t.param]))
    # Tensor b has 7 weights, 3 targets, 3 controls: drawn from the 4 non-targets.
    assert {t.index[0] for t in out if t.param == "b"} <= {3, 4, 5, 6}
    assert [t.name for t in random_k(SHAPES, TARGETS, cpu_generator(0))] == [t.name for t in out]
    assert [t.name for t in random_k(SHAPES, TARGETS, cpu_generator(1))] != [t.name for t in out]


def test_random_k_takes_module_or_tensors() -> None:
    model = torch.nn.Linear(6, 4)
    targets = targets_for({"weight": (4, 6)}, ["weight:0,0", "weight:1,1"])
    a = random_k(model, targets, cpu_generator(3))
    b = random_k(dict(model.named_parameters()), targets, cpu_generator(3))
    assert [t.name for t in a] == [t.name for t in b] and len(a) == 2


def test_random_k_refuses_too_many() -> None:
    targets = targets_for({"b": (7,)}, [f"b:{i}" for i in range(4)])
    with pytest.raises(UserError, match="cannot draw 4 control weights from 'b': it has 7 weights, "
                                        "4 of them targets"):
        random_k({"b": (7,)}, targets, cpu_generator(0))


@pytest.mark.parametrize("n,n_targets", [(10, 2), (100, 2)])  # permutation / rejection path
def test_random_k_is_uniform_over_non_targets(n, n_targets) -> None:
    shapes = {"w": (n,)}
    targets = targets_for(shapes, [f"w:{i}" for i in range(n_targets)])
    draws = 20 * (n - n_targets)
    gen = cpu_generator(42)
    counts: Counter[int] = Counter()
    for _ in range(draws):
        out = random_k(shapes, targets, gen)  # n_targets distinct controls per draw
        assert len({t.flat_index for t in out}) == n_targets
        counts.update(t.flat_index for t in out)
    assert set(counts) <= set(range(n_targets, n))
    # Every non-target weight has the same chance to be drawn (sampling without replacement
    # within a draw only lowers the variance, so the chi-square test is conservative).
    observed = [counts.get(i, 0) for i in range(n_targets, n)]
    assert stats.chisquare(observed).pvalue > 1e-4


def test_bottom_k_takes_least_sensitive_outside_targets() -> None:
    scores = {"a": torch.arange(20.0).reshape(4, 5), "b": torch.arange(100.0, 107.0)}
    bottom = rank_scores(scores, k=6, mode="global", largest=False)
    shapes = {"a": (4, 5), "b": (7,)}
    targets = targets_for(shapes, ["a:0,1", "b:6"])
    got = bottom_k(shapes, targets, bottom)
    assert [t.name for t in got] == ["a:0,0", "a:0,2"]  # a:0,1 (score 1) is a target
    got = bottom_k(shapes, targets, bottom, k=4)
    assert [t.name for t in got] == ["a:0,0", "a:0,2", "a:0,3", "a:0,4"]
    # Matched per tensor (per_layer rankings): b's own least sensitive entry.
    per_layer = rank_scores(scores, k=3, mode="per_layer", largest=False)
    got = bottom_k(shapes, targets, per_layer, per_tensor=True)
    assert [t.name for t in got] == ["a:0,0", "b:0"]
    # Plain lists of names work too.
    got = bottom_k(shapes, targets, ["a:0,1", "a:3,4", ("b", (2,))])
    assert [t.name for t in got] == ["a:3,4", "b:2"]
    with pytest.raises(UserError, match="has 1 weights outside the targets; 2 are needed"):
        bottom_k(shapes, targets, ["a:0,1", "a:3,4"])
    with pytest.raises(UserError, match="of 'b' outside the targets"):
        bottom_k(shapes, targets, ["a:1,1", "b:6"], per_tensor=True)


def brute_force_pool(tensor: torch.Tensor, size: int, exclude: set[int]) -> set[int]:
    mags = tensor.detach().abs().reshape(-1).double().numpy()
    mags[np.isnan(mags)] = -1.0  # a NaN weight is never "large"
    threshold = np.sort(mags)[::-1][size - 1]
    return {i for i in np.nonzero(mags >= threshold)[0].tolist() if i not in exclude}


def test_magnitude_matched_draws_only_from_top_pool() -> None:
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(60, 50, generator=g), "v": torch.randn(300, generator=g)}
    refs = ["w:0,0", "w:10,10", "w:20,20", "v:5"]
    targets = targets_for({k: tuple(p.shape) for k, p in params.items()}, refs)
    # Make one target the largest weight, so that excluding it matters.
    params["w"][0, 0] = 100.0
    excl = {"w": {0, 510, 1020}, "v": {5}}
    seen: dict[str, set[int]] = {"w": set(), "v": set()}
    for seed in range(30):
        out = magnitude_matched(params, targets, cpu_generator(seed), pool_factor=4, min_pool=8)
        assert Counter(t.param for t in out) == Counter({"w": 3, "v": 1})
        for t in out:
            seen[t.param].add(t.flat_index)
        assert len({(t.param, t.flat_index) for t in out}) == 4
    pool_w = brute_force_pool(params["w"], 12 + 3, excl["w"])  # max(4*3, 8) + 3 targets
    pool_v = brute_force_pool(params["v"], 8 + 1, excl["v"])  # max(4*1, 8) + 1 target
    assert seen["w"] <= pool_w and seen["v"] <= pool_v
    assert len(pool_w) >= 12 and len(pool_v) >= 8
    assert len(seen["w"]) > 6  # draws spread over the pool, not a fixed subset
    a = magnitude_matched(params, targets, cpu_generator(5))
    b = magnitude_matched(params, targets, cpu_generator(5))
    assert [t.name for t in a] == [t.name for t in b]


def test_magnitude_pool_chunked_with_ties_and_nan(monkeypatch) -> None:
    monkeypatch.setattr(controls, "_CHUNK", 7)  # many chunks: the merge must be right
    g = torch.Generator().manual_seed(1)
    t = torch.randn(101, generator=g).to(torch.bfloat16)  # bf16: ties are common
    t[3] = float("nan")
    t[50] = -t.abs().nan_to_num(0).max()  # a tie at the top with opposite sign
    for size in (1, 5, 20, 100):
        pool = magnitude_pool(t, size)
        assert pool.tolist() == sorted(pool.tolist())
        assert set(pool.tolist()) == brute_force_pool(t, size, set())
    assert set(magnitude_pool(t, 20, exclude=[50]).tolist()) == \
        brute_force_pool(t, 20, {50})
    ties = torch.ones(30)
    assert magnitude_pool(ties, 3).tolist() == list(range(30))  # every tied weight joins


def test_magnitude_matched_refuses_tiny_pool() -> None:
    params = {"b": torch.ones(3)}
    targets = targets_for({"b": (3,)}, ["b:0", "b:1"])
    with pytest.raises(UserError, match="pool outside the targets holds 1"):
        magnitude_matched(params, targets, cpu_generator(0))
