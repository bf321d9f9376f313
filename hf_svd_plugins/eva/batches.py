"""What EVA's forward passes read: dict-like batches on the execution device, the token mask, the forward's keyword
arguments, and the cycling over a dataloader that refuses empty or all-masked data."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from hf_svd_plugins.distributed import all_gather_rows
from hf_svd_plugins.eva.config import EvaConfig


def token_mask(batch: Mapping, config: EvaConfig) -> torch.Tensor | None:
    """``(batch, seq)`` bool mask of tokens whose activations count: not padding, and (optionally) not label-masked."""
    ids = batch.get("input_ids")
    mask = batch.get("attention_mask")
    if mask is None and ids is None:
        return None
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    if config.use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != config.label_mask_value)
    return mask


def select_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows ``(n, d)`` of a layer input ``x (..., d)``: masked tokens if ``x`` is per token, all rows otherwise."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def _accepted(forward, name: str) -> bool:
    return name in inspect.signature(forward).parameters


def eva_forward_kwargs(model: nn.Module, batch: Mapping) -> dict:
    """``batch`` as keyword arguments for EVA's forward: only what the model's ``forward`` accepts, no ``labels``
    (EVA needs the layer inputs, not a loss; encoder-decoders keep them to build decoder inputs), and where the base
    model accepts them ``use_cache=False`` and ``logits_to_keep=1``, so no KV cache and no ``(tokens x vocab)``
    logits are ever materialised."""
    params = inspect.signature(model.forward).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in batch.items() if accepts_any or k in params}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        kwargs.pop("labels", None)
    for name, value in (("use_cache", False), ("logits_to_keep", 1)):
        if _accepted(base.forward, name) and name not in kwargs:
            kwargs[name] = value
    return kwargs


def as_mapping(batch: object) -> Mapping:
    if isinstance(batch, Mapping):
        return batch
    if hasattr(batch, "keys") and hasattr(batch, "__getitem__"):  # BatchEncoding, UserDict
        return {k: batch[k] for k in batch.keys()}
    raise TypeError(
        f"EVA needs dict-like batches (input_ids, attention_mask, labels ...), got {type(batch).__name__}; "
        "use a collator that returns a dict or a BatchEncoding"
    )


def execution_device(model: nn.Module) -> torch.device | None:
    """Where batches go, as PEFT's EVA decides: the one device of the model's non-meta parameters (an offloaded base
    keeps some on ``meta``), or None when they span several devices (accelerate's hooks then place the inputs)."""
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return next(iter(devices)) if len(devices) == 1 else None


def move_batch(batch: Mapping, device: torch.device | None) -> dict:
    if device is None:
        return dict(batch)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def cycle_batches(dataloader: Iterable) -> Iterator:
    """Cycle over ``dataloader`` forever; ``send(1)`` after a batch that was used, ``send(0)`` after one that was
    skipped. A pass that yields nothing, or nothing used, is refused with a clear error."""
    while True:
        produced = used = 0
        for batch in dataloader:
            produced += 1
            used += yield batch
        if produced == 0:
            raise ValueError("EVA's dataloader is empty; pass the training dataloader (or a non-empty one)")
        if used == 0:
            raise ValueError(
                "EVA found no tokens to read: in every batch all tokens are padding or label-masked (labels == "
                "label_mask_value); pass batches with unmasked tokens, or EvaConfig(use_label_mask=False)"
            )


def global_token_counts(mask: torch.Tensor | None) -> list[int] | None:
    """Valid tokens per rank (None if the batch has no token mask, e.g. only ``inputs_embeds``)."""
    local = torch.tensor([[-1 if mask is None else int(mask.sum())]], dtype=torch.int64)
    counts = [int(c) for c in torch.cat(all_gather_rows(local)).flatten()]
    return None if min(counts) < 0 else counts
