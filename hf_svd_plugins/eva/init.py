"""``eva_init``: EVA before any Trainer exists (scripts, notebooks, shape-changing allocation)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from hf_svd_plugins.eva.allocation import EvaResult, compute_eva, eva_pairs
from hf_svd_plugins.eva.config import EvaConfig
from hf_svd_plugins.eva.layout import apply_resized


def eva_init(model: nn.Module, dataloader: Iterable, config: EvaConfig | None = None, **kwargs) -> EvaResult:
    """Initialise a PEFT LoRA model with EVA in place and return what was decided.

    Each LoRA layer is rebuilt with its EVA rank ``r_m`` (PEFT ``update_layer``): ``A`` = the top ``r_m`` principal
    directions of its inputs, ``B = 0``; modules with ``r_m = 0`` lose their adapter. The adapter's PEFT config (a
    private copy: the user's ``LoraConfig`` object is left as it was) records ``rank_pattern``/``alpha_pattern``, so
    ``save_pretrained`` writes a standard adapter.

    Args:
        model: a ``PeftModel`` with a LoRA adapter.
        dataloader: iterable of dict-like batches (``input_ids``, ``attention_mask``, optional ``labels``).
        config: an :class:`EvaConfig`, or its fields as keyword arguments.
    """
    if config is not None and kwargs:
        raise ValueError("pass either config=EvaConfig(...) or keyword arguments, not both")
    config = config if config is not None else EvaConfig(**kwargs)
    pairs = eva_pairs(model, config)
    result = compute_eva(model, dataloader, config, pairs)
    apply_resized(model, pairs, result)
    return result
