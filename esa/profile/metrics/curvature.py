"""Second-order metrics: hutchinson_diag (stochastic) and hessian_diag (exact).

Both use Hessian-vector products by double backward: g = ∇L with create_graph=True, then
H v = ∇(g · v). H is the Hessian of the mean loss over the calibration set, i.e. the mean
of the per-batch Hessians H_b, so the per-batch quantities are summed (additive across
data shards) and divided by the number of batches (or batch × probe samples) in `finalize`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from esa.core.errors import UserError
from esa.profile.metrics.base import Metric, MetricOptions, MetricResult, start_counts, start_sum
from esa.profile.metrics.gradient import model_device, scored_parameters, scoring_mode, sum_dtype
from esa.parallel.split import as_local
from esa.profile.metrics.loss import next_token_nll, predicted_tokens
from esa.spec.weights import format_weight, parse_weight

__all__ = ["HutchinsonDiag", "HessianDiag", "double_backward_ready", "rademacher_like",
           "hutchinson_spread", "probe_generator"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def double_backward_ready(model: torch.nn.Module) -> Iterator[None]:
    """Switch a Hugging Face model to implementations that support double backward, and
    switch back on exit.

    Fused SDPA / flash attention kernels have no double backward, so attention goes to
    'eager'. Mixtral-style fused experts ('grouped_mm') do support double backward
    (torch's GroupedMmBackward is itself differentiable; checked against the eager experts
    loop to 2e-6 in fp32) but grouped_mm has no fp64 kernel, so fp64 models get the eager
    experts loop.
    """
    config = getattr(model, "config", None)
    undo = []
    try:
        attn = getattr(config, "_attn_implementation", None)
        if attn is not None and attn != "eager":
            model.set_attn_implementation("eager")  # type: ignore[operator]
            if config._attn_implementation != "eager":  # type: ignore[union-attr]
                raise UserError(
                    f"{type(model).__name__} cannot switch from '{attn}' to eager attention at "
                    "run time, and fused attention kernels have no double backward; load the "
                    "model with attn_implementation='eager'"
                )
            log.info("second-order metric: attention switched from '%s' to 'eager' "
                     "(fused kernels have no double backward)", attn)
            undo.append(lambda: model.set_attn_implementation(attn))  # type: ignore[operator]
        experts = getattr(config, "_experts_implementation", None)
        dtype = next(model.parameters()).dtype
        if experts == "grouped_mm" and dtype == torch.float64:
            model.set_experts_implementation("eager")  # type: ignore[operator]
            log.info("second-order metric: experts switched from 'grouped_mm' to 'eager' "
                     "(grouped_mm has no float64 kernel)")
            undo.append(lambda: model.set_experts_implementation(experts))  # type: ignore[operator]
        yield
    finally:
        for fn in reversed(undo):
            fn()


def rademacher_like(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A ±1 tensor shaped and typed like `p`, drawn from `generator` on the generator's own
    device, then moved to `p`'s device (a no-op with `probe_generator`)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    bits = torch.randint(0, 2, p.shape, generator=generator, device=gen_device, dtype=torch.int8)
    return bits.to(device=p.device, dtype=p.dtype).mul_(2).sub_(1)


def _hvp(grads: list[torch.Tensor | None], params: list[torch.nn.Parameter],
         vectors: list[torch.Tensor], retain_graph: bool) -> list[torch.Tensor]:
    """H v for the block of `params`, from first-order `grads` built with create_graph.

    A gradient that does not depend on any parameter (no grad_fn) has a zero Hessian row and
    is left out of the second backward; inputs the second backward does not reach get 0.
    """
    pairs = [(g, v) for g, v in zip(grads, vectors) if g is not None and g.requires_grad]
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    outs = torch.autograd.grad([g for g, _ in pairs], params, grad_outputs=[v for _, v in pairs],
                               retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for h, p in zip(outs, params)]


def probe_generator(options: MetricOptions, device: torch.device) -> torch.Generator:
    """The generator that draws the probes, on the parameters' device.

    Drawing billions of signs per probe on the CPU and copying them would dominate a GPU
    run, so for an accelerator a device generator is seeded from `options.generator` (one
    draw). A seed therefore fixes the probes for a given device type; CPU and GPU runs of
    one seed use different (equally valid) probes.
    """
    gen = options.generator
    if gen is None:
        log.warning("hutchinson_diag: no seeded generator given; probes use seed 0")
        gen = torch.Generator().manual_seed(0)
    if gen.device.type == device.type:
        return gen
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
    return torch.Generator(device=device).manual_seed(seed)


def batch_probe_generator(base: int, global_batch: int, device: torch.device) -> torch.Generator:
    """The generator of the probes of calibration batch `global_batch` (on the parameters' device).

    Seeding per batch, not once per job, makes the probes a function of (seed, batch): shards and
    resumed jobs draw exactly what an unsharded, uninterrupted run draws for the same batches.
    """
    return torch.Generator(device=device).manual_seed((int(base) * 1_000_003 + int(global_batch)) % 2**63)


def hutchinson_spread(accumulators: dict[str, dict[str, torch.Tensor]],
                      counts: dict[str, int]) -> dict[str, Any]:
    """Per-tensor spread of the Hutchinson estimate from the running sums.

    For each weight the n = batches × probes samples of z_i (H_b z)_i have a sample std;
    its standard error is std / sqrt(n). Per tensor we report the mean sample std, the mean
    standard error and `rel_stderr` = mean standard error / mean |score| (≪ 1 means the
    probes suffice; ~1 means the ranking is mostly noise). JSON-serialisable.
    """
    n = int(counts.get("samples", 0))
    out: dict[str, Any] = {"samples": n, "per_tensor": {}}
    if n < 2:
        out["note"] = "one sample per weight: no spread estimate (use more probes or batches)"
        return out
    sums, sqs = accumulators["hz_sum"], accumulators["hz_sq_sum"]
    with torch.no_grad():
        for name, s in sums.items():
            mean = s / n
            var = (sqs[name] / n - mean * mean).clamp_(min=0).mul_(n / (n - 1))
            std = var.sqrt_()
            std_mean = float(std.mean())
            score_mean = float(mean.abs_().mean())
            stderr_mean = std_mean / math.sqrt(n)
            out["per_tensor"][name] = {
                "sample_std_mean": std_mean,
                "stderr_mean": stderr_mean,
                "score_mean": score_mean,
                "rel_stderr": stderr_mean / score_mean if score_mean > 0 else None,
            }
    return out


class HutchinsonDiag(Metric):
    """|mean over batches b and Rademacher probes z of z ⊙ (H_b z)|, an unbiased estimate
    of diag H whose per-weight variance is Σ_{j≠i} H_ij² (so the probe count matters)."""

    name = "hutchinson_diag"
    resumable = True
    needs_grad = True
    needs_eager_attention = True
    shardable = False

    def summarize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, Any]) -> dict[str, Any]:
        """The estimator's spread over probes (see hutchinson_spread)."""
        return {"spread": hutchinson_spread(accumulators, counts)}

    def score(self, model: torch.nn.Module, batches: Iterable[torch.Tensor],
              options: MetricOptions) -> MetricResult:
        """Accumulators: `hz_sum` = Σ z⊙Hz and `hz_sq_sum` = Σ (z⊙Hz)² (fp32; fp64 for fp64
        models); counts add 'probes' (per batch) and 'samples' (= batches × probes).

        Memory: weights, the two sums, one probe and one HVP result for every scored
        parameter, and the double-backward graph (which holds a full first-order gradient).
        """
        if options.probes < 1:
            raise UserError(f"hutchinson_diag needs at least one probe, got {options.probes}")
        params = scored_parameters(model, options)
        names, plist = list(params), list(params.values())
        base = options.seed if options.seed is not None else int(
            torch.randint(0, 2**62, (1,), generator=probe_generator(options, torch.device("cpu"))))
        acc = {n: start_sum(options, "hz_sum", n, p, sum_dtype(p.dtype)) for n, p in params.items()}
        sq = {n: start_sum(options, "hz_sq_sum", n, p, sum_dtype(p.dtype)) for n, p in params.items()}
        counts = start_counts(options, {"batches": 0, "tokens": 0, "probes": options.probes, "samples": 0})
        device = model_device(model)
        with scoring_mode(model, params), double_backward_ready(model):
            for i, batch in enumerate(batches):
                gen = batch_probe_generator(base, options.batch_offset + i, plist[0].device)
                batch = as_local(batch).ids.to(device)
                loss = next_token_nll(model, batch, batch_index=i)
                grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
                for k in range(options.probes):
                    zs = [rademacher_like(p, gen) for p in plist]
                    hvs = _hvp(list(grads), plist, zs, retain_graph=k < options.probes - 1)
                    for n, z, hv in zip(names, zs, hvs):
                        est = hv.to(acc[n].dtype).mul_(z)  # hv is ours to overwrite
                        acc[n].add_(est)
                        sq[n].addcmul_(est, est)
                    # The loop variables would keep the last parameter's probe and H z alive into
                    # the next batch (about 4 GB for an 8B model).
                    del zs, hvs, z, hv, est
                del grads, loss
                counts["batches"] += 1
                counts["tokens"] += predicted_tokens(batch)
                counts["samples"] += options.probes
                if options.progress is not None:
                    options.progress(counts["batches"])
        if counts["batches"] == 0:
            raise UserError("no calibration batches: hutchinson_diag needs data")
        accumulators = {"hz_sum": acc, "hz_sq_sum": sq}
        # Without finalising, the caller gets the sums and calls summarize() itself.
        extras = self.summarize(accumulators, counts) if options.finalize else {}
        return self.package(accumulators, counts, model, options, extras)

    def finalize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, int],
                 model: torch.nn.Module | None = None, inplace: bool = False) -> dict[str, torch.Tensor]:
        """|hz_sum / samples| per parameter (the model is not needed)."""
        n = int(counts.get("samples", 0))
        if n <= 0:
            raise UserError(f"accumulator counts have no samples: {counts}")
        with torch.no_grad():
            return {name: (s.div_(n).abs_() if inplace else (s / n).abs_()).float()
                    for name, s in accumulators["hz_sum"].items()}


