"""The base layers of a (PEFT) model as compression sees them, merged adapters, and full CPU copies of sharded models."""

from __future__ import annotations

import torch
from torch import nn

from hf_svd_plugins.lora.pairs import base_module_name, unwrap_model
from hf_svd_plugins.lora.saving import gathered_cpu_state
from hf_svd_plugins.lora.sharding import is_zero3_param


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
    """A whole copy of a (possibly ZeRO-3- or FSDP2-sharded) transformers model on CPU, on rank 0; None elsewhere.

    Every rank must call it: parameters are gathered one at a time, so beyond rank 0's copy no rank holds more than
    one full weight. The copy is rebuilt from the model's config (a ``PreTrainedModel``, or a PEFT model around one,
    whose active adapter is re-attached with the same ``LoraConfig``), in the parameters' dtype, and loaded with the
    gathered values; buffers are not sharded by ZeRO-3 and are copied as they are.
    """
    inner = unwrap_model(model)
    base = inner.get_base_model() if hasattr(inner, "peft_config") else inner
    if not hasattr(base, "config"):
        raise ValueError(f"a gathered copy needs a transformers model with a config, got {type(base).__name__}")
    state = gathered_cpu_state(inner.named_parameters())
    if state is None:
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

