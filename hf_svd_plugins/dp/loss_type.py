"""Which per-example loss a model trains with, and a check on the first batch that it is the model's own loss.

A wrong guess is silent otherwise: a causal LM trained with the unshifted token loss learns to copy its input.
:func:`guess_loss_type` reads the labels' shape and the model's class hierarchy (causal-LM classes, or any model that
can generate and is not an encoder-decoder); :func:`check_loss_type` then compares, on a real batch, the per-example
losses (weighted by their number of targets) with the loss the model itself returns for that batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hf_svd_plugins.dp.batch import IGNORE_INDEX, logits_of, split_inputs
from hf_svd_plugins.dp.per_sample import per_example_loss


def _base_model(module: nn.Module) -> nn.Module:
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def is_causal_lm(module: nn.Module) -> bool:
    """True for a (PEFT-unwrapped) model whose labels are next-token targets: a subclass of a causal-LM class of
    transformers (any class in its MRO is in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), or a model that
    ``can_generate()`` and is not an encoder-decoder (remote-code LMs, vision-language models)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = _base_model(module)
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


def _batch_mean(logits, targets, loss_type, problem_type) -> torch.Tensor | None:
    try:
        losses = per_example_loss(logits, targets, loss_type, 0.0, problem_type)
    except (RuntimeError, ValueError, IndexError):
        return None
    weights = target_counts(targets, loss_type).to(losses.dtype)
    return (losses * weights).sum() / weights.sum()


@torch.no_grad()
def check_loss_type(
    module: nn.Module, inputs: Mapping[str, object], loss_type: str, problem_type: str | None = None
) -> tuple[str, str | None]:
    """Compare the per-example losses of ``loss_type`` with the model's own loss on this batch.

    The model's loss is a mean over all targets of the batch, so the per-example losses are averaged with weights
    = their number of targets. Runs the model once in eval mode with the batch's labels.

    Returns:
        ``(status, suggestion)``. ``status`` is ``"checked"``, ``"no_targets"`` (the batch has none: ask again on
        another batch) or ``"no_model_loss"`` (the model returns no usable loss for these labels). When checked,
        ``suggestion`` is None if ``loss_type`` matches, else the loss type that does (``"none"`` if none does).
    """
    model_inputs, targets, key = split_inputs(inputs)
    if int(target_counts(targets, loss_type).sum()) == 0:
        return "no_targets", None
    was_training = module.training
    module.eval()
    try:
        out = module(**model_inputs, **{key: targets})
    except Exception:  # noqa: BLE001 - a model that refuses these labels simply gives nothing to compare with
        return "no_model_loss", None
    finally:
        module.train(was_training)
    model_loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not torch.is_tensor(model_loss) or model_loss.numel() != 1 or not torch.isfinite(model_loss):
        return "no_model_loss", None
    logits = logits_of(out)
    low_precision = logits.dtype in (torch.float16, torch.bfloat16)
    rtol, atol = (2e-2, 1e-3) if low_precision else (1e-3, 1e-5)

    def matches(kind: str) -> bool:
        mean = _batch_mean(logits, targets, kind, problem_type)
        return mean is not None and torch.allclose(mean.float(), model_loss.float().reshape(()), rtol=rtol, atol=atol)

    if matches(loss_type):
        return "checked", None
    others = [k for k in _candidates(targets) if k != loss_type and matches(k)]
    return "checked", (others[0] if others else "none")
