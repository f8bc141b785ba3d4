"""The sharded model (FSDP2): loading it without every rank holding it, and reading its shards.

`load_sharded` reads the full weights on rank 0 only (its CPU memory), builds the structure on
the meta device everywhere, shards one unit per decoder block plus the root
(`torch.distributed.fsdp.fully_shard`), and broadcasts the weights and buffers from rank 0.
Every parameter is then a DTensor sharded along its first dimension; each rank keeps 1/N of the
weights, and of any accumulator built like them.

Reading shards: `gather_to_rank0` assembles one tensor on rank 0 only (never an all-gather, so no
rank ever holds two full tensors); `local_index` maps a global coordinate to the rank that owns
it; `local_data` is the storage an in-place write must hit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from esa.core.errors import UserError
from esa.core.logs import get_logger
from esa.model.blocks import decoder_blocks
from esa.model.loading import (LoadedModel, check_spec, dtype_name, from_config_on_meta, from_pretrained,
                               load_tokenizer, locate_model, model_class_name, resolve_dtype)
from esa.parallel.env import any_rank, device_for, is_rank0, world_size
from esa.parallel.launch import detect_env
from esa.spec.manifest import ModelSpec

__all__ = ["wrap_model", "load_sharded", "is_dtensor", "gather_to_rank0", "local_box", "local_index",
           "local_data", "like_param", "shard_rows", "scaled_abs", "value_at"]

log = get_logger("parallel")


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a DTensor (a sharded parameter or a tensor built like one)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def wrap_model(model: nn.Module) -> nn.Module:
    """fully_shard each decoder block, the input embedding and the lm_head (separately, unless they
    are tied: then they stay in the root unit), then the root (final norm and what else is left).
    Separate units keep a large vocabulary's two matrices from being gathered at the same time.

    Every unit reshards after forward, the root too: after a no-grad forward its parameters
    are sharded DTensors again (FSDP2's default keeps the root unsharded, and an in-place
    perturbation of the shards would then not reach the next forward). A rank whose data leaves a
    parameter without a gradient (MoE routing) still joins its reduce-scatter."""
    from torch.distributed.fsdp import fully_shard

    for block in decoder_blocks(model):
        fully_shard(block, reshard_after_forward=True)
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = outputs is not None and inputs is not None and outputs.weight is inputs.weight
    for unit in ((inputs, outputs) if not tied else ()):
        if unit is not None:
            fully_shard(unit, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    model.set_reduce_scatter_unused_params(True)  # type: ignore[operator]
    return model


def load_sharded(spec: ModelSpec) -> LoadedModel:
    """The model sharded over the job's ranks; only rank 0 ever reads (and holds) the full weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    check_spec(spec)
    device = device_for(detect_env(), spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    source = locate_model(spec)
    tokenizer = load_tokenizer(spec, source)
    full, error = None, None
    if is_rank0():
        try:
            full = from_pretrained(spec, source, dtype)
        except UserError as exc:
            error = exc
    if any_rank(error is not None):  # the others would otherwise wait in the broadcast below
        raise error or UserError(f"could not load model '{spec.id}' on rank 0 (see its log)")
    model = from_config_on_meta(spec, source, dtype)
    wrap_model(model)
    model.to_empty(device=device)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers are not all in a state dict (rotary inv_freq is not persistent): after to_empty they
    # are uninitialised memory, so rank 0's are broadcast.
    theirs = dict(full.named_buffers()) if full is not None else {}
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in theirs:
                buf.copy_(theirs[name])
            dist.broadcast(buf, src=0)
    del full, theirs
    log.info("loaded %s sharded over %d ranks (%s, %s, %s attention) on %s", spec.id, world_size(),
             model_class_name(model), dtype_name(dtype), getattr(model.config, "_attn_implementation", "?"), device)
    return LoadedModel(model, tokenizer, device, dtype, source, spec)


def shard_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """[start, stop) of the dim-0 rows each rank holds under Shard(0) (torch.chunk sizes)."""
    step = -(-rows // world) if rows else 0
    return [(min(r * step, rows), min((r + 1) * step, rows)) for r in range(world)]


def gather_to_rank0(t: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor | None:
    """The full tensor on rank 0 (on `device`, default: where this rank's part lives); None on the
    other ranks. A plain tensor is returned as it is. Every rank must call it, in the same order."""
    if not is_dtensor(t):
        return (t if device is None else t.to(device)) if is_rank0() else None
    device = device or t.to_local().device
    from torch.distributed.tensor import Shard

    if len(t.placements) != 1 or not isinstance(t.placements[0], Shard) or t.placements[0].dim != 0:
        full = t.full_tensor()  # any other layout: an all-gather (not what FSDP2 produces)
        return full.to(device) if is_rank0() else None
    group = t.device_mesh.get_group()
    ranks, me = dist.get_world_size(group), dist.get_rank(group)
    local = t.to_local()
    rows = shard_rows(t.shape[0], ranks)
    if me != 0:
        if local.numel() > 0:
            dist.send(local.contiguous(), dst=dist.get_global_rank(group, 0), group=group)
        return None
    out = torch.empty(t.shape, dtype=t.dtype, device=local.device)
    out[rows[0][0]:rows[0][1]].copy_(local)
    for r in range(1, ranks):
        a, b = rows[r]
        if b > a:  # dim-0 slices of a contiguous tensor are contiguous: receive in place
            dist.recv(out[a:b], src=dist.get_global_rank(group, r), group=group)
    return out.to(device)


def local_box(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's part of a (possibly sharded) tensor."""
    if not is_dtensor(param):
        return tuple(param.shape), (0,) * param.ndim
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)


def local_index(param: torch.Tensor, index: Sequence[int]) -> tuple[int, ...] | None:
    """The local index of global coordinate `index` when this rank holds it, else None."""
    shape, offset = local_box(param)
    if all(o <= i < o + s for i, o, s in zip(index, offset, shape)):
        return tuple(int(i) - int(o) for i, o in zip(index, offset))
    return None


def local_data(param: torch.Tensor) -> torch.Tensor:
    """The storage an in-place write must hit: a DTensor's local shard (a view of FSDP2's sharded
    buffer, which the next all-gather reads), or the plain tensor's data."""
    return param.to_local() if is_dtensor(param) else param.data


def like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A tensor whose local part is `local`, laid out like `param` (a DTensor when it is one)."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def scaled_abs(param: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|param| · scale in fp32, `scale` broadcastable to the parameter's (global) shape; built on this
    rank's part only and laid out like the parameter (a DTensor when it is one)."""
    if not is_dtensor(param):
        return param.detach().abs().float().mul_(scale)
    shape, offset = local_box(param)
    lead = param.ndim - scale.ndim  # broadcasting aligns trailing dimensions
    index = tuple(slice(offset[lead + d], offset[lead + d] + shape[lead + d]) if scale.shape[d] > 1
                  else slice(None) for d in range(scale.ndim))
    local = param.to_local().detach().abs().float().mul_(scale[index])
    return like_param(local, param)


def value_at(param: torch.Tensor, index: Sequence[int]) -> float:
    """The value of one coordinate of a (possibly sharded) parameter, on every rank."""
    if not is_dtensor(param):
        return float(param.detach()[tuple(index)])
    from esa.parallel.env import all_sum, comm_device

    local = local_index(param, index)
    t = torch.zeros(1, dtype=torch.float64, device=comm_device())
    if local is not None:
        t += float(param.to_local().detach()[local])
    return float(all_sum(t).item())
