"""Perturbations: exact arithmetic on the stored bit patterns, bit-exact restore, O(k) memory."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from esa.core.errors import UserError
from esa.perturb.perturbations import (apply_perturbation, cpu_generator, get_perturbation, int_view_dtype,
                                        perturbed, set_bits)
from esa.spec.names import PERTURBATIONS
from esa.spec.params import params_from_options
from esa.perturb.targets import WeightTarget, flat_to_index

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NBITS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}
KINDS = [
    ("zero", {}),
    ("sign_flip", {}),
    ("sign_flip", {"scale": 0.5}),
    ("scale", {}),
    ("scale", {"scale": -3.0}),
    ("gauss_noise", {}),
    ("gaussian", {"sigma": 0.5, "mode": "absolute"}),
    ("noise", {"sigma": 0.01}),
    ("bit_flip", {}),
    ("bitflip", {"bits": 3}),
    ("bit_flip", {"bit_index": 14}),
    ("bit_flip", {"bits": 2, "prob": 0.5}),
]


def make_model(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A small module with 2-D and 1-D parameters and some awkward values."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Linear(9, 5, bias=False),
                                torch.nn.LayerNorm(5)).to(dtype)
    with torch.no_grad():
        w = model[0].weight
        w[0, 0], w[0, 1], w[0, 2] = -0.0, float("inf"), float("nan")
        w[0, 3] = torch.finfo(dtype).tiny / 4  # subnormal
        # A NaN with an unusual payload: restore must keep every bit, not just "a NaN".
        iv = w.view(int_view_dtype(dtype))
        iv[0, 4] = iv[0, 2] | 1
    return model


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 over names, shapes and the integer views of every tensor of the state dict."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().view(int_view_dtype(t.dtype)).numpy().tobytes())
    return h.hexdigest()


def random_targets(model: torch.nn.Module, rng: random.Random, k: int) -> list[WeightTarget]:
    params = dict(model.named_parameters())
    chosen: set[tuple[str, int]] = set()
    while len(chosen) < k:
        name = rng.choice(sorted(params))
        chosen.add((name, rng.randrange(params[name].numel())))
    return [WeightTarget(n, flat_to_index(f, params[n].shape), f) for n, f in sorted(chosen)]


def int_flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(int_view_dtype(t.dtype)).to(torch.int64)


def test_thousand_random_cycles_restore_bit_identical() -> None:
    models = {dt: make_model(dt, seed=i) for i, dt in enumerate(DTYPES)}
    hashes = {dt: state_hash(m) for dt, m in models.items()}
    rng = random.Random(1234)
    changed_any = 0
    for cycle in range(1000):
        dtype = DTYPES[cycle % len(DTYPES)]
        model = models[dtype]
        name, params = KINDS[rng.randrange(len(KINDS))]
        if dtype != torch.float32 and params.get("bit_index", 0) >= 16:
            params = {"bit_index": 15}
        targets = random_targets(model, rng, rng.randint(1, 12))
        applied = apply_perturbation(model, targets, get_perturbation(name, **params),
                                     cpu_generator(cycle))
        changed_any += any(applied.changed())
        if cycle % 2:
            # Stack a second perturbation on overlapping targets; undo in reverse order.
            second = apply_perturbation(model, targets[: max(1, len(targets) // 2)],
                                        get_perturbation("bit_flip", bits=2), cpu_generator(-cycle))
            second.restore()
        applied.restore()
        applied.restore()  # idempotent
        assert state_hash(model) == hashes[dtype], f"cycle {cycle}: {name} {params} on {dtype}"
    assert changed_any > 900  # the cycles did perturb something


def test_context_manager_restores_on_exception() -> None:
    model = make_model(torch.bfloat16)
    before = state_hash(model)
    targets = random_targets(model, random.Random(0), 5)
    with pytest.raises(RuntimeError):
        with perturbed(model, targets, get_perturbation("zero")) as applied:
            assert state_hash(model) != before
            assert all(r["new"] == 0.0 for r in applied.records())
            raise RuntimeError("evaluation failed")
    assert state_hash(model) == before


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,params", KINDS)
def test_only_target_coordinates_change_in_place(dtype, name, params) -> None:
    if params.get("bit_index", 0) >= NBITS[dtype]:
        pytest.skip("bit outside this dtype")
    model = make_model(dtype)
    targets = random_targets(model, random.Random(7), 10)
    params_by_name = dict(model.named_parameters())
    before = {n: int_flat(p).clone() for n, p in params_by_name.items()}
    ptrs = {n: p.data_ptr() for n, p in params_by_name.items()}
    applied = apply_perturbation(model, targets, get_perturbation(name, **params), cpu_generator(3))
    target_set = {(t.param, t.flat_index) for t in targets}
    for n, p in params_by_name.items():
        assert p.data_ptr() == ptrs[n]  # in place: same storage
        diff = torch.nonzero(int_flat(p) != before[n]).reshape(-1).tolist()
        assert {(n, f) for f in diff} <= target_set
    # The changed flag and the record agree with the integer views.
    changed = applied.changed()
    for t, ch, rec in zip(targets, changed, applied.records()):
        now = int(int_flat(params_by_name[t.param])[t.flat_index])
        assert ch == (now != int(before[t.param][t.flat_index]))
        assert rec["weight"] == t.name
        assert (len(rec["bits"]) > 0) == ch
    # O(k) memory: only the k touched values are kept, as separate small tensors.
    assert applied.n_original_values == len(targets)
    assert all(g.old.numel() == len(g.positions) for g in applied.groups)
    applied.restore()
    for n, p in params_by_name.items():
        assert torch.equal(int_flat(p), before[n])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits_req", [1, 2, 3, 7])
def test_bit_flip_changes_exactly_n_random_bits(dtype, nbits_req) -> None:
    w = torch.nn.Parameter(torch.randn(40, 30, generator=cpu_generator(0)).to(dtype))
    targets = [WeightTarget("w", flat_to_index(f, w.shape), f) for f in range(0, 1200, 3)]
    before = int_flat(w).clone()
    applied = apply_perturbation({"w": w}, targets, get_perturbation("bit_flip", bits=nbits_req),
                                 cpu_generator(5))
    xor = (int_flat(w) ^ before) & ((1 << NBITS[dtype]) - 1)
    counts = [bin(int(x)).count("1") for x in xor[[t.flat_index for t in targets]].tolist()]
    assert counts == [nbits_req] * len(targets)
    assert all(len(r["bits"]) == nbits_req for r in applied.records())
    # Positions are spread over the whole word (all bits get hit at least once).
    hit = {b for r in applied.records() for b in r["bits"]}
    assert hit == set(range(NBITS[dtype]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_flip_at_fixed_index_and_prob(dtype) -> None:
    n = NBITS[dtype]
    w = torch.nn.Parameter(torch.randn(100, generator=cpu_generator(1)).to(dtype))
    targets = [WeightTarget("w", (i,), i) for i in range(100)]
    for bit in range(n):
        before = int_flat(w).clone()
        with perturbed({"w": w}, targets, get_perturbation("bit_flip", bit_index=bit)):
            xor = (int_flat(w) ^ before) & ((1 << n) - 1)
            assert xor.tolist() == [1 << bit] * 100
        assert torch.equal(int_flat(w), before)
    before = int_flat(w).clone()
    for prob, expect in [(0.25, 25), (0.333, 33), (0.001, 1), (0.0, 0), (1.0, 100)]:
        with perturbed({"w": w}, targets, get_perturbation("bit_flip", prob=prob),
                       cpu_generator(2)) as applied:
            assert sum(applied.changed()) == expect
            assert int((int_flat(w) != before).sum()) == expect


def test_top_exponent_bit_multiplies_by_2_pow_128() -> None:
    # The documented fact: for a normal |w| < 1, flipping fp32 bit 30 / bf16 bit 14
    # multiplies by exactly 2**128; fp16 bit 14 multiplies by 2**16.
    vals = [0.5, -0.01, 3e-4, 0.75]  # normal numbers in all three dtypes
    for dtype, bit, factor in [(torch.float32, 30, 2.0**128), (torch.bfloat16, 14, 2.0**128),
                               (torch.float16, 14, 2.0**16)]:
        w = torch.nn.Parameter(torch.tensor(vals).to(dtype))
        old = w.detach().double().clone()
        targets = [WeightTarget("w", (i,), i) for i in range(len(vals))]
        with perturbed({"w": w}, targets, get_perturbation("bit_flip", bit_index=bit)):
            assert torch.equal(w.detach().double(), old * factor)
        # And for 1 <= |w| < 2 the same flip gives Inf.
        one = torch.nn.Parameter(torch.tensor([1.0, -1.0]).to(dtype))
        with perturbed({"w": one}, targets[:2], get_perturbation("bit_flip", bit_index=bit)):
            assert torch.isinf(one.detach()).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_flip_scale_zero_exact(dtype) -> None:
    n = NBITS[dtype]
    w = torch.nn.Parameter(torch.randn(500, generator=cpu_generator(3)).to(dtype))
    targets = [WeightTarget("w", (i,), i) for i in range(500)]
    before = int_flat(w).clone()
    old = w.detach().clone()
    with perturbed({"w": w}, targets, get_perturbation("sign_flip")):
        assert (((int_flat(w) ^ before) & ((1 << n) - 1)) == 1 << (n - 1)).all()  # sign bit only
    with perturbed({"w": w}, targets, get_perturbation("zero")):
        assert (int_flat(w) == 0).all()  # +0.0
    with perturbed({"w": w}, targets, get_perturbation("scale", scale=4.0)):
        assert torch.equal(w.detach().double(), old.double() * 4.0)  # power of two: exact
    with perturbed({"w": w}, targets, get_perturbation("sign_flip", scale=0.5)):
        assert torch.equal(w.detach().double(), old.double() * -0.5)
    # A non-representable factor: one correct rounding of w*1.2 to the stored dtype.
    with perturbed({"w": w}, targets, get_perturbation("scale")):
        if dtype == torch.float32:
            expect = (old.numpy().astype(np.float64) * 1.2).astype(np.float32)
            assert np.array_equal(w.detach().numpy().view(np.int32), expect.view(np.int32))
        else:
            exact = old.double() * 1.2
            got = w.detach().double()
            # Correctly rounded: no value of the dtype lies strictly closer to w*1.2.
            up = torch.nextafter(w.detach(), torch.full_like(w.detach(), math.inf)).double()
            down = torch.nextafter(w.detach(), torch.full_like(w.detach(), -math.inf)).double()
            err = (got - exact).abs()
            assert (err <= (up - exact).abs()).all() and (err <= (down - exact).abs()).all()
    assert torch.equal(int_flat(w), before)


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_gauss_noise_has_requested_spread(mode) -> None:
    sigma = 0.05 if mode == "relative" else 0.003
    torch.manual_seed(0)
    mags = torch.empty(100, 200).uniform_(0.01, 1.0)
    w = torch.nn.Parameter(mags * torch.sign(torch.randn(100, 200)))
    targets = [WeightTarget("w", flat_to_index(f, w.shape), f) for f in range(w.numel())]
    old = w.detach().double().clone().reshape(-1)
    with perturbed({"w": w}, targets, get_perturbation("gauss_noise", sigma=sigma, mode=mode),
                   cpu_generator(11)):
        step = w.detach().double().reshape(-1) - old
    eps = (step / (sigma * old.abs()) if mode == "relative" else step / sigma).numpy()
    n = eps.size
    assert abs(eps.mean()) < 4 / math.sqrt(n)
    assert abs(eps.std(ddof=1) - 1) < 4 / math.sqrt(2 * n)
    assert stats.kstest(eps, "norm").pvalue > 1e-3
    if mode == "relative":
        # The relative step scales with |w|: the absolute step of large weights is larger.
        big, small = old.abs() > 0.5, old.abs() < 0.1
        assert step[big].abs().mean() > 4 * step[small].abs().mean()


def test_same_seed_same_result_different_seed_different() -> None:
    w = torch.nn.Parameter(torch.randn(50, generator=cpu_generator(0)))
    targets = [WeightTarget("w", (i,), i) for i in range(50)]
    recs = []
    for seed in (1, 1, 2):
        for name, params in [("gauss_noise", {}), ("bit_flip", {"bits": 2, "prob": 0.5})]:
            with perturbed({"w": w}, targets, get_perturbation(name, **params),
                           cpu_generator(seed)) as a:
                recs.append(a.records())
    assert recs[0] == recs[2] and recs[1] == recs[3]
    assert recs[0] != recs[4] and recs[1] != recs[5]


def test_targets_in_several_tensors_and_records_keep_target_order() -> None:
    model = make_model(torch.float32)
    params = dict(model.named_parameters())
    targets = [WeightTarget("1.weight", (2, 3), 2 * 9 + 3), WeightTarget("0.bias", (4,), 4),
               WeightTarget("1.weight", (0, 0), 0)]
    with perturbed(model, targets, get_perturbation("scale", scale=2.0)) as a:
        recs = a.records()
    assert [r["weight"] for r in recs] == ["1.weight:2,3", "0.bias:4", "1.weight:0,0"]
    for t, r in zip(targets, recs):
        assert r["old"] == float(params[t.param].detach()[t.index])
        assert r["new"] == 2 * r["old"]
        assert r["bits"] == set_bits(torch.tensor([r["old"]]), torch.tensor([r["new"]]))[0]


def test_non_contiguous_parameter() -> None:
    base = torch.randn(6, 4, generator=cpu_generator(0))
    w = torch.nn.Parameter(base.t())  # a transposed, non-contiguous view
    assert not w.is_contiguous()
    before = int_flat(w.contiguous()).clone()
    t = [WeightTarget("w", (3, 5), 3 * 6 + 5)]
    with perturbed({"w": w}, t, get_perturbation("zero")):
        assert float(w.detach()[3, 5]) == 0.0 and float(base[5, 3]) == 0.0
        assert int((int_flat(w.contiguous()) != before).sum()) == 1
    assert torch.equal(int_flat(w.contiguous()), before)


def test_errors_are_user_errors() -> None:
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    t = [WeightTarget("w", (1,), 1)]
    with pytest.raises(UserError, match="unknown perturbation 'melt'"):
        get_perturbation("melt")
    with pytest.raises(UserError, match="takes parameters"):
        get_perturbation("zero", scale=2)
    with pytest.raises(UserError, match="out of range for torch.bfloat16"):
        apply_perturbation({"w": w}, t, get_perturbation("bit_flip", bit_index=20))
    assert int((int_flat(w) != 0).sum()) == 0  # a failed apply leaves the tensor as it was
    with pytest.raises(UserError, match="listed twice"):
        apply_perturbation({"w": w}, t + t, get_perturbation("zero"))
    with pytest.raises(UserError, match="no parameter 'v'"):
        apply_perturbation({"w": w}, [WeightTarget("v", (0,), 0)], get_perturbation("zero"))
    with pytest.raises(UserError, match="does not fit"):
        apply_perturbation({"w": w}, [WeightTarget("w", (9,), 9)], get_perturbation("zero"))
    for bad in [dict(sigma=-1), dict(mode="sideways"), dict(sigma=float("nan"))]:
        with pytest.raises(UserError):
            get_perturbation("gauss_noise", **bad)
    for bad in [dict(bits=0), dict(prob=1.5), dict(bits=2, bit_index=3)]:
        with pytest.raises(UserError):
            get_perturbation("bit_flip", **bad)
    with pytest.raises(UserError, match="cannot perturb weights stored as torch.int64"):
        int_view_dtype(torch.int64)


def test_names_aliases_and_cli_options() -> None:
    assert PERTURBATIONS.names() == ["bit_flip", "gauss_noise", "scale", "sign_flip", "zero"]
    assert get_perturbation("gaussian").name == get_perturbation("noise").name == "gauss_noise"
    assert get_perturbation("bitflip").name == "bit_flip"
    p = params_from_options("gaussian", perturb_scale=0.02, noise_mode="absolute")
    assert (p.kind, p.sigma, p.mode) == ("gauss_noise", 0.02, "absolute")
    assert params_from_options("noise", noise_sigma=0.05).sigma == 0.05
    assert params_from_options("sign_flip", perturb_scale=1.0).scale == 1.0
    assert params_from_options("scale", scale=1.2).scale == 1.2
    assert params_from_options("scale").scale == 1.2
    assert params_from_options("zero", perturb_scale=1.0).kind == "zero"
    b = params_from_options("bitflip", bits=1, bit_index=7, prob=0.5)
    assert (b.bits, b.bit_index, b.prob) == (1, 7, 0.5)
    assert get_perturbation("bit_flip", **params_from_options("bit_flip", bits=3).to_dict()).describe() == {
        "name": "bit_flip", "params": {"bits": 3, "bit_index": None, "prob": 1.0}}
    with pytest.raises(UserError, match="conflicting"):
        params_from_options("gaussian", perturb_scale=0.02, noise_sigma=0.05)


@pytest.mark.parametrize("dtype,exp_lsb,mant_top", [(torch.float32, 23, 22),
                                                    (torch.bfloat16, 7, 6),
                                                    (torch.float16, 10, 9)])
def test_documented_effects_of_informative_bits(dtype, exp_lsb, mant_top) -> None:
    # docs/perturbations.md: the lowest exponent bit halves or doubles; the top mantissa bit
    # changes |w| by a quarter to a half of itself; for fp32/bf16 weights with
    # 2**-63 <= |w| < 2 the exponent bit below the top one divides by 2**64.
    w0 = torch.empty(400).uniform_(0.001, 1.0, generator=cpu_generator(4))
    w0 = (w0 * torch.sign(torch.randn(400, generator=cpu_generator(5)))).to(dtype)
    targets = [WeightTarget("w", (i,), i) for i in range(400)]
    w = torch.nn.Parameter(w0.clone())
    old = w0.double()

    def ratio(bit: int) -> torch.Tensor:
        with perturbed({"w": w}, targets, get_perturbation("bit_flip", bit_index=bit)):
            return w.detach().double() / old

    r = ratio(exp_lsb)
    assert ((r == 2.0) | (r == 0.5)).all()
    r = ratio(mant_top)
    assert ((r - 1).abs() > 0.25).all() and ((r - 1).abs() <= 0.5).all()
    if dtype != torch.float16:
        assert (ratio(exp_lsb + 6) == 2.0**-64).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_result_on_cuda_as_on_cpu() -> None:
    cpu = make_model(torch.bfloat16)
    gpu = make_model(torch.bfloat16).to("cuda")
    before = state_hash(cpu)
    targets = random_targets(cpu, random.Random(3), 12)
    for name, params in KINDS:
        a = apply_perturbation(cpu, targets, get_perturbation(name, **params), cpu_generator(1))
        b = apply_perturbation(gpu, targets, get_perturbation(name, **params), cpu_generator(1))
        assert [r["bits"] for r in a.records()] == [r["bits"] for r in b.records()]
        for (n, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
            assert torch.equal(int_flat(p), int_flat(q.detach().cpu())), (name, n)
        b.restore()
        a.restore()
    for (n, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert torch.equal(int_flat(p), int_flat(q.detach().cpu())), n
    assert state_hash(cpu) == before
