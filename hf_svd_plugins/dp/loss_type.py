"""Per-example losses, which one a model trains with, and a check on the first batch that it is the model's own.

:func:`per_example_loss` gives every example's loss, normalised by its own number of targets. A wrong loss type is
silent otherwise: a causal LM trained with the unshifted token loss learns to copy its input. :func:`guess_loss_type`
reads the labels' shape and the model's class hierarchy (causal-LM classes, or any model that can generate and is not
an encoder-decoder); :func:`check_loss_type` then compares, on a real batch, the per-example losses with the loss the
model itself returns for that batch: their mean weighted by each example's number of targets (HF's token mean) or
their plain mean (a mean of per-sequence means, which is DP's own objective).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hf_svd_plugins.dp.batch import IGNORE_INDEX, logits_of, split_inputs
from hf_svd_plugins.dp.masks import base_model


def _token_mean(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``logits (B, T, V)``, ``targets (B, T)`` -> ``(B,)`` mean CE over each row's targets != -100 (0 if none)."""
    valid = targets != IGNORE_INDEX
    safe = targets.masked_fill(~valid, 0)
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float() if logits.dtype in (torch.float16, torch.bfloat16)
        else logits.reshape(-1, logits.shape[-1]),
        safe.reshape(-1),
        reduction="none",
        label_smoothing=label_smoothing,
    ).reshape(targets.shape)
    ce = ce * valid.to(ce.dtype)
    count = valid.sum(dim=-1).clamp(min=1).to(ce.dtype)
    return ce.sum(dim=-1) / count


def per_example_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_type: str,
    label_smoothing: float = 0.0,
    problem_type: str | None = None,
) -> torch.Tensor:
    """Loss of every example of a batch, each normalised by its own number of valid targets.

    Args:
        logits: ``(B, T, V)`` for ``causal_lm``/``token``, ``(B, C)`` for ``sequence``.
        labels: ``(B, T)`` with ``-100`` ignored (``causal_lm``: position ``t`` predicts ``labels[t + 1]``), or for
            ``sequence`` ``(B,)`` class ids, or float targets ``(B,)``/``(B, C)``.
        loss_type: ``causal_lm``, ``token`` or ``sequence``.
        label_smoothing: as in ``F.cross_entropy``.
        problem_type: for ``sequence``, as ``PretrainedConfig.problem_type``: ``regression`` (MSE averaged over
            outputs), ``multi_label_classification`` (BCE-with-logits averaged over labels),
            ``single_label_classification`` (cross-entropy). None decides like Hugging Face: one output means
            regression, integer labels single-label, float labels multi-label.

    Returns:
        ``(B,)``. An example without any valid target has loss 0 (and gradient 0).
    """
    if loss_type == "causal_lm":
        return _token_mean(logits[:, :-1, :], labels[:, 1:], label_smoothing)
    if loss_type == "token":
        return _token_mean(logits, labels, label_smoothing)
    if loss_type != "sequence":
        raise ValueError(f"loss_type={loss_type!r}: use causal_lm, token or sequence")
    b = logits.shape[0]
    if problem_type is None:
        if logits.shape[-1] == 1:
            problem_type = "regression"
        elif labels.dtype.is_floating_point:
            problem_type = "multi_label_classification"
        else:
            problem_type = "single_label_classification"
    if problem_type == "regression":
        pred = logits.reshape(b, -1)
        return (pred - labels.reshape(b, -1).to(pred.dtype)).pow(2).mean(dim=-1)
    if problem_type == "multi_label_classification":
        pred = logits.reshape(b, -1)
        target = labels.reshape(b, -1).to(pred.dtype)
        return F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(dim=-1)
    return F.cross_entropy(logits, labels.reshape(-1), reduction="none", label_smoothing=label_smoothing)


