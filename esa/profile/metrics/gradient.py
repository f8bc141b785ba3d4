"""First-order gradient metrics: grad_x_weight and grad_squared.

Both fold each parameter's gradient into an accumulator (fp32, or fp64 for fp64 models) *while backward runs*
(`register_post_accumulate_grad_hook`) and drop `param.grad` at once, so a full copy of the
gradient never exists next to the accumulators. The accumulators are plain sums over
batches, so data shards add up exactly (`finalize` turns the sums into scores).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator

import torch

from esa.core.errors import UserError
from esa.profile.metrics.base import Metric, MetricOptions, MetricResult, start_counts, start_sum
from esa.parallel.split import LocalBatch, as_local
from esa.profile.metrics.loss import next_token_nll
from esa.spec.weights import matches

__all__ = [
    "GradXWeight",
    "GradSquared",
    "scored_parameters",
    "scoring_mode",
    "fold_gradients",
    "model_device",
    "sum_dtype",
]

log = logging.getLogger(__name__)

# A fold receives (parameter name, the gradient just accumulated for it). It must not keep
# a reference to the gradient unless it owns it (see `_steal`).
Fold = Callable[[str, torch.Tensor], None]


def scored_parameters(model: torch.nn.Module, options: MetricOptions) -> dict[str, torch.nn.Parameter]:
    """Parameters a metric scores: every named parameter (tied ones once) passing the
    include / exclude filters; raises UserError when the filters leave nothing."""
    params = {n: p for n, p in model.named_parameters() if matches(n, options.include, options.exclude)}
    if not params:
        raise UserError(
            f"no parameter matches include={options.include!r} exclude={options.exclude!r}"
        )
    return params


def model_device(model: torch.nn.Module) -> torch.device:
    """Device that receives the input ids (the embedding's device for sharded models)."""
    try:
        return model.get_input_embeddings().weight.device  # type: ignore[operator,union-attr]
    except (AttributeError, NotImplementedError, TypeError):
        return next(model.parameters()).device


@contextlib.contextmanager
def scoring_mode(model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
    """Eval mode (no dropout: deterministic gradients) and requires_grad only on `params`
    (unscored parameters then cost no gradient work); both restored on exit. Any `.grad`
    left over from earlier work is dropped on entry (it would be added into the first
    batch's gradient) and every `.grad` is None on exit."""
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    selected = {id(p) for p in params.values()}
    model.eval()
    try:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(id(p) in selected)
        with torch.enable_grad():
            yield
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)


def fold_gradients(model: torch.nn.Module, batches: Iterable[torch.Tensor | LocalBatch],
                   params: dict[str, torch.nn.Parameter], fold: Fold,
                   progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Backpropagate the mean next-token NLL of each batch, handing every parameter's
    gradient to `fold` the moment autograd has accumulated it, then freeing it.

    A sharded job hands each rank its part of every global batch (esa.parallel.split): the
    local loss is weighted so that the (sharded) gradient is the global batch's. Returns counts
    {'batches', 'tokens'} of the global batches. Hooks are removed and every `.grad` is None on
    return, also when a batch fails.
    """
    names = {id(p): n for n, p in params.items()}

    def hook(p: torch.Tensor) -> None:
        fold(names[id(p)], p.grad)  # type: ignore[arg-type]
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params.values()]
    device = model_device(model)
    counts = {"batches": 0, "tokens": 0}
    try:
        for i, item in enumerate(batches):
            part = as_local(item)
            ids = part.ids.to(device)
            loss = next_token_nll(model, ids, batch_index=i)
            (loss if part.weight == 1.0 else loss * part.weight).backward()
            counts["batches"] += 1
            counts["tokens"] += part.n_global * max(int(ids.shape[1]) - 1, 0)
            if progress is not None:
                progress(counts["batches"])
    finally:
        for h in handles:
            h.remove()
        for p in params.values():
            p.grad = None
    if counts["batches"] == 0:
        raise UserError("no calibration batches: a gradient metric needs data")
    return counts


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype for parameters of `dtype`: at least fp32 (bf16/fp16 models keep
    fp32 sums), fp64 for fp64 models (the first-principles tests run in fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _steal(grad: torch.Tensor) -> torch.Tensor:
    """The gradient in its accumulator dtype, as a tensor this caller may keep and modify.

    A gradient already in that dtype is taken over as it is (autograd drops its own
    reference when the hook sets `.grad = None`), which saves one allocation and copy on
    the first batch.
    """
    target = sum_dtype(grad.dtype)
    return grad.detach() if grad.dtype == target else grad.detach().to(target)


def _resumed(options: MetricOptions, acc_name: str,
             params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The sums a resumed job continues from (empty for a fresh job)."""
    if not options.initial_accumulators:
        return {}
    return {n: start_sum(options, acc_name, n, p, sum_dtype(p.dtype)) for n, p in params.items()}


def _fill_missing(acc: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]) -> None:
    """Parameters that never received a gradient (unused in every batch) sum to zero."""
    for n, p in params.items():
        if n not in acc:
            acc[n] = torch.zeros_like(p, dtype=sum_dtype(p.dtype))


def _check_counts(counts: dict[str, int]) -> int:
    batches = int(counts.get("batches", 0))
    if batches <= 0:
        raise UserError(f"accumulator counts have no batches: {counts}")
    return batches


def _param(model: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise UserError(f"accumulators name parameter '{name}', which the model does not have") from None


class GradXWeight(Metric):
    """|W ⊙ Ḡ| with Ḡ the mean over batches of ∇W L_b (first-order Taylor estimate of
    the loss change from zeroing a weight)."""

    name = "grad_x_weight"
    resumable = True
    needs_grad = True

    def score(self, model: torch.nn.Module, batches: Iterable[torch.Tensor],
              options: MetricOptions) -> MetricResult:
        """Score every selected parameter; accumulator `grad_sum` = Σ_b ∇W L_b
        (fp32; fp64 for fp64 models)."""
        params = scored_parameters(model, options)
        acc: dict[str, torch.Tensor] = _resumed(options, "grad_sum", params)

        def fold(name: str, grad: torch.Tensor) -> None:
            if name in acc:
                acc[name].add_(grad)
            else:
                acc[name] = _steal(grad)

        with scoring_mode(model, params):
            counts = start_counts(options, fold_gradients(model, batches, params, fold, options.progress))
        _fill_missing(acc, params)
        return self.package({"grad_sum": acc}, counts, model, options)

    def finalize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, int],
                 model: torch.nn.Module, inplace: bool = False) -> dict[str, torch.Tensor]:
        """|W| · |grad_sum / batches| per parameter, fp32; `inplace` reuses the fp32 sum
        buffers (so the accumulators are consumed)."""
        batches = _check_counts(counts)
        scores = {}
        with torch.no_grad():
            for name, gsum in accumulators["grad_sum"].items():
                w = _param(model, name).detach().to(device=gsum.device)
                if inplace and gsum.dtype == torch.float32:
                    # w * gsum promotes to the sum's dtype (>= fp32) whatever the model dtype.
                    scores[name] = torch.mul(gsum, w, out=gsum).abs_().div_(batches)
                else:
                    scores[name] = (gsum * w).abs_().div_(batches).float()
        return scores


