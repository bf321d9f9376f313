"""One place that knows PEFT's LoRA internals and how to read/write them when weights are distributed.

Every adapter of this suite (EVA, FedSVD, DP, ...) finds LoRA pairs through :func:`find_lora_pairs` and writes them
through :func:`assign_lora_weights`, so sharding and replication are handled once:

* DDP, DeepSpeed ZeRO-1/2: weights are whole on every rank; writes are broadcast from rank 0.
* DeepSpeed ZeRO-3: weights are partitioned; reads and writes gather them (``deepspeed.zero.GatheredParameters``).
* FSDP2 (``fully_shard``, accelerate's ``fsdp_version: 2``): weights are ``DTensor`` shards; reads use
  ``full_tensor()``, writes ``distribute_tensor(value, mesh, placements, src_data_rank=0)`` into the local shard.
* DeepSpeed keeps fp32 master weights and optimizer state in flat partitions: writes set the masters of exactly the
  written parameters (``deepspeed.utils.safe_set_full_fp32_param``) from the full-precision values, and
  :func:`read_optimizer_state` / :func:`write_optimizer_state` reach per-parameter optimizer state under every layout.

Shapes follow PyTorch: LoRA adds ``scaling * B @ A`` with ``A (r, d_in)`` and ``B (d_out, r)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_svd_plugins.distributed import broadcast_


@dataclass
class LoraPair:
    """A LoRA-adapted layer of a PEFT model, for one adapter.

    Attributes:
        name: module name relative to the base model (``model.layers.0.self_attn.q_proj``); stable across wrappers.
        module: the PEFT ``LoraLayer``.
        adapter: adapter name.
        A: ``lora_A`` weight parameter, shape ``(r, d_in)``.
        B: ``lora_B`` weight parameter, shape ``(d_out, r)``.
        fsdp_unit: under FSDP2, the innermost ``fully_shard`` module that owns the pair (``reshard()`` on it puts
            the sharded ``DTensor`` parameters back after a forward pass left them gathered), else None.
    """

    name: str
    module: nn.Module
    adapter: str
    fsdp_unit: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def A(self) -> nn.Parameter:  # noqa: N802 - the paper's name
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:  # noqa: N802
        return self.module.lora_B[self.adapter].weight

    @property
    def r(self) -> int:
        return int(self.module.r[self.adapter])

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def in_features(self) -> int:
        return int(self.module.in_features)

    @property
    def out_features(self) -> int:
        return int(self.module.out_features)

    @property
    def base_layer(self) -> nn.Module:
        return self.module.get_base_layer()


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / torch.compile wrappers (anything with ``.module`` or ``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "peft_config"):
            model = model.module
        else:
            return model


def unwrap_peft_model(model: nn.Module) -> nn.Module:
    """The ``PeftModel`` inside ``model`` (after unwrapping), or a ``ValueError`` that says how to make one."""
    inner = unwrap_model(model)
    if not hasattr(inner, "peft_config"):
        raise ValueError(
            f"model of type {type(inner).__name__} has no LoRA adapter; wrap it first with "
            "`peft.get_peft_model(model, LoraConfig(target_modules=[...]))`"
        )
    return inner


def base_module_name(name: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj`` (the name users and PEFT configs use)."""
    prefix = "base_model.model."
    return name[len(prefix) :] if name.startswith(prefix) else name


