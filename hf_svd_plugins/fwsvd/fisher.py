"""Empirical Fisher of Linear weights from layer inputs and output gradients, with hooks (weights may be frozen).

For a layer ``y = x W^T`` the gradient of example ``n``'s own loss is ``dL_n/dW = g_n^T x_n`` with ``x_n (T, d_in)``
its inputs and ``g_n = dL_n/dy_n (T, d_out)``. The importance of input feature ``j`` is
``I_j = sum_n sum_i (g_n^T x_n)_ij^2``: only ``(d_in,)`` float64 numbers are kept per layer. ``dL/dW`` is never
formed from the weight's own ``.grad``, so frozen base weights (after LoRA, merged or not) work, and the pass never
touches any ``.grad``.

How per-example gradients come out of one batched backward. The model's loss is a mean over valid positions
(tokens whose label is not ``-100``, or one row per sequence for classification), ``L = (1/N) sum_t l_t``, where
``N`` is the number of valid positions in the batch, or ``num_items_in_batch`` when the Trainer passes it; whatever
the backward is called on (``L`` divided by the gradient-accumulation steps, multiplied by a loss scale, ...) reaches
``L`` as a factor ``lambda``. The hooks read:

* ``lambda``: the gradient arriving at ``outputs.loss``;
* ``N_n``: the positions of example ``n`` whose ``outputs.logits`` row receives a non-zero gradient;
* ``g``: each layer's output gradient, ``(lambda / N) sum_{t in n} dl_t/dy`` at example ``n``'s positions.

Example ``n``'s own loss ``L_n = (1/N_n) sum_{t in n} l_t`` (mean over its valid tokens) then has output gradient
``g_n N / (lambda N_n)``. Labels are shifted by the model (causal LMs), never here: only the model's own loss is used.
Examples do not interact in these models (padding is masked), so nothing else couples ``g_n`` to other examples.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from hf_svd_plugins.fwsvd.core import DEFAULT_CHUNK_BYTES, batch_fisher, per_example_fisher
from hf_svd_plugins.fwsvd.targets import TargetLayer, Targets, select_targets
from hf_svd_plugins.lora import loss_module, unwrap_model

logger = logging.getLogger(__name__)


class _Pass:
    """What one forward pass leaves for its backward: inputs per layer, the loss scale, per-example weights."""

    def __init__(self, num_items: float | None):
        self.num_items = num_items
        self.loss_scale: float | None = None
        self.example_weights: torch.Tensor | None = None  # (B,): multiplies g_n to give dL_n/dy_n
        self.inputs: dict[str, torch.Tensor] = {}


def _first_tensor(args: tuple, kwargs: Mapping) -> torch.Tensor | None:
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _get(outputs, key: str):
    if isinstance(outputs, Mapping) or hasattr(outputs, "keys"):
        return outputs.get(key) if hasattr(outputs, "get") else None
    return getattr(outputs, key, None)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The token-embedding module (``get_input_embeddings()``, else the first ``nn.Embedding``)."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is not None:
        try:
            module = getter()
        except (NotImplementedError, AttributeError):
            module = None
        if module is not None:
            return module
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


class FisherAccumulator:
    """Hooks that add every backward pass's per-example (or per-batch) Fisher into float64 sums.

    ``attach()`` installs them on ``model`` (the module whose forward returns ``loss`` and ``logits``) and on
    ``layers``; sums grow only while :attr:`recording` is True and grad is enabled. Used by :func:`estimate_fisher`
    (which drives its own passes) and by ``FisherCallback`` (which reads the Trainer's own backward passes).

    Attributes:
        sums: ``{layer name: (d_in,) float64}``.
        examples: examples with at least one valid position that reached a backward pass.
        batches: backward passes read.
        limit: stop recording after this many backward passes of this process (None: no limit).
    """

    def __init__(self, model: nn.Module, layers: list[TargetLayer], per_example: bool = True,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.model = model
        self.layers = layers
        self.per_example = per_example
        self.chunk_bytes = chunk_bytes
        device = next(model.parameters()).device
        self.sums = {t.name: torch.zeros(t.shape[1], dtype=torch.float64, device=device) for t in layers}
        self.examples = 0
        self.batches = 0
        self.local_batches = 0  # backward passes read by this process (not reduced), checked against ``limit``
        self.limit: int | None = None
        self.recording = True
        self._pass: _Pass | None = None
        self._handles: list = []

    # ------------------------------------------------------------------ hooks

    def attach(self) -> FisherAccumulator:
        if self._handles:
            return self
        # The loss and logits are read where the loss is computed, before any other hook replaces them: DeepSpeed
        # ZeRO-3 wraps every module's outputs in its own autograd functions, so the logits a wrapper returns are
        # not the tensor the loss was computed from and never receive a gradient.
        top = loss_module(self.model)
        self._handles.append(top.register_forward_pre_hook(self._pre_forward, with_kwargs=True, prepend=True))
        self._handles.append(top.register_forward_hook(self._post_forward, prepend=True))
        embeddings = input_embeddings(self.model)
        if embeddings is not None:
            self._handles.append(embeddings.register_forward_hook(self._embeddings_require_grad, prepend=True))
        for target in self.layers:
            self._handles.append(target.outer.register_forward_hook(self._layer_hook(target.name), prepend=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pass = None

    def _active(self) -> bool:
        under_limit = self.limit is None or self.local_batches < self.limit
        return self.recording and under_limit and torch.is_grad_enabled()

    def _pre_forward(self, module, args, kwargs):
        if self._active():
            num_items = kwargs.get("num_items_in_batch")
            self._pass = _Pass(None if num_items is None else float(num_items))

    def _embeddings_require_grad(self, module, args, output):
        # Gradients must reach every layer even when nothing upstream is trainable (frozen or LoRA models): the
        # token embeddings' output becomes a graph input, like PEFT's enable_input_require_grads.
        if self._pass is not None and isinstance(output, torch.Tensor) and not output.requires_grad:
            return output.requires_grad_(True)
        return None

    def _layer_hook(self, name: str):
        def hook(module, args, output):
            current = self._pass
            if current is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            current.inputs[name] = args[0].detach() if args else None
            output.register_hook(lambda grad: self._accumulate(current, name, grad))

        return hook

    def _post_forward(self, module, args, outputs):
        current, self._pass = self._pass, None
        if current is None:
            return
        loss, logits = _get(outputs, "loss"), _get(outputs, "logits")
        if not isinstance(loss, torch.Tensor) or not isinstance(logits, torch.Tensor):
            raise ValueError("Fisher needs a model whose forward returns `loss` and `logits` (pass labels in the batch)")
        if not loss.requires_grad:
            return
        loss.register_hook(lambda grad: self._set_loss_scale(current, grad))
        logits.register_hook(lambda grad: self._set_example_weights(current, grad))

    def _set_loss_scale(self, current: _Pass, grad: torch.Tensor) -> None:
        current.loss_scale = float(grad.detach().float().sum())

    def _set_example_weights(self, current: _Pass, grad: torch.Tensor) -> None:
        if current.loss_scale is None:
            raise ValueError(
                "the backward pass does not go through the model's own `outputs.loss` (a label smoother or "
                "compute_loss_func?): per-example Fisher needs the model's loss; use FisherCallback(mode='end') or "
                "estimate_fisher on the batches"
            )
        rows = grad.detach().reshape(grad.shape[0], -1, grad.shape[-1])
        valid = (rows != 0).any(-1).sum(1).to(torch.float64)  # N_n: positions of example n in the loss
        total = current.num_items if current.num_items is not None else float(valid.sum())
        weights = torch.zeros_like(valid)
        used = valid > 0
        if current.loss_scale != 0:
            weights[used] = total / (current.loss_scale * valid[used])
        if not self.per_example:
            weights = weights / max(int(used.sum()), 1)  # gradient of the batch's mean per-example loss
        current.example_weights = weights
        self.examples += int(used.sum())
        self.batches += 1
        self.local_batches += 1

    def _accumulate(self, current: _Pass, name: str, grad: torch.Tensor) -> None:
        x = current.inputs.pop(name, None)
        weights = current.example_weights
        if x is None or weights is None:
            return
        batch = weights.shape[0]
        if x.shape[0] != batch or grad.shape[0] != batch:
            raise ValueError(f"layer {name} sees inputs of shape {tuple(x.shape)} for a batch of {batch}: rows cannot "
                             "be attributed to examples; leave it out of targets or use per_example=False")
        x = x.reshape(batch, -1, x.shape[-1])
        g = grad.detach().reshape(batch, -1, grad.shape[-1])
        g = g * weights.to(device=g.device, dtype=torch.float32 if g.dtype != torch.float64 else g.dtype).view(-1, 1, 1)
        fisher = per_example_fisher if self.per_example else batch_fisher
        self.sums[name] += fisher(x, g, self.chunk_bytes).to(self.sums[name].device)


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_fisher_passes(model: nn.Module, accumulator: FisherAccumulator, batches: Iterable[Mapping],
                      max_batches: int | None = None, progress: bool = False) -> int:
    """Forward and backward over ``batches`` with the model's own loss, in eval mode (no dropout), touching no
    ``.grad``: the gradient is requested only at the token embeddings' output. Returns the number of batches read."""
    from tqdm.auto import tqdm

    embeddings = input_embeddings(model)
    if embeddings is None:
        raise ValueError(f"cannot find the token embeddings of {type(model).__name__} (get_input_embeddings)")
    captured: list[torch.Tensor] = []
    handle = embeddings.register_forward_hook(lambda m, a, out: captured.append(out))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    read = 0
    try:
        iterator = batches if max_batches is None else itertools.islice(batches, max_batches)
        for batch in tqdm(iterator, total=max_batches, desc="Fisher", disable=not progress):
            captured.clear()
            with torch.enable_grad():
                outputs = model(**_to_device(batch, device))
                loss = _get(outputs, "loss")
                if loss is None:
                    raise ValueError("Fisher needs labels in every batch: the model returned no loss")
                inputs = [t for t in captured if t.requires_grad]
                if inputs:
                    torch.autograd.grad(loss, inputs, allow_unused=True)
            read += 1
    finally:
        handle.remove()
        model.train(was_training)
    return read


def estimate_fisher(model: nn.Module, dataloader: Iterable[Mapping], targets: Targets = None,
                    max_batches: int | None = None, per_example: bool = True,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: bool = False) -> dict[str, torch.Tensor]:
    """The empirical Fisher importance of every targeted layer's input features.

    Args:
        model: a transformers model (or a PEFT model around one) whose forward returns ``loss`` and ``logits``; it
            may be frozen. Run in eval mode; its ``.grad`` are not touched.
        dataloader: batches as the model takes them, with ``labels`` (the model shifts them itself).
        targets: see :func:`~hf_svd_plugins.fwsvd.targets.select_targets` (default: every Linear/Conv1D of the blocks).
        max_batches: read at most this many batches.
        per_example: True: ``sum_n (dL_n/dW)^2`` with ``L_n`` example ``n``'s own loss (the paper's estimator).
            False: ``sum_batches (dL_b/dW)^2`` with ``L_b`` the batch's mean per-example loss; cheaper (one
            ``(d_out, d_in)`` product per batch, not per example) but it squares the *mean* gradient, so it is
            roughly ``1/batch_size`` of the per-example value and, once training has converged (mean gradient ~ 0),
            mostly noise. Only relative importances matter for compression.
        chunk_bytes: bound on temporary buffers (see :func:`~hf_svd_plugins.fwsvd.core.per_example_fisher`).
        progress: show a progress bar.

    Returns:
        ``{module name: (d_in,) float64}`` summed over the batches of this process; names as in the merged model
        (``model.named_modules()`` of a plain model). Under DDP/ZeRO every rank must call it on its own batches; the
        sums are all-reduced, so every rank returns the sums over all ranks' batches.

    Memory: ``(d_in,)`` float64 per layer; during a pass each layer's input stays referenced until its gradient
    arrives (as in training), plus the per-example buffers bounded by ``chunk_bytes``.
    """
    from hf_svd_plugins.distributed import all_reduce_sum_

    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
    inner = unwrap_model(model)
    layers = select_targets(inner, targets)
    accumulator = FisherAccumulator(inner, layers, per_example=per_example, chunk_bytes=chunk_bytes).attach()
    try:
        read = run_fisher_passes(inner, accumulator, dataloader, max_batches, progress)
    finally:
        accumulator.detach()
    if read == 0:
        raise ValueError("dataloader is empty: the Fisher needs at least one batch with labels")
    sums = list(accumulator.sums.values())
    all_reduce_sum_(sums)
    return {name: s.cpu() for name, s in zip(accumulator.sums, sums, strict=True)}
