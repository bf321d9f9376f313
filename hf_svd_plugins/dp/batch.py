"""What a collated batch must look like for per-example privacy, and small helpers to read one.

One row of a batch is one example (the privacy unit). Anything that lets one row's loss depend on another row, or on
the batch's padded length, breaks the sensitivity bound ``C``: several examples packed in one row, targets at padded
positions, positions counted from the padded length (see
:mod:`.padding`). The checks here raise ``ValueError`` naming the fix.
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
