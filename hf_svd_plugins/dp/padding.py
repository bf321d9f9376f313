"""Padding must not change an example's gradient: the reference is always the example alone and unpadded.

What couples one example to the others through padding: positions counted over the padded row (GPT-2's learned
``wpe`` under left padding, or a collator's ``position_ids = arange(T)``), a sequence classifier that pools the last
position of the row when ``config.pad_token_id`` is None (which is padding for every example but the longest), a
model that ignores ``attention_mask`` (mean-pooling over all positions), or HF shortcuts that only a batch of one
takes. Every per-example method must therefore be checked against each example alone, on the batch's real padding:

- :func:`check_position_ids`: ``position_ids`` a collator supplies count each row's own tokens from 0;
- :func:`check_padding_invariance`: on a padded batch, the model's outputs at each example's real tokens equal its
  outputs alone and unpadded, either as given or (left padding) with positions counted from the mask; otherwise a
  ``ValueError`` naming the likely cause;
- :func:`example_alone`: one row without its padding (what ``loop`` runs, and the reference of the checks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hf_svd_plugins.dp.batch import LABEL_KEYS, logits_of, split_inputs
from hf_svd_plugins.dp.masks import model_config


def attention_mask_2d(inputs: Mapping[str, object]) -> torch.Tensor | None:
    """The batch's ``(B, T)`` padding mask, or None."""
    am = inputs.get("attention_mask")
    return am if torch.is_tensor(am) and am.dim() == 2 else None


def has_padding(inputs: Mapping[str, object]) -> bool:
    """True if the batch has a 2D ``attention_mask`` with at least one padded position."""
    am = attention_mask_2d(inputs)
    return am is not None and am.numel() > 0 and not bool(am.bool().all())


