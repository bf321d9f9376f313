"""Per-example losses and per-example gradients over the trainable parameters only.

Three exact methods, all returning ``({name: (B, *param_shape)}, losses (B,))``:

- :func:`vmap_per_sample_grads`: ``torch.func.vmap(grad(functional_call))``. Each example runs as a batch of one, so
  the padding mask is passed as a 4D additive mask of the kind the model uses (see :mod:`.masks`).
- :func:`hooks_per_sample_grads`: Opacus ``GradSampleModule`` hooks (``loss_reduction="sum"``); every grad sample
  must have the batch's leading dimension, else :class:`NotPrivatizableError`.
- :func:`loop_per_sample_grads`: one backward per example (reference; any model).

An example's loss is the mean over its *own* valid targets (``labels == -100`` ignored); nothing is normalised
across examples, so one example's gradient never depends on the others. Positions under left padding are the
caller's job (pass ``position_ids``; :func:`.masks.detect_position_handling` says when).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from hf_svd_plugins.dp.batch import IGNORE_INDEX, LABEL_KEYS, logits_of, split_inputs
from hf_svd_plugins.dp.masks import (
    attention_mask_4d,
    build_attention_mask,
    detect_mask_kind,
    float_dtype,
    sliding_window_of,
)

__all__ = [
    "IGNORE_INDEX", "LABEL_KEYS", "NotPrivatizableError", "attention_mask_4d", "detect_mask_kind",
    "hooks_per_sample_grads", "loop_per_sample_grads", "per_example_loss", "trainable_parameters",
    "unsupported_for_hooks", "vmap_per_sample_grads",
]


class NotPrivatizableError(ValueError):
    """A per-example gradient cannot be computed for some parameter with the chosen method."""


# ------------------------------------------------------------------------------------------------ per-example losses


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


def _loss_from_output(
    output: object, targets: torch.Tensor, loss_type: str, label_smoothing: float, problem_type: str | None
) -> torch.Tensor:
    return per_example_loss(logits_of(output), targets, loss_type, label_smoothing, problem_type)


# ------------------------------------------------------------------------------------------------ per-example grads


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: param}`` of every parameter with ``requires_grad`` (the ones DP-SGD privatises)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def vmap_per_sample_grads(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: Mapping[str, object],
    loss_type: str,
    mask_kind: str = "none",
    label_smoothing: float = 0.0,
    problem_type: str | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients with ``torch.func``: ``vmap(grad(functional_call))`` over the batch.

    Args:
        model: the (unwrapped) model; parameters not in ``params`` are held fixed.
        params: ``{name: tensor}`` of the trainable parameters to differentiate.
        inputs: a collated batch; tensors with leading dim ``B`` are mapped, anything else is passed as is.
        loss_type: see :func:`per_example_loss`.
        mask_kind: from :func:`~.masks.detect_mask_kind`; a 2D ``attention_mask`` is turned into that mask (windowed
            kinds use the model config's ``sliding_window``).
        label_smoothing: as in ``F.cross_entropy``.
        problem_type: see :func:`per_example_loss`.

    Returns:
        ``({name: (B, *param_shape)}, losses (B,))``, detached. The model must be in train mode for the same
        dropout behaviour as training (``randomness="different"``: each example draws its own masks).
    """
    from torch.func import functional_call, grad, vmap

    model_inputs, targets, _ = split_inputs(inputs)
    batch = targets.shape[0]
    am = model_inputs.get("attention_mask")
    if am is not None and am.dim() == 2:
        if mask_kind not in ("causal", "bidirectional", "sliding_causal", "per_layer"):
            raise ValueError(
                f"mask_kind={mask_kind!r}: the vmap method needs to know which attention mask the model applies; "
                "call hf_svd_plugins.dp.masks.detect_mask_kind() or use per_sample_method='loop'"
            )
        model_inputs["attention_mask"] = build_attention_mask(am, mask_kind, float_dtype(model),
                                                              sliding_window_of(model))
    mapped = {k: v for k, v in model_inputs.items()
              if (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch) or isinstance(v, dict)}
    fixed = {k: v for k, v in model_inputs.items() if k not in mapped}
    detached = {n: p.detach() for n, p in params.items()}

    def loss_one(p: dict[str, torch.Tensor], example: dict[str, torch.Tensor], target: torch.Tensor):
        kwargs = tree_map(lambda v: v.unsqueeze(0), example)
        out = functional_call(model, p, args=(), kwargs={**kwargs, **fixed})
        loss = _loss_from_output(out, target.unsqueeze(0), loss_type, label_smoothing, problem_type)[0]
        return loss, loss.detach()

    # The fused CPU/GPU SDPA kernels have no vmap batching rule (a slow per-example fallback); the math backend
    # decomposes into batched matmuls and gives the same result.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        grads, losses = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0), randomness="different")(
            detached, mapped, targets
        )
    return dict(grads), losses


