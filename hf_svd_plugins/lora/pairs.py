"""LoRA pairs of a PEFT model: find them, and read or write their full values under every layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_svd_plugins.distributed import broadcast_
from hf_svd_plugins.lora.optimizer_state import (
    has_fp32_fragment,
    master_weights_optimizer,
    write_master_weights,
)
from hf_svd_plugins.lora.sharding import (
    full_shape,
    full_value,
    gathered_parameters,
    is_dtensor,
    is_fsdp1_flattened,
    is_zero3_param,
    wide_dtype,
    write_full_value,
)


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



def _reshard(pairs: Sequence[LoraPair]) -> None:
    """Put FSDP2 units back into their sharded state (a forward without backward, e.g. EVA's statistics pass or an
    evaluation, leaves the root unit gathered; writes into gathered copies would be lost at the next reshard)."""
    seen: set[int] = set()
    for pair in pairs:
        unit = pair.fsdp_unit
        if unit is not None and id(unit) not in seen:
            seen.add(id(unit))
            unit.reshard()




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
        value.to(dtype=wide_dtype(param.dtype), device=param.device).contiguous()
        if not is_dtensor(param) and (not is_zero3_param(param) or (master is not None and param.requires_grad))
        else None
        for param, value in targets
    ]
    broadcast_([v for v in exchanged if v is not None], src=0)
    zero3 = [p for p, _ in targets if is_zero3_param(p)]
    with gathered_parameters(zero3, modifier_rank=0):
        for (param, value), wide in zip(targets, exchanged, strict=True):
            if is_dtensor(param):
                write_full_value(param, value)
            elif is_zero3_param(param):  # DeepSpeed re-partitions rank 0's gathered weight on exit
                param.data.copy_(value.to(device=param.device, dtype=param.dtype))
            else:
                param.data.copy_(wide)
    if master is not None:
        write_master_weights(master, [(p, w) for (p, _), w in zip(targets, exchanged, strict=True) if w is not None])


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
                if p.requires_grad and has_fp32_fragment(p)
                else value
                for p, value in ((pair.A, a), (pair.B, b))
            ]
            weights[pair.name] = (full[0], full[1])
    return weights


