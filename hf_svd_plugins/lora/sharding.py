"""Sharded weights (DeepSpeed ZeRO-3 partitions, FSDP2 DTensors): detect them, gather them, read and write full values."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def is_dtensor(tensor: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and their optimizer state)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_fsdp1_flattened(param: torch.Tensor) -> bool:
    """True for a parameter that FSDP1 (``FullyShardedDataParallel``) flattened into a ``FlatParameter``."""
    return hasattr(param, "_fsdp_flattened") or type(param).__name__ == "FlatParameter"


def is_zero3_param(param: torch.Tensor) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3 (its ``.data`` is a local shard or empty)."""
    return hasattr(param, "ds_id")


def is_sharded(param: torch.Tensor) -> bool:
    """True if ``param`` holds only a shard on this rank (ZeRO-3 partition or FSDP2 ``DTensor``): in-place edits of
    ``param`` or ``param.data`` do not reach the full weight; use :func:`assign_lora_weights`."""
    return is_zero3_param(param) or is_dtensor(param)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's logical shape, also when ZeRO-3 has partitioned it (its local ``.shape`` is then a shard).

    A ``DTensor``'s ``.shape`` is already the global shape.
    """
    return tuple(getattr(param, "ds_shape", param.shape))


@contextlib.contextmanager
def gathered_parameters(params: Sequence[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full values of ``params`` inside the block, whatever the sharding.

    Under ZeRO-3 this is ``deepspeed.zero.GatheredParameters`` (all ranks must enter); with ``modifier_rank`` set,
    that rank's in-block writes are re-partitioned to every rank on exit. Elsewhere weights are whole: nothing to do.
    """
    zero3 = [p for p in params if is_zero3_param(p)]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=modifier_rank):
        yield



def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype master copies and exchanged values use: float32 for 16-bit parameters, else the parameter's."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A whole, detached copy of ``tensor`` on every rank: ``full_tensor()`` for an FSDP2 DTensor (a collective: all
    ranks must call), a clone otherwise (for a ZeRO-3 parameter, call inside :func:`gathered_parameters`)."""
    return tensor.full_tensor().detach().clone() if is_dtensor(tensor) else tensor.detach().clone()


@torch.no_grad()
def write_full_value(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target`` (a whole tensor, or a DTensor shard) := ``value`` (whole, rank 0's is used for a DTensor)."""
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        local = value.to(device=target.to_local().device, dtype=target.dtype)
        target.copy_(distribute_tensor(local, target.device_mesh, target.placements, src_data_rank=0))
    else:
        target.copy_(value.to(device=target.device, dtype=target.dtype))


