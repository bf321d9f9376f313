"""Optimizers around LoRA weights: the chain of wrappers, DeepSpeed fp32 master weights, per-parameter optimizer state
(moments) read and written under every layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hf_svd_plugins.distributed import broadcast_
from hf_svd_plugins.lora.sharding import (
    full_shape,
    full_value,
    is_dtensor,
    is_zero3_param,
    wide_dtype,
    write_full_value,
)


def optimizer_chain(optimizer: object | None) -> list[object]:
    """``optimizer`` and every optimizer it wraps (``.optimizer``), outermost first.

    E.g. accelerate's ``AcceleratedOptimizer`` -> DeepSpeed's ZeRO optimizer -> the torch ``AdamW`` holding the flat
    fp32 partitions; or ``AcceleratedOptimizer`` -> ``AdamW``. Empty for None.
    """
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def master_weights_optimizer(optimizer: object | None) -> object | None:
    """The DeepSpeed optimizer (ZeRO-1/2/3, bf16, fp16) in ``optimizer``'s chain, if any.

    It keeps fp32 master weights and the optimizer state in flat partitions of its own, not keyed by the model's
    parameters; reach them per parameter through :func:`assign_lora_weights` and :func:`read_optimizer_state`.
    """
    return next((o for o in optimizer_chain(optimizer) if hasattr(o, "refresh_fp32_params")), None)


def base_optimizer(optimizer: object | None) -> torch.optim.Optimizer | None:
    """The innermost ``torch.optim.Optimizer`` of ``optimizer``'s chain (the one that owns ``state``), if any."""
    chain = optimizer_chain(optimizer)
    return chain[-1] if chain and isinstance(chain[-1], torch.optim.Optimizer) else None


def has_fp32_fragment(param: torch.Tensor) -> bool:
    """Whether DeepSpeed mapped ``param`` to its fp32 partitions (ZeRO-3 ``ds_id``; ZeRO-1/2 and bf16 set
    ``_hp_mapping``, None on ranks whose partition holds none of it)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


@torch.no_grad()
def write_master_weights(master: object, written: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Set the fp32 masters of the written trainable parameters (frozen ones have none) from full values that are
    identical on every rank (each rank copies its own partition)."""
    trainable = [(p, v) for p, v in written if p.requires_grad]
    if any(not has_fp32_fragment(p) for p, _ in trainable):
        # A DeepSpeed optimizer without per-parameter fragment mappings: refresh every master from the 16-bit
        # weights (rounds all masters to the 16-bit precision, but never leaves them stale).
        master.refresh_fp32_params()
        return
    for param, value in trainable:
        _set_deepspeed_fp32(param, value, None)


def _set_deepspeed_fp32(param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """DeepSpeed's fp32 copy of ``param`` (its master if ``key`` is None, else optimizer state ``key``) := ``value``
    (full, identical on every rank).

    ZeRO-3 goes through the local API with this rank's slice of the zero-padded flat value: the full-value API
    (``set_full_hp_param``) reads past the end on the last rank when the parameter does not split evenly.
    """
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    value = value.to(torch.float32)
    if is_zero3_param(param):
        import torch.distributed as dist

        size = param.ds_tensor.numel()
        start = size * dist.get_rank(group=getattr(param, "ds_process_group", None))
        local = value.flatten()[start : start + size]
        local = torch.cat([local, local.new_zeros(size - local.numel())])
        if key is None:
            safe_set_local_fp32_param(param, local)
        else:
            safe_set_local_optimizer_state(param, local, key)
    elif key is None:
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)


MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
"""The per-parameter optimizer state entries :func:`read_optimizer_state` knows (Adam/AdamW moments, AMSGrad's
maximum, SGD momentum)."""


