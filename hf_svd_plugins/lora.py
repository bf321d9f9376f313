"""One place that knows PEFT's LoRA internals and how to read/write them when weights are distributed.

Every adapter of this suite (EVA, FedSVD, DP, ...) finds LoRA pairs through :func:`find_lora_pairs` and writes them
through :func:`assign_lora_weights`, so sharding (DeepSpeed ZeRO-3) and replication (DDP, ZeRO-1/2: every rank must end
with identical values, and DeepSpeed's fp32 master copies must follow) are handled once.

Shapes follow PyTorch: LoRA adds ``scaling * B @ A`` with ``A (r, d_in)`` and ``B (d_out, r)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

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
    """

    name: str
    module: nn.Module
    adapter: str

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
    layers have no ``(r, d_in)`` A matrix and are skipped.
    """
    from peft.tuners.lora import LoraLayer

    peft_model = unwrap_peft_model(model)
    if adapter_name is None:
        adapter_name = getattr(peft_model, "active_adapter", None) or "default"
    if adapter_name not in peft_model.peft_config:
        raise ValueError(
            f"adapter_name={adapter_name!r} not found; the model has adapters {sorted(peft_model.peft_config)}"
        )
    pairs = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module.lora_A[adapter_name], nn.Linear):
            continue
        pairs.append(LoraPair(name=base_module_name(name), module=module, adapter=adapter_name))
    if pairs and is_fsdp_sharded(pairs[0].A):
        raise NotImplementedError(
            "LoRA weights sharded by FSDP are not supported by hf_svd_plugins yet; use DeepSpeed ZeRO-3 "
            "(accelerate_configs/deepspeed_zero3.yaml) or DDP, which are supported and tested"
        )
    return pairs


# --------------------------------------------------------------------------------------------- distributed helpers


def is_fsdp_sharded(param: torch.Tensor) -> bool:
    """True for a parameter managed by FSDP (a DTensor under FSDP2, a flattened view under FSDP1)."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) or hasattr(param, "_fsdp_flattened") or type(param).__name__ == "FlatParameter"


def is_zero3_param(param: torch.Tensor) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3 (its ``.data`` is a local shard or empty)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's logical shape, also when ZeRO-3 has partitioned it (its local ``.shape`` is then a shard)."""
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


def find_optimizer_with_master_weights(optimizer: object | None) -> object | None:
    """The DeepSpeed ZeRO/fp16 optimizer inside accelerate/Trainer wrappers, if any (it keeps fp32 master weights)."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if hasattr(optimizer, "refresh_fp32_params"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


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
            values are used, other ranks may pass the same or anything of the right shape.
        optimizer: the training optimizer; if it keeps master copies (DeepSpeed ZeRO, fp16), they are refreshed
            from the new weights, otherwise its next step would overwrite them.

    Casts to each parameter's dtype and device. Under ZeRO-3 the full weights are gathered, rank 0 writes and
    DeepSpeed re-partitions; under DDP/ZeRO-1/2 the written tensors are broadcast from rank 0.
    """
    targets: list[tuple[nn.Parameter, torch.Tensor]] = []
    for pair in pairs:
        if pair.name not in values:
            continue
        new_a, new_b = values[pair.name]
        if new_a is not None:
            targets.append((pair.A, new_a))
        if new_b is not None:
            targets.append((pair.B, new_b))
    params = [p for p, _ in targets]
    with gathered_parameters(params, modifier_rank=0):
        for param, value in targets:
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"value of shape {tuple(value.shape)} does not fit parameter {tuple(param.shape)}")
            param.data.copy_(value.to(device=param.device, dtype=param.dtype))
        replicated = [p.data for p in params if not is_zero3_param(p)]
        broadcast_(replicated, src=0)
    master = find_optimizer_with_master_weights(optimizer)
    if master is not None:
        master.refresh_fp32_params()


