"""Per-example gradients over the trainable parameters only (the per-example losses are in :mod:`.loss_type`).

Three exact methods, all returning ``({name: (B, *param_shape)}, losses (B,))``:

- :func:`vmap_per_sample_grads`: ``torch.func.vmap(grad(functional_call))``. Each example runs as a batch of one, so
  the padding mask is passed as a 4D additive mask of the kind the model uses (see :mod:`.masks`).
- :func:`hooks_per_sample_grads`: Opacus ``GradSampleModule`` hooks (``loss_reduction="sum"``); every grad sample
  must have the batch's leading dimension and sum to the gradient the same backward produced (a parameter also used
  outside its module, e.g. an embedding matrix reused as the output layer, gets only part of its per-example gradient
  from Opacus), else :class:`NotPrivatizableError`;
- :func:`loop_per_sample_grads`: one backward per example alone, its padding stripped (the reference; any model).

An example's loss is the mean over its *own* valid targets (``labels == -100`` ignored); nothing is normalised
across examples. Whether the batched methods reproduce each example alone and unpadded is checked on real batches by
the caller (:mod:`.engine`, with :mod:`.padding`); positions under left padding are the caller's job too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_map

from hf_svd_plugins.dp.batch import IGNORE_INDEX, LABEL_KEYS, logits_of, split_inputs
from hf_svd_plugins.dp.loss_type import per_example_loss
from hf_svd_plugins.dp.masks import (
    attention_mask_4d,
    build_attention_mask,
    detect_mask_kind,
    float_dtype,
    sliding_window_of,
)
from hf_svd_plugins.dp.padding import example_alone

__all__ = [
    "IGNORE_INDEX", "LABEL_KEYS", "NotPrivatizableError", "attention_mask_4d", "detect_mask_kind",
    "hooks_per_sample_grads", "loop_per_sample_grads", "per_example_loss", "trainable_parameters",
    "unsupported_for_hooks", "vmap_per_example_outputs", "vmap_per_sample_grads",
]


class NotPrivatizableError(ValueError):
    """A per-example gradient cannot be computed for some parameter with the chosen method."""


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

    mapped, fixed, targets = _vmap_inputs(model, inputs, mask_kind)
    detached = {n: p.detach() for n, p in params.items()}

    def loss_one(p: dict[str, torch.Tensor], example: dict[str, torch.Tensor], target: torch.Tensor):
        kwargs = tree_map(lambda v: v.unsqueeze(0), example)
        out = functional_call(model, p, args=(), kwargs={**kwargs, **fixed})
        loss = _loss_from_output(out, target.unsqueeze(0), loss_type, label_smoothing, problem_type)[0]
        return loss, loss.detach()

    with _math_attention():
        grads, losses = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0), randomness="different")(
            detached, mapped, targets
        )
    return dict(grads), losses


@torch.no_grad()
def vmap_per_example_outputs(model: nn.Module, inputs: Mapping[str, object], mask_kind: str = "none") -> torch.Tensor:
    """The logits every example gets under :func:`vmap_per_sample_grads` (each a batch of one with the batch's padded
    length and the 4D mask of ``mask_kind``): ``(B, T, V)`` or ``(B, C)``. What the method's own view of the batch
    is compared with (each example alone and unpadded)."""
    from torch.func import vmap

    mapped, fixed, _ = _vmap_inputs(model, inputs, mask_kind)

    def logits_one(example: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits_of(model(**tree_map(lambda v: v.unsqueeze(0), example), **fixed))[0]

    with _math_attention():
        return vmap(logits_one, randomness="different")(mapped)


def _vmap_inputs(model: nn.Module, inputs: Mapping[str, object], mask_kind: str) -> tuple[dict, dict, torch.Tensor]:
    """``(mapped, fixed, targets)``: the tensors vmap maps over (leading dim ``B``; a 2D ``attention_mask`` turned into
    the 4D mask of ``mask_kind``) and the arguments passed as is."""
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
    return mapped, fixed, targets


def _math_attention():
    # The fused CPU/GPU SDPA kernels have no vmap batching rule (a slow per-example fallback); the math backend
    # decomposes into batched matmuls and gives the same result.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def loop_per_sample_grads(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: Mapping[str, object],
    loss_type: str,
    label_smoothing: float = 0.0,
    problem_type: str | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients by one forward/backward per example alone, its padding stripped
    (:func:`~.padding.example_alone`): slow, and the reference every other method is checked against. Same contract
    as :func:`vmap_per_sample_grads`."""
    _, targets, _ = split_inputs(inputs)
    batch = targets.shape[0]
    names = list(params)
    tensors = [params[n] for n in names]
    per_param: list[list[torch.Tensor]] = [[] for _ in names]
    losses = []
    for i in range(batch):
        ex, target = split_inputs(example_alone(inputs, i, batch))[:2]
        with torch.enable_grad():
            loss = _loss_from_output(model(**ex), target, loss_type, label_smoothing, problem_type)[0]
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
    low_precision: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients from Opacus hooks: one batched forward/backward of ``sum_i loss_i``.

    Args:
        grad_sample_module: ``opacus.GradSampleModule(model, batch_first=True, loss_reduction="sum")``.
        params: ``{name: param}`` of the wrapped model's trainable parameters (``p.grad`` is left untouched).
        inputs, loss_type, label_smoothing, problem_type: as in :func:`vmap_per_sample_grads`.
        low_precision: the forward runs in half precision (bf16 autocast): the sum check's tolerance is looser.

    Raises:
        NotPrivatizableError: a parameter got a gradient but no per-example one, one whose leading dimension is
            not the batch (a parameter applied to the whole batch at once, e.g. learned position embeddings looked
            up with ``(1, T)`` position ids: Opacus returns one sample for the whole batch), or per-example gradients
            that do not sum to the batch gradient of the same backward (a parameter also used directly, outside its
            module, e.g. ``F.linear(h, embed.weight)``: Opacus only sees the module's use).
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
            elif gs is not None and not _sums_to(gs, p.grad, low_precision):
                bad.append(f"{n} (per-example gradients that do not sum to its gradient: a use outside its module)")
            out[n] = torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device) if gs is None else gs
    finally:
        for n, p in params.items():
            p.grad_sample = None
            p.grad = saved[n]
    if bad:
        raise NotPrivatizableError(
            f"per_sample_method='hooks' cannot privatise {bad[:4]}: Opacus computed no per-example gradient for "
            "them (a parameter applied to the whole batch at once, such as learned position embeddings, or also used "
            "directly outside its module, such as an embedding matrix reused as the output layer); use "
            "per_sample_method='vmap' or 'loop'"
        )
    return out, losses.detach()


def _sums_to(grad_sample: torch.Tensor, grad: torch.Tensor | None, low_precision: bool = False) -> bool:
    """``grad_sample (B, *shape)`` sums to ``grad`` up to float summation error (relative to the per-example sizes)."""
    total = grad_sample.sum(0)
    if grad is None:
        return not bool(total.any())
    low = low_precision or grad.dtype in (torch.float16, torch.bfloat16)
    scale = grad_sample.reshape(grad_sample.shape[0], -1).double().norm(dim=1).sum()
    return float((total.double() - grad.double()).norm()) <= (1e-2 if low else 1e-4) * float(scale) + 1e-12