def loop_per_sample_grads(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: Mapping[str, object],
    loss_type: str,
    label_smoothing: float = 0.0,
    problem_type: str | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients by one forward/backward per example (slow, exact for any model). Same contract as
    :func:`vmap_per_sample_grads`; each example keeps the batch's padding and 2D mask."""
    model_inputs, targets, _ = split_inputs(inputs)
    batch = targets.shape[0]
    names = list(params)
    tensors = [params[n] for n in names]
    per_param: list[list[torch.Tensor]] = [[] for _ in names]
    losses = []
    for i in range(batch):
        ex = {k: (v[i : i + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v)
              for k, v in model_inputs.items()}
        with torch.enable_grad():
            loss = _loss_from_output(model(**ex), targets[i : i + 1], loss_type, label_smoothing, problem_type)[0]
            gs = torch.autograd.grad(loss, tensors, allow_unused=True)
        for j, g in enumerate(gs):
            per_param[j].append(torch.zeros_like(tensors[j]) if g is None else g.detach())
        losses.append(loss.detach())
    return {n: torch.stack(per_param[j]) for j, n in enumerate(names)}, torch.stack(losses)


def unsupported_for_hooks(model: nn.Module) -> list[str]:
    """Names of modules that own trainable parameters but have no Opacus grad sampler."""
    from opacus import GradSampleModule

    bad = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in GradSampleModule.GRAD_SAMPLERS:
            bad.append(f"{name} ({type(module).__name__})")
    return bad


def hooks_per_sample_grads(
    grad_sample_module: nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: Mapping[str, object],
    loss_type: str,
    label_smoothing: float = 0.0,
    problem_type: str | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients from Opacus hooks: one batched forward/backward of ``sum_i loss_i``.

    Args:
        grad_sample_module: ``opacus.GradSampleModule(model, batch_first=True, loss_reduction="sum")``.
        params: ``{name: param}`` of the wrapped model's trainable parameters (``p.grad`` is left untouched).
        inputs, loss_type, label_smoothing, problem_type: as in :func:`vmap_per_sample_grads`.

    Raises:
        NotPrivatizableError: a parameter got a gradient but no per-example one, or one whose leading dimension is
            not the batch (a parameter applied to the whole batch at once, e.g. learned position embeddings looked
            up with ``(1, T)`` position ids: Opacus returns one sample for the whole batch).
    """
    model_inputs, targets, _ = split_inputs(inputs)
    batch = targets.shape[0]
    saved = {n: p.grad for n, p in params.items()}
    for p in params.values():
        p.grad_sample = None
        p.grad = None
    out, bad = {}, []
    try:
        with torch.enable_grad():
            losses = _loss_from_output(grad_sample_module(**model_inputs), targets, loss_type, label_smoothing,
                                       problem_type)
            losses.sum().backward()
        for n, p in params.items():
            gs = getattr(p, "grad_sample", None)
            if gs is None and p.grad is not None:
                bad.append(f"{n} (a gradient but no per-example gradient)")
            elif gs is not None and (gs.dim() != p.dim() + 1 or gs.shape[0] != batch):
                bad.append(f"{n} (per-example gradient of shape {tuple(gs.shape)} for a batch of {batch})")
            out[n] = torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device) if gs is None else gs
    finally:
        for n, p in params.items():
            p.grad_sample = None
            p.grad = saved[n]
    if bad:
        raise NotPrivatizableError(
            f"per_sample_method='hooks' cannot privatise {bad[:4]}: Opacus computed no per-example gradient for "
            "them (a parameter applied to the whole batch at once, such as learned position embeddings); use "
            "per_sample_method='vmap' or 'loop'"
        )
    return out, losses.detach()
