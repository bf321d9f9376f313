"""Every collective of the suite goes through these helpers, so that tensors land on the process group's device.

NCCL only accepts CUDA tensors and gloo only CPU ones; accelerate starts multi-GPU runs with plain NCCL, so a CPU
tensor handed to ``dist.broadcast`` crashes there while every CPU test passes. :func:`collective_device` picks the
device from the backend, and the helpers copy in and out of it. Outside a distributed run they do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_rank() -> int:
    """This process' global rank (0 outside a distributed run)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside a distributed run)."""
    return dist.get_world_size() if is_distributed() else 1


def device_for_backend(backend: str) -> torch.device:
    """The device whose tensors a backend's collectives accept.

    ``gloo`` and ``mpi`` (also inside a mixed ``"cpu:gloo,cuda:nccl"`` string) take CPU tensors; ``nccl`` takes the
    current CUDA device; any other backend (``xccl``, ``hccl``, ...) the current accelerator.
    """
    name = str(backend).lower()
    if "gloo" in name or name == "mpi":
        return torch.device("cpu")
    if name == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device for collectives on ``group`` (default group); CPU outside a distributed run."""
    if not is_distributed():
        return torch.device("cpu")
    return device_for_backend(dist.get_backend(group))


def _on_collective_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device)


@torch.no_grad()
def all_reduce_sum_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Sum each tensor over all ranks, in place, with one collective for the whole list.

    Tensors are flattened into one buffer of their common dtype on the group's device, reduced, and copied back
    (each keeps its own device and dtype). Use float64 tensors where the sum must be exact.
    """
    tensors = list(tensors)
    if not tensors or not is_distributed():
        return
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        raise TypeError(f"all_reduce_sum_ needs tensors of one dtype, got {sorted({str(t.dtype) for t in tensors})}")
    device = collective_device(group)
    flat = torch.cat([_on_collective_device(t, device).reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for t, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors]), strict=True):
        t.copy_(part.view(t.shape))


@torch.no_grad()
def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite each tensor with rank ``src``'s value, in place (any dtype, any device)."""
    if not is_distributed():
        return
    device = collective_device(group)
    for t in tensors:
        buf = _on_collective_device(t.data, device)
        dist.broadcast(buf, src=src, group=group)
        if buf is not t.data:
            t.data.copy_(buf)


def broadcast_int(value: int, src: int = 0, group: dist.ProcessGroup | None = None) -> int:
    """Rank ``src``'s integer (e.g. a secret seed) on every rank."""
    t = torch.tensor([int(value)], dtype=torch.int64)
    broadcast_([t], src=src, group=group)
    return int(t.item())


def broadcast_flag(flag: bool, src: int = 0, group: dist.ProcessGroup | None = None) -> bool:
    """Rank ``src``'s decision on every rank, so that all ranks run the same number of collectives."""
    return bool(broadcast_int(1 if flag else 0, src=src, group=group))


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every rank's ``tensor (n_r, ...)`` in rank order; the first dimension ``n_r`` may differ between ranks.

    Sizes are gathered first, each tensor is zero-padded to the largest ``n_r`` on the group's device, gathered, and
    trimmed back; results come back on ``tensor``'s device and dtype. Outside a distributed run: ``[tensor]``.
    Traffic per rank: ``world_size * max_r(n_r) * prod(tensor.shape[1:])`` elements received.
    """
    if not is_distributed():
        return [tensor]
    device = collective_device(group)
    n_ranks = dist.get_world_size(group)
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(n_ranks)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(n_ranks)]
    dist.all_gather(gathered, padded, group=group)
    return [g[:s].to(tensor.device) for g, s in zip(gathered, sizes, strict=True)]
