"""Forward passes on the two kinds of batches merging sees: Hugging Face dicts and ``(inputs, targets)`` pairs.

* a dict (``input_ids``, ``attention_mask``, ``labels``, ...): the model's own loss; accuracy is next-token accuracy
  on ``labels != -100`` for causal LMs, token accuracy for other token-level heads, argmax accuracy for sequence heads.
* a pair ``(x, y)`` (an ``nn.Sequential`` MLP): cross-entropy of ``model(x)`` against class indices ``y``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EvalResult", "batch_loss", "evaluate", "is_causal_lm"]

LossFn = Callable[[nn.Module, object, Mapping[str, torch.Tensor] | None], torch.Tensor]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model``'s labels are shifted inside its loss (a ``*ForCausalLM`` / ``*LMHeadModel``)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: nn.Module, batch: object, params: Mapping[str, torch.Tensor] | None):
    """``(outputs, targets)``; with ``params`` the forward uses them instead of the model's own (functional_call)."""
    device = _device(model)
    if isinstance(batch, Mapping):
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        args: tuple = ()
        targets = kwargs.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        args, kwargs, targets = (batch[0].to(device),), {}, batch[1].to(device)
    else:
        raise TypeError(f"a batch must be a dict of tensors or an (inputs, targets) pair, got {type(batch).__name__}")
    if params is None:
        outputs = model(*args, **kwargs)
    else:
        outputs = torch.func.functional_call(model, dict(params), args, kwargs, strict=False)
    return outputs, targets


def batch_loss(model: nn.Module, batch: object, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The training loss of one batch (the model's own ``outputs.loss`` for dicts, cross-entropy for pairs)."""
    outputs, targets = _forward(model, batch, params)
    if isinstance(batch, Mapping):
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError("the model returned no loss for this batch: include `labels` in every batch")
        return loss
    return F.cross_entropy(outputs, targets)


@dataclass
class EvalResult:
    """Mean loss (per target token or example, as the model's loss averages) and accuracy over the batches."""

    loss: float
    accuracy: float
    count: int


def _scored_targets(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predictions, targets)`` of the positions the loss scores."""
    if logits.dim() == labels.dim() + 1 and logits.dim() == 3:
        if is_causal_lm(model):
            logits, labels = logits[:, :-1], labels[:, 1:]
        keep = labels != -100
        return logits.argmax(-1)[keep], labels[keep]
    return logits.argmax(-1).reshape(-1), labels.reshape(-1)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, loss_fn: LossFn | None = None) -> EvalResult:
    """Loss and accuracy of ``model`` over ``batches``, each batch weighted by the targets it scores."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for batch in batches:
            outputs, targets = _forward(model, batch, None)
            logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
            predictions, scored = _scored_targets(model, logits, targets)
            n = int(scored.numel())
            if loss_fn is not None:
                loss = loss_fn(model, batch, None)
            elif isinstance(batch, Mapping):
                loss = outputs.loss
            else:
                loss = F.cross_entropy(logits, targets)
            total_loss += float(loss) * n
            correct += int((predictions == scored).sum())
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the batches score no targets (all labels are -100, or no batches)")
    return EvalResult(total_loss / count, correct / count, count)