@torch.no_grad()
def read_optimizer_state(
    optimizer: object | None, params: Sequence[nn.Parameter], keys: Sequence[str] = MOMENT_KEYS
) -> list[dict[str, torch.Tensor]]:
    """Full copies of each parameter's optimizer state (``{key: tensor of the parameter's full shape}``).

    Entries of ``keys`` the optimizer does not keep (or has not created yet: before the first step) are absent.
    Works for a torch optimizer (also inside accelerate's wrapper; FSDP2 ``DTensor`` state is gathered) and for
    DeepSpeed ZeRO-1/2/3 (``deepspeed.utils.safe_get_full_optimizer_state``). Collective under DeepSpeed and FSDP2:
    all ranks must call with the same ``params`` in the same order.
    """
    master = master_weights_optimizer(optimizer)
    if master is not None:
        from deepspeed.utils import safe_get_full_optimizer_state

        present = _deepspeed_state_keys(optimizer, keys)
        out = []
        for p in params:
            entries = {}
            for key in present:
                value = safe_get_full_optimizer_state(p, key) if p.requires_grad else None
                if value is not None:
                    entries[key] = value.detach().clone().reshape(full_shape(p))
            out.append(entries)
        return out
    base = base_optimizer(optimizer)
    if base is None:
        return [{} for _ in params]
    return [
        {k: full_value(v) for k, v in base.state.get(p, {}).items() if k in keys and torch.is_tensor(v) and v.dim()}
        for p in params
    ]


def _deepspeed_state_keys(optimizer: object, keys: Sequence[str]) -> list[str]:
    base = base_optimizer(optimizer)
    found = {k for state in (base.state.values() if base is not None else []) for k in state}
    return [k for k in keys if k in found]


@torch.no_grad()
def write_optimizer_state(
    optimizer: object | None, params: Sequence[nn.Parameter], states: Sequence[Mapping[str, torch.Tensor]]
) -> None:
    """Set entries of each parameter's optimizer state from full tensors (rank 0's values are used).

    The counterpart of :func:`read_optimizer_state`: ``states[i]`` maps keys the optimizer already keeps for
    ``params[i]`` to tensors of the parameter's full shape; other keys (e.g. Adam's step count) stay as they are.
    Collective under DeepSpeed and FSDP2.
    """
    master = master_weights_optimizer(optimizer)
    if master is not None:
        for p, entries in zip(params, states, strict=True):
            for key, value in entries.items():
                full = value.to(dtype=torch.float32).contiguous()
                broadcast_([full], src=0)
                _set_deepspeed_fp32(p, full, key)
        return
    base = base_optimizer(optimizer)
    if base is None:
        return
    for p, entries in zip(params, states, strict=True):
        state = base.state.get(p, {})
        for key, value in entries.items():
            if key not in state:
                raise ValueError(f"the optimizer keeps no {key!r} for this parameter (keys: {sorted(state)})")
            target = state[key]
            if is_dtensor(target):
                write_full_value(target, value)
            else:
                full = value.to(device=target.device, dtype=wide_dtype(target.dtype)).contiguous()
                broadcast_([full], src=0)
                target.copy_(full)


@torch.no_grad()
def reset_optimizer_state(optimizer: object | None, params: Sequence[nn.Parameter]) -> str:
    """Forget the optimizer's per-parameter state (Adam moments, step count) of ``params``.

    * A torch optimizer (possibly inside accelerate's ``AcceleratedOptimizer``; FSDP2 included): ``state[p]`` is
      removed for each ``p`` in ``params``; the next step re-initialises it exactly as for a fresh optimizer.
    * DeepSpeed ZeRO (its base optimizer holds flat fp32 partitions with one step count per partition): every state
      tensor of the base optimizer is zeroed and its step counts set to 0. That resets *all* trainable parameters.

    Returns:
        ``"params"``, ``"all"`` (DeepSpeed) or ``"none"`` (no optimizer or nothing to reset).
    """
    base = base_optimizer(optimizer)
    if base is None:
        return "none"
    if master_weights_optimizer(optimizer) is not None or any(
        type(o).__module__.startswith("deepspeed") for o in optimizer_chain(optimizer)
    ):
        for state in base.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    value.zero_()
                elif key == "step":
                    state[key] = 0
        return "all"
    for p in params:
        base.state.pop(p, None)
    return "params"