@torch.no_grad()
def read_lora_weights(pairs: Sequence[LoraPair]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full ``{name: (A, B)}`` copies on every rank (ZeRO-3 shards are gathered; all ranks must call)."""
    params = [p for pair in pairs for p in (pair.A, pair.B)]
    with gathered_parameters(params):
        return {pair.name: (pair.A.detach().clone(), pair.B.detach().clone()) for pair in pairs}


# --------------------------------------------------------------------------------------------- layers for compression


def named_base_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """Every module of the underlying model as ``(name, outer, layer)``, skipping adapter internals.

    ``name`` is the module's name in the merged model (:func:`base_module_name`); ``outer`` is what runs in the forward
    pass: a PEFT ``LoraLayer`` for an adapted layer (its output includes the adapter, so the gradient there is the
    gradient w.r.t. the merged weight ``W + s B A``), a ``ModulesToSaveWrapper`` for a trained copy, else the module
    itself; ``layer`` holds the base weight (``LoraLayer.get_base_layer()``, the active copy of a
    ``ModulesToSaveWrapper``). LoRA's own ``lora_A``/``lora_B`` Linears, dropouts and base-layer duplicates are left out.
    """
    inner = unwrap_model(model)
    if not hasattr(inner, "peft_config"):
        return [(name, module, module) for name, module in inner.named_modules()]
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    layers, skip_below = [], []
    for name, module in inner.named_modules():
        if any(name.startswith(prefix) for prefix in skip_below):
            continue
        if isinstance(module, LoraLayer):
            layers.append((base_module_name(name), module, module.get_base_layer()))
            skip_below.append(name + ".")
        elif isinstance(module, ModulesToSaveWrapper):
            active = module.active_adapter
            active = active[0] if isinstance(active, (list, tuple)) else active
            copy = module.modules_to_save[active] if active in module.modules_to_save else module.original_module
            layers.append((base_module_name(name), module, copy))
            skip_below.append(name + ".")
        elif name.startswith("base_model.model.") or name in ("", "base_model", "base_model.model"):
            if name in ("", "base_model"):
                continue
            layers.append((base_module_name(name), module, module))
    return layers


def merge_lora_adapters(model: nn.Module) -> nn.Module:
    """The underlying model with every active adapter merged into its base weights (``merge_and_unload``); a model
    without adapters is returned unwrapped and unchanged. The base model is modified in place."""
    inner = unwrap_model(model)
    if not hasattr(inner, "peft_config"):
        return inner
    if any(is_zero3_param(p) for p in inner.parameters()):
        raise ValueError("merge LoRA adapters of a ZeRO-3 model on a gathered copy (gathered_cpu_copy), not in place")
    return inner.merge_and_unload()


@torch.no_grad()
def gathered_cpu_copy(model: nn.Module) -> nn.Module | None:
    """A whole copy of a (possibly ZeRO-3-sharded) transformers model on CPU, on rank 0; None on other ranks.

    Every rank must call it: parameters are gathered one at a time, so beyond rank 0's copy no rank holds more than
    one full weight. The copy is rebuilt from the model's config (a ``PreTrainedModel``, or a PEFT model around one,
    whose active adapter is re-attached with the same ``LoraConfig``), in the parameters' dtype, and loaded with the
    gathered values; buffers are not sharded by ZeRO-3 and are copied as they are.
    """
    from hf_svd_plugins.distributed import process_rank

    inner = unwrap_model(model)
    base = inner.get_base_model() if hasattr(inner, "peft_config") else inner
    if not hasattr(base, "config"):
        raise ValueError(f"a gathered copy needs a transformers model with a config, got {type(base).__name__}")
    state = {}
    for name, param in inner.named_parameters():
        with gathered_parameters([param]):
            if process_rank() == 0:
                state[name] = param.detach().to("cpu", copy=True)
    if process_rank() != 0:
        return None
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    copy = type(base)(base.config).to(dtype)
    if hasattr(inner, "peft_config"):
        from peft import get_peft_model

        adapter = getattr(inner, "active_adapter", None) or "default"
        copy = get_peft_model(copy, inner.peft_config[adapter], adapter_name=adapter)
    persistent = copy.state_dict().keys()  # non-persistent buffers (RoPE inv_freq) are rebuilt by the constructor
    for name, buffer in inner.named_buffers():
        if name in persistent:
            state.setdefault(name, buffer.detach().to("cpu", copy=True))
    missing, unexpected = copy.load_state_dict(state, strict=False)
    params = dict(copy.named_parameters())
    missing = [k for k in missing if k in params]
    if missing or unexpected:
        raise RuntimeError(f"gathered copy does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return copy.eval()


def loss_module(model: nn.Module) -> nn.Module:
    """The module whose forward computes the loss: the transformers model inside a PEFT model, else ``model``
    (unwrapped). Hooks that must see the logits the loss was computed from attach there: wrappers (PEFT, DeepSpeed's
    per-module output functions) hand back new tensors around them."""
    inner = unwrap_model(model)
    return inner.get_base_model() if hasattr(inner, "peft_config") else inner