class GradSquared(Metric):
    """mean_b (∇W L_b)²: the empirical Fisher diagonal at batch level."""

    name = "grad_squared"
    resumable = True
    needs_grad = True

    def score(self, model: torch.nn.Module, batches: Iterable[torch.Tensor],
              options: MetricOptions) -> MetricResult:
        """Score every selected parameter; accumulator `grad_sq_sum` = Σ_b (∇W L_b)²
        (fp32; fp64 for fp64 models)."""
        params = scored_parameters(model, options)
        acc: dict[str, torch.Tensor] = _resumed(options, "grad_sq_sum", params)

        def fold(name: str, grad: torch.Tensor) -> None:
            if name in acc:
                g = grad if grad.dtype == acc[name].dtype else grad.to(acc[name].dtype)
                acc[name].addcmul_(g, g)
            else:
                g = _steal(grad)
                acc[name] = g.mul_(g)

        with scoring_mode(model, params):
            counts = start_counts(options, fold_gradients(model, batches, params, fold, options.progress))
        _fill_missing(acc, params)
        return self.package({"grad_sq_sum": acc}, counts, model, options)

    def finalize(self, accumulators: dict[str, dict[str, torch.Tensor]], counts: dict[str, int],
                 model: torch.nn.Module | None = None, inplace: bool = False) -> dict[str, torch.Tensor]:
        """grad_sq_sum / batches per parameter, fp32 (the model is not needed)."""
        batches = _check_counts(counts)
        with torch.no_grad():
            return {name: (s.div_(batches) if inplace else s / batches).float()
                    for name, s in accumulators["grad_sq_sum"].items()}
