"""Attention masks for the per-example computation, verified against the model on real batches.

Under ``torch.func.vmap`` every example runs as a batch of one, so Hugging Face's data-dependent mask shortcuts must
not see a batched 2D mask: the padding mask is turned into an additive 4D mask of the kind the model uses. Which kind
is decided by comparing logits with the model's own handling of the 2D mask (:func:`detect_mask_kinds`):

- ``"causal"``, ``"bidirectional"``: one 4D mask for every layer;
- ``"sliding_causal"``: causal within the config's ``sliding_window`` (Mistral: every layer slides);
- ``"per_layer"``: ``{"full_attention": causal, "sliding_attention": sliding}`` for models with mixed
  ``config.layer_types`` (Qwen2, Gemma 2/3, ...), which accept one mask per layer type.

A window only shows on sequences longer than it: a verification on shorter batches is provisional
(:func:`declared_window`) and is repeated when a longer batch arrives.

Positions and padding are checked against each example alone in :mod:`.padding`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hf_svd_plugins.dp.batch import logits_of, split_inputs

#: preference order: the most specific kind that reproduces the model wins
MASK_KINDS = ("per_layer", "sliding_causal", "causal", "bidirectional")
_WINDOW_ATTRIBUTES = ("sliding_window", "attention_chunk_size", "local_attention")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_config(model: nn.Module) -> object | None:
    """The (PEFT-unwrapped) model's ``config``, or None."""
    return getattr(base_model(model), "config", None)


def sliding_window_of(model: nn.Module) -> int | None:
    """``config.sliding_window`` when it is a positive int, else None."""
    w = getattr(model_config(model), "sliding_window", None)
    return int(w) if isinstance(w, int) and not isinstance(w, bool) and w > 0 else None


def declared_window(model: nn.Module) -> int | None:
    """The largest attention window the config declares (sliding, chunked or local attention), or None.

    Mask verifications on sequences no longer than this cannot tell a windowed mask from a full one.
    """
    cfg = model_config(model)
    sizes = [getattr(cfg, a, None) for a in _WINDOW_ATTRIBUTES]
    sizes = [int(s) for s in sizes if isinstance(s, int) and not isinstance(s, bool) and s > 0]
    return max(sizes) if sizes else None


def _layer_types(model: nn.Module) -> set[str]:
    types = getattr(model_config(model), "layer_types", None)
    return set(types) if isinstance(types, (list, tuple)) else set()


def attention_mask_4d(
    attention_mask: torch.Tensor, causal: bool, dtype: torch.dtype, window: int | None = None
) -> torch.Tensor:
    """2D padding mask ``(B, T)`` (1 = token) -> additive 4D mask ``(B, 1, T, T)``: 0 where query ``t`` may attend
    key ``s``, the dtype's minimum elsewhere. ``causal`` also forbids ``s > t``; ``window`` forbids ``t - s >= window``
    (transformers' sliding-window rule ``s > t - window``)."""
    b, t = attention_mask.shape
    allowed = attention_mask[:, None, None, :].bool().expand(b, 1, t, t)
    idx = torch.arange(t, device=attention_mask.device)
    if causal:
        allowed = allowed & (idx[None, :] <= idx[:, None])
    if window is not None:
        allowed = allowed & (idx[:, None] - idx[None, :] < window)
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def build_attention_mask(
    attention_mask: torch.Tensor, kind: str, dtype: torch.dtype, window: int | None = None
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The mask of ``kind`` (one of :data:`MASK_KINDS`) for a 2D padding mask: a 4D tensor, or for ``per_layer`` a
    dict ``{layer type: 4D mask}``. ``window`` is required for ``sliding_causal`` and ``per_layer``."""
    if kind == "causal":
        return attention_mask_4d(attention_mask, True, dtype)
    if kind == "bidirectional":
        return attention_mask_4d(attention_mask, False, dtype)
    if kind not in ("sliding_causal", "per_layer") or window is None:
        raise ValueError(f"mask kind {kind!r} (window={window}): use one of {MASK_KINDS} (windowed kinds need a window)")
    sliding = attention_mask_4d(attention_mask, True, dtype, window)
    if kind == "sliding_causal":
        return sliding
    return {"full_attention": attention_mask_4d(attention_mask, True, dtype), "sliding_attention": sliding}


def float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def candidate_mask_kinds(model: nn.Module) -> list[str]:
    """The kinds worth trying for this model, most specific first."""
    kinds = []
    if sliding_window_of(model) is not None:
        if {"full_attention", "sliding_attention"} <= _layer_types(model):
            kinds.append("per_layer")
        kinds.append("sliding_causal")
    return [*kinds, "causal", "bidirectional"]


@torch.no_grad()
def detect_mask_kinds(model: nn.Module, inputs: Mapping[str, object], atol: float = 1e-4) -> list[str] | None:
    """Every mask kind whose 4D mask reproduces the model's own handling of the batch's 2D ``attention_mask``
    (logits on the real positions, model in eval mode), most specific first; ``None`` when the batch has no 2D
    ``attention_mask`` (nothing to convert)."""
    model_inputs, _, _ = split_inputs(inputs)
    am = model_inputs.get("attention_mask")
    if am is None or not torch.is_tensor(am) or am.dim() != 2:
        return None
    was_training = model.training
    model.eval()
    try:
        ref = logits_of(model(**model_inputs))
        valid = am.bool() if ref.dim() == 3 else torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)
        window = sliding_window_of(model)
        matches = []
        for kind in candidate_mask_kinds(model):
            try:
                mask = build_attention_mask(am, kind, float_dtype(model), window)
                out = logits_of(model(**{**model_inputs, "attention_mask": mask}))
            except Exception:  # noqa: BLE001 - a model that refuses this mask format simply does not qualify
                continue
            if out.shape == ref.shape and torch.allclose(out[valid].float(), ref[valid].float(), atol=atol, rtol=1e-3):
                matches.append(kind)
        return matches
    finally:
        model.train(was_training)


def choose_mask_kind(matches: list[str] | None) -> str | None:
    """``"none"`` (no 2D mask), ``"ambiguous"`` (causal and bidirectional both reproduce the model, e.g. sequences of
    length 1: decide on another batch), the most specific match, or None (no kind reproduces the model)."""
    if matches is None:
        return "none"
    if "causal" in matches and "bidirectional" in matches:
        return "ambiguous"
    return matches[0] if matches else None


def detect_mask_kind(model: nn.Module, inputs: Mapping[str, object], atol: float = 1e-4) -> str | None:
    """:func:`choose_mask_kind` of :func:`detect_mask_kinds`: ``"causal"``, ``"bidirectional"``,
    ``"sliding_causal"``, ``"per_layer"``, ``"none"``, ``"ambiguous"`` or None."""
    return choose_mask_kind(detect_mask_kinds(model, inputs, atol))


def longest_real_length(inputs: Mapping[str, object]) -> int:
    """The longest row of the batch in real tokens (padded length if there is no 2D mask)."""
    am = inputs.get("attention_mask")
    if torch.is_tensor(am) and am.dim() == 2:
        return int(am.sum(dim=-1).max()) if am.numel() else 0
    ids = inputs.get("input_ids")
    return int(ids.shape[1]) if torch.is_tensor(ids) and ids.dim() >= 2 else 0
