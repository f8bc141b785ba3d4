"""Per-window NLL of a model whose weights change only from some block on, without recomputing
the blocks before it.

Perturbing a weight of decoder block s leaves everything that runs before block s unchanged. So
for every weight ESA finds its *start*: the number of blocks that finished before the first call
of a module owning it (0: it is used before or inside block 0, e.g. the embedding; n: after
the last block, e.g. the final norm or an untied lm_head). With the outputs of block s-1 cached
for every window, a forward from start s gives blocks 0..s-1 stand-in forwards (the last one
returns the cached output) and runs the model's own forward from there: the rest of the model,
the head and the loss are the model's own code, so any architecture whose decoder blocks esa.model.blocks
finds works. Caches are built for ascending starts, each from the previous
one, so building all of them costs one forward.

The start is found by observation, not by names: hooks record which modules run while which
block is open during one forward. A weight read outside its module's call would be missed, so the
ablation checks the first candidate of each start against a full forward of the first window.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from esa.baseline.evaluate import token_nll
from esa.core.errors import UserError
from esa.core.logs import get_logger
from esa.model.blocks import decoder_blocks

__all__ = ["CachedForward", "window_nll_sums"]

log = get_logger("ablation")


class _Stop(Exception):
    """Raised by a hook once the cache for this batch is captured: the rest of the forward is not needed."""


def window_nll_sums(logits: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    """Per-window sum of next-token NLL, summed in float64: a candidate's ΔNLL is a small difference of
    two such sums, which fp32 summation (the evaluation's) would blur."""
    return token_nll(logits, ids).double().sum(dim=1).cpu().numpy()


def _standin_forward(holder: dict[str, Any], last: bool, tuple_len: int | None) -> Any:
    """A forward that takes the place of a decoder block's: returns its input (or, the last one, the
    cached output) in the block's own output structure."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = holder["cached"] if last else (args[0] if args else kwargs["hidden_states"])
        return hidden if tuple_len is None else (hidden,) + (None,) * (tuple_len - 1)

    return forward


class CachedForward:
    """A model, its calibration batches, the unperturbed per-window NLL sums and each weight's start."""

    def __init__(self, model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
        if not batches:
            raise UserError("no calibration batches")
        self.model, self.batches = model, batches
        try:
            self.blocks: list[torch.nn.Module] | None = list(decoder_blocks(model))
        except UserError:
            self.blocks = None
            log.info("no decoder blocks found: every weight is evaluated with a full forward")
        self._cache: tuple[int, list[torch.Tensor]] | None = None
        self._tuple_len: int | None = None
        self._starts: dict[int, int] = {}
        self.baseline = self._observe()

    # ---------------------------------------------------------------------------- starts
    def _observe(self) -> np.ndarray:
        """One full pass: the baseline sums, the blocks' output structure and every module's start."""
        state = {"open": 0}
        starts: dict[int, int] = {}
        handles = []
        if self.blocks is not None:
            for i, block in enumerate(self.blocks):
                handles.append(block.register_forward_pre_hook(lambda m, a, i=i: state.update(open=i) or None))
                handles.append(block.register_forward_hook(self._record_structure(state, i)))
        def seen(module: torch.nn.Module, args: Any) -> None:  # a pre-hook's return value would replace args
            starts.setdefault(id(module), state["open"])

        for module in self.model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                handles.append(module.register_forward_pre_hook(seen))
        try:
            sums = [self._run(b) for b in self.batches]
        finally:
            for h in handles:
                h.remove()
        owners: dict[int, int] = {}
        for module in self.model.modules():
            for p in module.parameters(recurse=False):
                if id(module) in starts:
                    owners[id(p)] = min(owners.get(id(p), starts[id(module)]), starts[id(module)])
                else:
                    owners.setdefault(id(p), 0)  # never called: no shortcut
        self._starts = owners
        return np.concatenate(sums)

    def _record_structure(self, state: dict[str, int], i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            state["open"] = i + 1
            if i == 0:
                self._tuple_len = len(out) if isinstance(out, tuple) else None
        return hook

    def start_of(self, param: torch.Tensor) -> int:
        """Blocks that can be skipped when `param` changes (0: none)."""
        return self._starts.get(id(param), 0)

    # ----------------------------------------------------------------------------- cache
    def _capture(self, start: int) -> list[torch.Tensor]:
        """The output of block start-1 for every batch (the forward stops right after it). With the cache
        of an earlier start in hand, only the blocks in between run: over ascending starts the captures
        cost one forward in all."""
        assert self.blocks is not None
        holder: dict[str, Any] = {}

        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            holder["out"] = (out[0] if isinstance(out, tuple) else out).detach()
            raise _Stop

        earlier = self._cache if self._cache is not None and self._cache[0] < start else None
        skip = earlier[0] if earlier is not None else 0
        handle = self.blocks[start - 1].register_forward_hook(hook)
        cache = []
        try:
            with self._standins(skip, holder):
                for b, batch in enumerate(self.batches):
                    if earlier is not None:
                        holder["cached"] = earlier[1][b]
                    try:
                        with torch.no_grad():
                            self.model(input_ids=batch, use_cache=False)
                    except _Stop:
                        pass
                    cache.append(holder.pop("out"))
        finally:
            handle.remove()
        return cache

    def _cached(self, start: int) -> list[torch.Tensor]:
        if self._cache is None or self._cache[0] != start:
            cache = self._capture(start)
            self._cache = None  # free the old cache before keeping the next
            self._cache = (start, cache)
        return self._cache[1]

    @contextmanager
    def _standins(self, start: int, holder: dict[str, Any]) -> Iterator[None]:
        """Blocks 0..start-1 run stand-in forwards (none for start 0); the last returns holder['cached'].

        The block's own ``forward`` is shadowed by an instance attribute and restored afterwards (the
        modules, their names and hooks stay in place, as esa.model.blocks.checkpoint_blocks does)."""
        assert self.blocks is not None
        blocks = self.blocks[:start]
        saved = [block.__dict__.get("forward") for block in blocks]
        try:
            for i, block in enumerate(blocks):
                block.forward = _standin_forward(holder, last=(i == start - 1), tuple_len=self._tuple_len)
            yield
        finally:
            for block, own in zip(blocks, saved):
                if own is None:
                    block.__dict__.pop("forward", None)
                else:
                    block.forward = own

    # ------------------------------------------------------------------------------- run
    def first_window_full(self) -> float:
        """The NLL sum of the first calibration window alone through the full model (a cheap check)."""
        return float(self._run(self.batches[0][:1])[0])

    def _run(self, batch: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            logits = self.model(input_ids=batch, use_cache=False).logits
        return window_nll_sums(logits, batch)

    def nll_sums(self, start: int = 0) -> np.ndarray:
        """Per-window NLL sums of the model as it is now, skipping the first `start` blocks (whose outputs
        are taken from the cache of the unperturbed model)."""
        batches = self.batches
        if start <= 0 or self.blocks is None:
            return np.concatenate([self._run(b) for b in batches])
        cache = self._cached(start)
        holder: dict[str, Any] = {}
        out = []
        with self._standins(start, holder):
            for batch, cached in zip(batches, cache):
                holder["cached"] = cached
                out.append(self._run(batch))
        return np.concatenate(out)
