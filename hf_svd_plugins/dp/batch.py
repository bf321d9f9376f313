"""What a collated batch must look like for per-example privacy, and small helpers to read one.

One row of a batch is one example (the privacy unit). Anything that lets one row's loss depend on another row, or on
the batch's padded length, breaks the sensitivity bound ``C``: several examples packed in one row, targets at padded
positions, positions counted from the padded length (see
:mod:`.padding`), a collator that returns a different number of rows than the examples it was given (it flattened,
dropped or duplicated some). The checks here raise ``ValueError`` naming the fix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

LABEL_KEYS = ("labels", "shift_labels")
IGNORE_INDEX = -100
#: keys of flash-attention packed batches (several examples in one row)
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")


def split_inputs(inputs: Mapping[str, object]) -> tuple[dict, torch.Tensor, str]:
    """``(model_inputs, targets, target_key)``: labels are removed from what the model sees."""
    model_inputs = {k: v for k, v in inputs.items() if k not in LABEL_KEYS}
    if "shift_labels" in inputs:
        return model_inputs, inputs["shift_labels"], "shift_labels"
    if "labels" in inputs:
        return model_inputs, inputs["labels"], "labels"
    raise ValueError("the batch has no `labels`: DP training needs labels to compute each example's loss")


def logits_of(output: object) -> torch.Tensor:
    """The logits of a model output (``ModelOutput``/dict or tuple)."""
    return output["logits"] if isinstance(output, Mapping) else output[0]


def collator_name(collate_fn: object) -> str:
    """The user's collator behind the Trainer's wrappers (``RemoveColumnsCollator``, ``functools.partial``)."""
    for _ in range(8):
        inner = getattr(collate_fn, "data_collator", None) or getattr(collate_fn, "collate_fn", None)
        inner = inner or getattr(collate_fn, "func", None)
        if inner is None:
            break
        collate_fn = inner
    return getattr(collate_fn, "__name__", None) or type(collate_fn).__name__


def check_one_row_per_example(batch: object, num_examples: int, collate_fn: object) -> None:
    """Refuse a collated batch whose tensors do not have exactly ``num_examples`` rows (leading dimension).

    DP clips each row's gradient as one example's; a collator that concatenates the examples it is given into fewer
    rows (``DataCollatorWithFlattening``, with or without ``position_ids``), drops or duplicates some would make one
    example's influence on the released gradient exceed ``C``. Scalars (0-d tensors) are not checked.
    """
    if not isinstance(batch, Mapping):
        return
    for key, value in batch.items():
        shape = getattr(value, "shape", None)
        if shape is None or len(shape) == 0 or int(shape[0]) == num_examples:
            continue
        raise ValueError(
            f"the data collator {collator_name(collate_fn)} returned `{key}` with {int(shape[0])} rows for the "
            f"{num_examples} examples sampled for this micro-batch: DP clips each row as one example, so every "
            "example must be exactly one row (collators that flatten / pack examples into one row, such as "
            "DataCollatorWithFlattening, break per-example privacy). Use one padded row per example: "
            "DataCollatorWithPadding, DataCollatorForLanguageModeling, or the Trainer's default collator"
        )


def check_not_packed(inputs: Mapping[str, object]) -> None:
    """Refuse packed / padding-free rows (several examples in one row): flash-attention ``cu_seq_lens`` keys.
    ``position_ids`` that restart inside a row are refused by :func:`~.padding.check_position_ids`."""
    if any(k in inputs for k in PACKED_KEYS):
        raise ValueError(
            "packed / padding-free batches put several examples in one row, which breaks per-example privacy; "
            "disable packing and padding_free (one example per row, padded)"
        )


def check_no_targets_on_padding(inputs: Mapping[str, object]) -> None:
    """Refuse token-level labels at padded positions (``attention_mask == 0`` but ``labels != -100``): such an
    example's loss would count targets whose number depends on the batch's padded length, i.e. on other examples."""
    am = inputs.get("attention_mask")
    for key in LABEL_KEYS:
        labels = inputs.get(key)
        if not (torch.is_tensor(labels) and torch.is_tensor(am)) or labels.shape != am.shape:
            continue
        if bool(((am == 0) & (labels != IGNORE_INDEX)).any()):
            raise ValueError(
                f"`{key}` has targets at padded positions (attention_mask == 0 but {key} != -100): an example's loss "
                "would then depend on how long the other examples of its batch are; set the labels of padding to "
                "-100 (transformers' DataCollatorForLanguageModeling and TRL's collators do)"
            )