# Coordinates of one parameter are differentiated in chunks of one-hot vectors (one
# batched double backward per chunk, via vmap); a chunk holds at most this many elements.
_CHUNK_ELEMENTS = 1 << 24


def _diag_entries(g: torch.Tensor, p: torch.Tensor, flat: list[int]) -> torch.Tensor:
    """H_ii of p's block for the flat indices `flat`, from g = ∂L/∂p built with create_graph.

    Each H_ii is the i-th entry of H e_i. Chunks of one-hot vectors go through one batched
    backward (is_grads_batched); an op without a vmap rule falls back to one backward per
    coordinate. Indexing g (g[i] then grad) would be ~10x slower than a one-hot grad_output.
    """
    out = torch.empty(len(flat), dtype=p.dtype, device=p.device)
    chunk = max(1, min(len(flat), _CHUNK_ELEMENTS // max(p.numel(), 1)))
    for start in range(0, len(flat), chunk):
        idx = torch.tensor(flat[start:start + chunk], device=p.device)
        onehot = torch.zeros(len(idx), p.numel(), dtype=p.dtype, device=p.device)
        onehot[torch.arange(len(idx), device=p.device), idx] = 1
        try:
            (rows,) = torch.autograd.grad(g, p, grad_outputs=onehot.view(len(idx), *p.shape),
                                          retain_graph=True, is_grads_batched=True, allow_unused=True)
            rows_list = None if rows is None else rows.reshape(len(idx), -1)
        except (RuntimeError, NotImplementedError) as err:  # no vmap rule for some op
            log.debug("hessian_diag: batched double backward failed (%s); one coordinate at a time", err)
            rows_list = torch.stack([
                _row_or_zeros(torch.autograd.grad(g, p, grad_outputs=v.view_as(p), retain_graph=True,
                                                  allow_unused=True)[0], p).reshape(-1)
                for v in onehot])
        if rows_list is None:
            out[start:start + len(idx)] = 0
        else:
            out[start:start + len(idx)] = rows_list.gather(1, idx[:, None]).squeeze(1)
    return out


def _row_or_zeros(row: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if row is None else row


def _candidate_coords(model: torch.nn.Module, candidates: list[str]) -> dict[str, list[int]]:
    """Parse 'param:i,j' names into parameter -> sorted flat indices (validated)."""
    params = dict(model.named_parameters())
    coords: dict[str, set[int]] = {}
    for text in candidates:
        name, index = parse_weight(text)
        if name not in params:
            raise UserError(f"candidate {text!r}: the model has no parameter '{name}'")
        shape = tuple(params[name].shape)
        if len(index) != len(shape) or any(i >= s for i, s in zip(index, shape)):
            raise UserError(f"candidate {text!r}: index out of range for shape {list(shape)}")
        flat = 0
        for i, s in zip(index, shape):
            flat = flat * s + i
        coords.setdefault(name, set()).add(flat)
    return {n: sorted(c) for n, c in coords.items()}


class HessianDiag(Metric):
    """|diag ∇²L| exactly: one Hessian-vector product per coordinate, so only for a small
    parameter subset (options.include) or a candidate list (options.candidates)."""

    name = "hessian_diag"
    resumable = True
    needs_grad = True
    needs_eager_attention = True
    shardable = False

    def _selection(self, model: torch.nn.Module, options: MetricOptions
                   ) -> tuple[dict[str, torch.nn.Parameter], dict[str, list[int]] | None]:
        if options.candidates:
            coords = _candidate_coords(model, options.candidates)
            all_params = dict(model.named_parameters())
            params = {n: all_params[n] for n in coords}
            total = sum(len(c) for c in coords.values())
        else:
            coords = None
            params = scored_parameters(model, options)
            total = sum(p.numel() for p in params.values())
        if total > options.max_exact_coords:
            raise UserError(
                f"hessian_diag computes one Hessian-vector product per coordinate and the "
                f"selection has {total:,} coordinates (limit {options.max_exact_coords:,}); "
                "select a few small tensors with --include or a candidate list, or use "
                "--metric hutchinson_diag, which estimates the whole diagonal"
            )
        return params, coords

    def score(self, model: torch.nn.Module, batches: Iterable[torch.Tensor],
              options: MetricOptions) -> MetricResult:
        """Accumulator `h_diag_sum` = Σ_b diag H_b (fp32; fp64 for fp64 models). With
        candidates, coordinates not computed are 0 and extras['partial'] lists the computed
        flat indices per parameter; extras['candidates'] gives each weight's signed H_ii."""
        params, coords = self._selection(model, options)
        names, plist = list(params), list(params.values())
        acc = {n: start_sum(options, "h_diag_sum", n, p, sum_dtype(p.dtype)) for n, p in params.items()}
        counts = start_counts(options, {"batches": 0, "tokens": 0})
        device = model_device(model)
        with scoring_mode(model, params), double_backward_ready(model):
            for b, batch in enumerate(batches):
                batch = as_local(batch).ids.to(device)
                loss = next_token_nll(model, batch, batch_index=b)
                grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
                for n, p, g in zip(names, plist, grads):
                    if g is None or not g.requires_grad:
                        continue  # gradient constant in p: zero curvature
                    flat = coords[n] if coords is not None else list(range(p.numel()))
                    acc[n].view(-1)[flat] += _diag_entries(g, p, flat).to(acc[n].dtype)
                del grads, loss
                counts["batches"] += 1
                counts["tokens"] += predicted_tokens(batch)
                if options.progress is not None:
                    options.progress(counts["batches"])
        if counts["batches"] == 0:
            raise UserError("no calibration batches: hessian_diag needs data")
        accumulators = {"h_diag_sum": acc}
        extras: dict[str, Any] = {}
        if coords is not None:
            extras["partial"] = {n: c for n, c in coords.items()}
            extras["candidates"] = [
                {"weight": format_weight(n, torch.unravel_index(torch.tensor(i), params[n].shape)),
                 "hessian_diag": float(acc[n].view(-1)[i]) / counts["batches"]}
                for n, c in coords.items() for i in c
            ]
        return self.package(accumulators, counts, model, options, extras)

    def finalize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, int],
                 model: torch.nn.Module | None = None, inplace: bool = False) -> dict[str, torch.Tensor]:
        """|h_diag_sum / batches| per parameter (the model is not needed)."""
        batches = int(counts.get("batches", 0))
        if batches <= 0:
            raise UserError(f"accumulator counts have no batches: {counts}")
        with torch.no_grad():
            return {name: (s.div_(batches).abs_() if inplace else (s / batches).abs_()).float()
                    for name, s in accumulators["h_diag_sum"].items()}
