"""Whole PEFT adapters out of sharded models: every weight PEFT saves, frozen ones included, gathered onto rank 0.

transformers' Trainer saves a PEFT model under DeepSpeed ZeRO-3 from
``_zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)``: adapter weights that are frozen but not
constant (FedSVD's refactorized ``lora_A``) are left out of ``adapter_model.safetensors``. :func:`save_full_adapter`
writes the adapter from the gathered values instead, through PEFT's own ``save_pretrained``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable

import torch
from torch import nn

from hf_svd_plugins.distributed import process_rank
from hf_svd_plugins.lora.pairs import unwrap_peft_model
from hf_svd_plugins.lora.sharding import full_value, gathered_parameters, is_dtensor


@torch.no_grad()
def gathered_cpu_state(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """``{name: whole CPU copy}`` of (ZeRO-3- or FSDP2-sharded) tensors on rank 0, None elsewhere.

    Every rank must call it with the same tensors in the same order: they are gathered one at a time, so beyond rank
    0's copies no rank holds more than one full tensor.
    """
    rank0 = process_rank() == 0
    state: dict[str, torch.Tensor] = {}
    for name, tensor in named_tensors:
        with gathered_parameters([tensor] if isinstance(tensor, nn.Parameter) else []):
            value = full_value(tensor) if is_dtensor(tensor) else tensor  # full_tensor(): every rank takes part
            if rank0:
                state[name] = value.detach().to("cpu", copy=True)
    return state if rank0 else None


def adapter_tensors(model: nn.Module, adapter_names: Iterable[str] | None = None) -> list[tuple[str, torch.Tensor]]:
    """``(name in the PeftModel, tensor)`` of every parameter and buffer that PEFT saves for ``adapter_names``
    (default: all adapters), frozen ones included, in the model's order; the tensors are the model's own (possibly
    sharded), not copies.

    The selection is PEFT's: ``get_peft_model_state_dict`` is run on the model's own tensors and its picks are matched
    back by identity, so ``modules_to_save`` heads, DoRA magnitudes and saved embeddings are covered as PEFT covers them.
    """
    from peft.utils import get_peft_model_state_dict

    peft_model = unwrap_peft_model(model)
    tensors = {**dict(peft_model.named_parameters()), **dict(peft_model.named_buffers())}
    picked: set[int] = set()
    for adapter in list(adapter_names) if adapter_names is not None else list(peft_model.peft_config):
        picked.update(id(t) for t in get_peft_model_state_dict(peft_model, state_dict=tensors, adapter_name=adapter).values())
    return [(name, t) for name, t in tensors.items() if id(t) in picked]


def gathered_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Whole CPU copies of every adapter tensor of ``model`` (:func:`adapter_tensors`), keyed by their names in the
    PeftModel (what ``PeftModel.save_pretrained(state_dict=...)`` expects), on rank 0; None elsewhere. Every rank must
    call it (ZeRO-3 and FSDP2 gather). Memory on rank 0: one copy of the adapter, e.g. ``2 r (d_in + d_out)`` entries per
    LoRA pair."""
    return gathered_cpu_state(adapter_tensors(model))


def save_full_adapter(trainer_or_model: object, output_dir: str) -> None:
    """Save the whole PEFT adapter (frozen adapter weights included) where ``Trainer.save_model`` would.

    Under DeepSpeed ZeRO-3, ``trainer.save_model(d)`` writes only the *trainable* adapter weights (transformers
    consolidates with ``exclude_frozen_parameters=True``), so a refactorized frozen ``lora_A`` is lost; call this instead
    of ``trainer.save_model`` for the adapter. Given a ``Trainer`` it first runs ``trainer.save_model(output_dir)``
    (tokenizer, training arguments), then rewrites the adapter files with the gathered full adapter through PEFT's
    ``save_pretrained``; given a model (a PeftModel, possibly wrapped) it writes only the adapter. The result loads with
    ``PeftModel.from_pretrained``. Every rank must call it; rank 0 writes. Elsewhere (one process, DDP, ZeRO-1/2)
    the files equal what ``save_model`` writes.
    """
    is_trainer = hasattr(trainer_or_model, "save_model") and hasattr(trainer_or_model, "args")
    model = trainer_or_model.model if is_trainer else trainer_or_model
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"save_full_adapter needs a transformers Trainer or a PEFT model, got {type(trainer_or_model).__name__}"
        )
    peft_model = unwrap_peft_model(model)
    if is_trainer:
        trainer_or_model.save_model(output_dir)
    state = gathered_adapter_state_dict(peft_model)
    if state is not None:
        save_adapter_state_dict(peft_model, output_dir, state)


def save_adapter_state_dict(model: nn.Module, output_dir: str, state: dict[str, torch.Tensor]) -> None:
    """``PeftModel.save_pretrained(output_dir, state_dict=state)`` for ``model`` (a PeftModel, possibly wrapped; ``state``
    from :func:`gathered_adapter_state_dict`; this process only), written into a temporary folder inside
    ``output_dir`` and renamed file by file (same filesystem: each rename is atomic), so a reader of ``output_dir`` (a
    Hub upload in the background) sees each file old or new, never half written. An existing README.md (the model
    card) is kept."""
    peft_model = unwrap_peft_model(model)
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".adapter-{process_rank()}-{os.getpid()}-", dir=output_dir)
    try:
        peft_model.save_pretrained(tmp, state_dict=state)
        for root, _, files in os.walk(tmp):
            target_dir = os.path.join(output_dir, os.path.relpath(root, tmp))
            os.makedirs(target_dir, exist_ok=True)
            for name in files:
                target = os.path.join(target_dir, name)
                if name == "README.md" and os.path.exists(target):
                    continue
                os.replace(os.path.join(root, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