def find_lora_pairs(model: nn.Module, adapter_name: str | None = None) -> list[LoraPair]:
    """Every LoRA pair (A, B) of ``adapter_name`` (default: the active adapter) in a PEFT model, in module order.

    Only ``nn.Linear``-style LoRA layers are returned (Linear and GPT-2 ``Conv1D`` bases); embedding and conv LoRA
    layers have no ``(r, d_in)`` A matrix and are skipped. Works on whole, ZeRO-3 and FSDP2 (``DTensor``) weights;
    FSDP1's flattened parameters are refused.
    """
    from peft.tuners.lora import LoraLayer

    peft_model = unwrap_peft_model(model)
    if adapter_name is None:
        adapter_name = getattr(peft_model, "active_adapter", None) or "default"
    if adapter_name not in peft_model.peft_config:
        raise ValueError(
            f"adapter_name={adapter_name!r} not found; the model has adapters {sorted(peft_model.peft_config)}"
        )
    units = _fsdp2_units(model)
    pairs = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module.lora_A[adapter_name], nn.Linear):
            continue
        owner = next((unit for prefix, unit in units if name.startswith(prefix)), None)
        pairs.append(LoraPair(name=base_module_name(name), module=module, adapter=adapter_name, fsdp_unit=owner))
    if pairs and is_fsdp1_flattened(pairs[0].A):
        raise NotImplementedError(
            "LoRA weights flattened by FSDP1 are not supported; use FSDP2 (`fsdp_version: 2` in the accelerate "
            "config, see accelerate_configs/fsdp.yaml), DeepSpeed ZeRO-3 or DDP"
        )
    return pairs


def _fsdp2_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name prefix, module)`` of every FSDP2 ``fully_shard`` module inside the PEFT model, innermost first.

    Prefixes are relative to the PEFT model (``named_modules`` of the unwrapped model); the root unit has prefix "".
    """
    from torch.distributed.fsdp import FSDPModule

    peft_model = unwrap_peft_model(model)
    units = [(name + "." if name else "", m) for name, m in peft_model.named_modules() if isinstance(m, FSDPModule)]
    return sorted(units, key=lambda unit: -len(unit[0]))


# --------------------------------------------------------------------------------------------- distributed helpers


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


# --------------------------------------------------------------------------------------------- reading and writing


def _reshard(pairs: Sequence[LoraPair]) -> None:
    """Put FSDP2 units back into their sharded state (a forward without backward, e.g. EVA's statistics pass or an
    evaluation, leaves the root unit gathered; writes into gathered copies would be lost at the next reshard)."""
    seen: set[int] = set()
    for pair in pairs:
        unit = pair.fsdp_unit
        if unit is not None and id(unit) not in seen:
            seen.add(id(unit))
            unit.reshard()


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype master copies and exchanged values use: float32 for 16-bit parameters, else the parameter's."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A whole, detached copy of ``tensor`` on every rank: ``full_tensor()`` for an FSDP2 DTensor (a collective: all
    ranks must call), a clone otherwise (for a ZeRO-3 parameter, call inside :func:`gathered_parameters`)."""
    return tensor.full_tensor().detach().clone() if is_dtensor(tensor) else tensor.detach().clone()