def has_left_padding(attention_mask: torch.Tensor) -> bool:
    """True if some row of a 2D mask ``(B, T)`` has a padded position before a real token."""
    if attention_mask.dim() != 2 or attention_mask.shape[1] < 2:
        return False
    am = attention_mask.bool()
    return bool((~am[:, :-1] & am[:, 1:]).any())


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` positions counted over each row's own real tokens: ``0, 1, ...`` from its first token, whatever the
    padding before it (padded positions before it get 0). For a row alone and unpadded this is ``arange(L)``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_position_ids(inputs: Mapping[str, object]) -> None:
    """Refuse ``position_ids`` that restart inside a row's real tokens (several examples packed in one row), and
    ``position_ids`` whose first real token of a row is not at position 0 (positions counted over the padded row,
    e.g. ``arange(T)`` under left padding, which depend on the batch's longest example)."""
    pos = inputs.get("position_ids")
    if not torch.is_tensor(pos) or pos.dim() != 2 or pos.numel() == 0:
        return
    am = inputs.get("attention_mask")
    real = am.bool() if torch.is_tensor(am) and am.shape == pos.shape else torch.ones_like(pos, dtype=torch.bool)
    for row in range(pos.shape[0]):
        p = pos[row][real[row]]
        if p.numel() > 1 and not bool((p[1:] - p[:-1] == 1).all()):
            raise ValueError(
                "position_ids restart inside a row (several sequences packed in one row): that breaks "
                "per-example privacy; put one example per row (no packing / DataCollatorWithFlattening)"
            )
        if p.numel() > 0 and int(p[0]) != 0:
            raise ValueError(
                f"position_ids of row {row} start at {int(p[0])} on its first real token: positions counted over the "
                "padded row (e.g. arange(T) with left padding) depend on the batch's longest example, so an "
                "example's gradient would depend on the others. Count each row's positions from its own first token "
                "(position_ids = attention_mask.cumsum(-1) - 1, clamped at 0), or do not pass position_ids"
            )


def _row_keys(inputs: Mapping[str, object], batch: int, length: int) -> list[str]:
    """Keys of integer tensors laid out ``(B, T)`` like ``input_ids`` and of per-token float features ``(B, T, H)``
    (``inputs_embeds``, precomputed hidden states): what to cut to a row's real tokens. Other tensors (pixel values
    ``(B, C, H, W)``, float multi-label targets ``(B, C)``, ...) are only sliced by row."""
    return [k for k, v in inputs.items()
            if torch.is_tensor(v) and v.shape[:2] == (batch, length)
            and ((v.dim() == 2 and not v.is_floating_point()) or (v.dim() == 3 and v.is_floating_point())
                 or k == "inputs_embeds")]


def example_alone(inputs: Mapping[str, object], row: int, batch: int) -> dict:
    """Row ``row`` of a batch of ``batch`` as a batch of one without its padding.

    Every ``(B, T)`` tensor (``input_ids``, ``position_ids``, ``token_type_ids``, token ``labels``, ...) is cut to the
    row's real tokens (``attention_mask == 1``) and ``attention_mask`` becomes all ones; other tensors with leading
    dimension ``B`` are sliced to the row; everything else is passed as is. Without a 2D ``attention_mask`` the row
    is only sliced.
    """
    am = attention_mask_2d(inputs)
    keys = _row_keys(inputs, batch, am.shape[1]) if am is not None and am.shape[0] == batch else []
    real = am[row].bool() if keys else None
    out = {}
    for k, v in inputs.items():
        if k in keys:
            out[k] = v[row : row + 1, real]
        elif torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch:
            out[k] = v[row : row + 1]
        else:
            out[k] = v
    if keys:
        out["attention_mask"] = torch.ones((1, int(real.sum())), dtype=am.dtype, device=am.device)
    return out


def take_rows(inputs: Mapping[str, object], rows: Sequence[int], batch: int) -> dict:
    """The sub-batch of ``rows`` (every tensor with leading dimension ``batch`` indexed; padded length kept)."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    return {k: (v[index.to(v.device)] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v)
            for k, v in inputs.items()}


def rows_to_check(inputs: Mapping[str, object], batch: int, limit: int | None) -> list[int]:
    """Up to ``limit`` rows (all if None), the most padded first: where padding could change an example most."""
    am = attention_mask_2d(inputs)
    order = list(range(batch)) if am is None else torch.argsort(am.sum(-1), stable=True).tolist()
    return order if limit is None else order[: max(1, limit)]


def close(got: torch.Tensor, ref: torch.Tensor, low_precision: bool = False) -> bool:
    """``got`` equals ``ref`` up to float error of their dtype, or of half precision when ``low_precision`` (bf16
    autocast), relative to ``ref``'s scale."""
    if got.shape != ref.shape:
        return False
    low = low_precision or got.dtype in (torch.float16, torch.bfloat16) or ref.dtype in (torch.float16, torch.bfloat16)
    atol, rtol = (2e-2, 4e-2) if low else (1e-4, 1e-3)
    got, ref = got.double(), ref.double()
    return bool(((got - ref).abs() <= atol + rtol * ref.abs().max()).all())


@torch.no_grad()
def outputs_alone(model: nn.Module, inputs: Mapping[str, object], batch: int) -> list[torch.Tensor]:
    """Every example's output alone and unpadded: logits ``(L_i, V)`` on its real tokens, or ``(C,)``."""
    model_inputs, _, _ = split_inputs(inputs)
    return [logits_of(model(**example_alone(model_inputs, i, batch)))[0] for i in range(batch)]


def outputs_match_alone(batched: torch.Tensor, inputs: Mapping[str, object], alone: list[torch.Tensor],
                        low_precision: bool = False) -> bool:
    """``batched`` (``(B, T, V)`` or ``(B, C)``) at each row's real tokens equals that row's output alone."""
    am = attention_mask_2d(inputs)
    for i, ref in enumerate(alone):
        got = batched[i, am[i].bool()] if batched.dim() == 3 and am is not None else batched[i]
        if not close(got, ref, low_precision):
            return False
    return True


def _cause(model: nn.Module, per_sequence: bool, error: Exception | None) -> str:
    config = model_config(model)
    if per_sequence and config is not None and getattr(config, "pad_token_id", 0) is None:
        return ("config.pad_token_id is None, so a sequence classifier (GPT2ForSequenceClassification, "
                "LlamaForSequenceClassification, ...) pools the last position of the padded row, which is padding "
                "for every example but the longest. Set model.config.pad_token_id = tokenizer.pad_token_id")
    if error is not None:
        return f"the model fails on the padded batch ({type(error).__name__}: {str(error)[:200]})"
    return ("the model's outputs at an example's real tokens change with the padding around it: it ignores "
            "attention_mask somewhere (e.g. mean-pooling over all positions) or counts positions over the padded "
            "row. Make the model honour attention_mask (and pass position_ids counted from each row's own first "
            "token if it numbers positions)")


@torch.no_grad()
def check_padding_invariance(
    model: nn.Module, inputs: Mapping[str, object], limit: int | None = None, low_precision: bool = False
) -> str:
    """On a padded batch, the positions under which the model's outputs equal every example's output alone and
    unpadded: ``"from_mask"`` (left padding, ``position_ids`` counted from the mask: GPT-2) or ``"model"`` (as given:
    right padding, RoBERTa's padding-aware positions, or valid collator ``position_ids``).

    Checks up to ``limit`` rows (the most padded first; all if None), model in eval mode, to half-precision
    tolerance when ``low_precision`` (bf16 autocast).

    Raises:
        ValueError: no candidate reproduces every example alone, with the likely cause (``config.pad_token_id``
            unset on a sequence classifier, a model ignoring ``attention_mask``) and its fix.
    """
    am = attention_mask_2d(inputs)
    batch = am.shape[0]
    sub = take_rows(inputs, rows_to_check(inputs, batch, limit), batch)
    sub_am = sub["attention_mask"]
    n = sub_am.shape[0]
    candidates = [("model", sub)]
    if "position_ids" not in sub and has_left_padding(sub_am):
        candidates.insert(0, ("from_mask", {**sub, "position_ids": position_ids_from_mask(sub_am)}))
    was_training = model.training
    model.eval()
    error, per_sequence = None, False
    try:
        alone = outputs_alone(model, sub, n)
        per_sequence = alone[0].dim() == 1
        for name, candidate in candidates:
            model_inputs = {k: v for k, v in candidate.items() if k not in LABEL_KEYS}
            try:
                batched = logits_of(model(**model_inputs))
            except TypeError as exc:  # e.g. the model takes no position_ids
                error = exc
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. HF's "Cannot handle batch sizes > 1 if no padding token"
                error = exc
                continue
            if outputs_match_alone(batched, sub, alone, low_precision):
                return name
            error = None
    finally:
        model.train(was_training)
    raise ValueError(
        "DP: padding changes this model's per-example outputs (the reference is each example alone and unpadded), "
        f"so an example's gradient would depend on how long the other examples of its batch are: {_cause(model, per_sequence, error)}"
    )