def is_causal_lm(module: nn.Module) -> bool:
    """True for a (PEFT-unwrapped) model whose labels are next-token targets: a subclass of a causal-LM class of
    transformers (any class in its MRO is in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), or a model that
    ``can_generate()`` and is not an encoder-decoder (remote-code LMs, vision-language models)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = base_model(module)
    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if any(cls.__name__ in names for cls in type(base).__mro__):
        return True
    config = getattr(base, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    can_generate = getattr(base, "can_generate", None)
    try:
        return bool(can_generate()) if callable(can_generate) else False
    except Exception:  # noqa: BLE001 - a custom can_generate that fails says nothing either way
        return False


def guess_loss_type(module: nn.Module, inputs: Mapping[str, object]) -> str:
    """``"token"`` for ``shift_labels``, ``"sequence"`` for one label per example (or float targets),
    ``"causal_lm"`` for token labels of a causal LM (:func:`is_causal_lm`), else ``"token"``."""
    if "shift_labels" in inputs:
        return "token"
    labels = inputs.get("labels")
    if not torch.is_tensor(labels):
        raise ValueError("the batches have no `labels`; DP training needs them to compute per-example losses")
    if labels.dim() == 1 or labels.dtype.is_floating_point:
        return "sequence"
    return "causal_lm" if is_causal_lm(module) else "token"


def target_counts(targets: torch.Tensor, loss_type: str) -> torch.Tensor:
    """``(B,)`` number of targets each example's loss averages over (1 per example for ``sequence``)."""
    if loss_type == "causal_lm":
        return (targets[:, 1:] != IGNORE_INDEX).sum(dim=-1)
    if loss_type == "token":
        return (targets != IGNORE_INDEX).reshape(targets.shape[0], -1).sum(dim=-1)
    return torch.ones(targets.shape[0], dtype=torch.long, device=targets.device)


def _candidates(targets: torch.Tensor) -> tuple[str, ...]:
    if targets.dim() >= 2 and not targets.dtype.is_floating_point:
        return ("causal_lm", "token")
    return ("sequence",)


def _batch_means(logits, targets, loss_type, problem_type) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(token-weighted mean, plain mean over examples with targets)`` of the per-example losses, or None."""
    try:
        losses = per_example_loss(logits, targets, loss_type, 0.0, problem_type)
    except (RuntimeError, ValueError, IndexError):
        return None
    weights = target_counts(targets, loss_type).to(losses.dtype)
    with_targets = weights > 0
    return (losses * weights).sum() / weights.sum(), losses[with_targets].mean()


@dataclass
class LossCheck:
    """The outcome of :func:`check_loss_type`.

    Attributes:
        status: ``"checked"``, ``"no_targets"`` (the batch has none: ask again on another batch) or
            ``"no_model_loss"`` (the model returns no usable loss for these labels).
        suggestion: when checked, None if the loss type matches, else the loss type that does (``"none"``).
        details: the model's loss and the two means of the per-example losses, for messages.
    """

    status: str
    suggestion: str | None = None
    details: str = ""


@torch.no_grad()
def check_loss_type(
    module: nn.Module, inputs: Mapping[str, object], loss_type: str, problem_type: str | None = None
) -> LossCheck:
    """Compare the per-example losses of ``loss_type`` with the model's own loss on this batch.

    The model's loss matches if it equals the per-example losses' mean weighted by their number of targets (HF
    causal-LM and token losses: a mean over all targets of the batch) or their plain mean over the examples with
    targets (a mean of per-sequence means). Runs the model once in eval mode with the batch's labels.
    """
    model_inputs, targets, key = split_inputs(inputs)
    if int(target_counts(targets, loss_type).sum()) == 0:
        return LossCheck("no_targets")
    was_training = module.training
    module.eval()
    try:
        out = module(**model_inputs, **{key: targets})
    except Exception:  # noqa: BLE001 - a model that refuses these labels simply gives nothing to compare with
        return LossCheck("no_model_loss")
    finally:
        module.train(was_training)
    model_loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not torch.is_tensor(model_loss) or model_loss.numel() != 1 or not torch.isfinite(model_loss):
        return LossCheck("no_model_loss")
    logits = logits_of(out)
    low_precision = logits.dtype in (torch.float16, torch.bfloat16)
    rtol, atol = (2e-2, 1e-3) if low_precision else (1e-3, 1e-5)
    reference = model_loss.float().reshape(())

    def matches(kind: str) -> bool:
        means = _batch_means(logits, targets, kind, problem_type)
        return means is not None and any(torch.allclose(m.float(), reference, rtol=rtol, atol=atol) for m in means)

    means = _batch_means(logits, targets, loss_type, problem_type)
    details = f"model's loss {float(reference):.6g}" + (
        "" if means is None else f"; per-example losses of loss_type={loss_type!r} average to {float(means[0]):.6g} "
        f"weighted by their number of targets, {float(means[1]):.6g} unweighted")
    if matches(loss_type):
        return LossCheck("checked", None, details)
    others = [k for k in _candidates(targets) if k != loss_type and matches(k)]
    return LossCheck("checked", others[0] if others else "none", details)