@torch.no_grad()
def _write_full_value(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target`` (a whole tensor, or a DTensor shard) := ``value`` (whole, rank 0's is used for a DTensor)."""
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        local = value.to(device=target.to_local().device, dtype=target.dtype)
        target.copy_(distribute_tensor(local, target.device_mesh, target.placements, src_data_rank=0))
    else:
        target.copy_(value.to(device=target.device, dtype=target.dtype))


@torch.no_grad()
def assign_lora_weights(
    pairs: Sequence[LoraPair],
    values: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]],
    optimizer: object | None = None,
) -> None:
    """Write new ``(A, B)`` values into LoRA pairs; every rank ends with rank 0's values.

    Args:
        pairs: the pairs to write (all ranks must pass the same list, in the same order).
        values: ``{pair.name: (A (r, d_in) or None, B (d_out, r) or None)}``; None keeps that matrix. Only rank 0's
            values are used, other ranks may pass the same or anything of the right shape. Pass them in float32 or
            float64: each parameter gets one cast to its dtype, and fp32 master copies get the unrounded values.
        optimizer: the training optimizer; if it keeps fp32 master weights (DeepSpeed ZeRO / bf16 / fp16), the
            masters of the written (trainable) parameters are set, otherwise its next step would overwrite them.
            Other parameters' masters are not touched.

    Under ZeRO-3 the full weights are gathered, rank 0 writes and DeepSpeed re-partitions; under FSDP2 rank 0's value
    is scattered into the ``DTensor`` shards; under DDP/ZeRO-1/2 the values are broadcast from rank 0.
    """
    _reshard(pairs)
    targets: list[tuple[nn.Parameter, torch.Tensor]] = []
    for pair in pairs:
        if pair.name not in values:
            continue
        for param, value in zip((pair.A, pair.B), values[pair.name], strict=True):
            if value is None:
                continue
            if tuple(value.shape) != full_shape(param):
                raise ValueError(
                    f"value of shape {tuple(value.shape)} does not fit parameter {full_shape(param)} of {pair.name}"
                )
            targets.append((param, value))
    master = master_weights_optimizer(optimizer)
    # Rank 0's full-precision values reach every rank that writes a whole weight or a master copy.
    exchanged = [
        value.to(dtype=_wide_dtype(param.dtype), device=param.device).contiguous()
        if not is_dtensor(param) and (not is_zero3_param(param) or (master is not None and param.requires_grad))
        else None
        for param, value in targets
    ]
    broadcast_([v for v in exchanged if v is not None], src=0)
    zero3 = [p for p, _ in targets if is_zero3_param(p)]
    with gathered_parameters(zero3, modifier_rank=0):
        for (param, value), wide in zip(targets, exchanged, strict=True):
            if is_dtensor(param):
                _write_full_value(param, value)
            elif is_zero3_param(param):  # DeepSpeed re-partitions rank 0's gathered weight on exit
                param.data.copy_(value.to(device=param.device, dtype=param.dtype))
            else:
                param.data.copy_(wide)
    if master is not None:
        _write_master_weights(master, [(p, w) for (p, _), w in zip(targets, exchanged, strict=True) if w is not None])


@torch.no_grad()
def read_lora_weights(
    pairs: Sequence[LoraPair], optimizer: object | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full ``{name: (A, B)}`` copies on every rank (ZeRO-3 and FSDP2 shards are gathered; all ranks must call).

    Args:
        pairs: the pairs to read.
        optimizer: the training optimizer. If it keeps fp32 master weights (DeepSpeed with bf16/fp16 weights), the
            trainable parameters are read from their masters, in float32: those are the values training continues
            from, the 16-bit weights are their rounded copies. Frozen parameters have no master.
    """
    _reshard(pairs)
    master = master_weights_optimizer(optimizer)
    params = [p for pair in pairs for p in (pair.A, pair.B)]
    with gathered_parameters(params):
        weights = {pair.name: (full_value(pair.A), full_value(pair.B)) for pair in pairs}
    if master is not None:
        from deepspeed.utils import safe_get_full_fp32_param

        for pair in pairs:
            a, b = weights[pair.name]
            full = [
                safe_get_full_fp32_param(p).detach().clone().reshape(full_shape(p))
                if p.requires_grad and _has_fp32_fragment(p)
                else value
                for p, value in ((pair.A, a), (pair.B, b))
            ]
            weights[pair.name] = (full[0], full[1])
    return weights


# --------------------------------------------------------------------------------------------- optimizers


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


def _has_fp32_fragment(param: torch.Tensor) -> bool:
    """Whether DeepSpeed mapped ``param`` to its fp32 partitions (ZeRO-3 ``ds_id``; ZeRO-1/2 and bf16 set
    ``_hp_mapping``, None on ranks whose partition holds none of it)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


@torch.no_grad()
def _write_master_weights(master: object, written: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Set the fp32 masters of the written trainable parameters (frozen ones have none) from full values that are
    identical on every rank (each rank copies its own partition)."""
    trainable = [(p, v) for p, v in written if p.requires_grad]
    if any(not _has_fp32_fragment(p) for p, _ in trainable):
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
                _write_full_value(target, value)
            else:
                full = value.to(device=target.device, dtype=_wide_dtype(target.dtype)).contiguous()
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
