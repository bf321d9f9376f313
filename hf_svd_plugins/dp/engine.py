"""How a model's per-example losses and gradients are computed: decided on real batches, verified, then applied.

Decisions (each against a reference the model provides, never against our own code):

- positions under left padding (:func:`.masks.detect_position_handling`: every example alone and unpadded);
- the loss type (:func:`.loss_type.guess_loss_type`, then :func:`.loss_type.check_loss_type` against the model's own
  loss on the first batch with targets);
- the method: ``vmap`` when a 4D mask kind reproduces the model's own masking (:func:`.masks.detect_mask_kinds`),
  re-verified on the first batch longer than a window the config declares; else Opacus ``hooks`` when it supports
  every trainable layer and returns a per-example gradient for each; else ``loop``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from hf_svd_plugins.dp.batch import (
    check_no_targets_on_padding,
    check_not_packed,
    has_left_padding,
    position_ids_from_mask,
)
from hf_svd_plugins.dp.config import DPConfig
from hf_svd_plugins.dp.loss_type import check_loss_type, guess_loss_type
from hf_svd_plugins.dp.masks import (
    choose_mask_kind,
    declared_window,
    detect_mask_kinds,
    detect_position_handling,
    longest_real_length,
    model_config,
)
from hf_svd_plugins.dp.per_sample import (
    NotPrivatizableError,
    hooks_per_sample_grads,
    loop_per_sample_grads,
    unsupported_for_hooks,
    vmap_per_sample_grads,
)

logger = logging.getLogger(__name__)


class PerExampleGradients:
    """Per-example gradients of one model under one :class:`DPConfig`.

    Args:
        config: the DP configuration (``per_sample_method``, ``loss_type``).
        checkpointing: activation checkpointing is on (only ``loop`` is exact then).
        deepspeed: running under DeepSpeed (no Opacus hooks).
        label_smoothing: ``TrainingArguments.label_smoothing_factor``.

    Attributes:
        method: ``"vmap"``, ``"hooks"`` or ``"loop"`` once decided (None before the first batch).
        loss_type: ``"causal_lm"``, ``"token"`` or ``"sequence"`` once decided.
        mask_kind: the 4D mask kind ``vmap`` uses (see :mod:`.masks`).
        positions: ``"from_mask"`` or ``"model"`` once a left-padded batch was seen.
    """

    def __init__(self, config: DPConfig, checkpointing: bool, deepspeed: bool, label_smoothing: float = 0.0) -> None:
        self.config = config
        self.checkpointing = checkpointing
        self.deepspeed = deepspeed
        self.label_smoothing = float(label_smoothing or 0.0)
        self.method: str | None = None
        self.loss_type: str | None = None
        self.loss_verified = False
        self.problem_type: str | None = None
        self.mask_kind: str | None = None
        self.mask_verified_length = 0
        self.positions: str | None = None
        self._undecided = False
        self._grad_sample_module = None

    # ---------------------------------------------------------------------------------------------------- batches

    def prepare(self, module: nn.Module, inputs: Mapping[str, object]) -> dict:
        """Check a (non-empty, device-placed) batch, add what the per-example computation needs (``position_ids``
        under left padding) and take the decisions still open. Returns the batch to compute on."""
        check_not_packed(inputs)
        inputs = dict(inputs)
        am = inputs.get("attention_mask")
        if torch.is_tensor(am) and am.dim() == 2 and "position_ids" not in inputs and has_left_padding(am):
            if self.positions is None:
                self.positions = detect_position_handling(module, inputs)
                if self.positions is None:
                    raise ValueError(
                        "left-padded batches change this model's per-example outputs (positions counted over the "
                        "padded row depend on the batch's longest example), which breaks the per-example sensitivity "
                        "bound; pad on the right (tokenizer.padding_side = 'right') or pass position_ids"
                    )
                logger.info("DP: left padding; positions %s", self.positions)
            if self.positions == "from_mask":
                inputs["position_ids"] = position_ids_from_mask(am)
        if self.loss_type is None:
            self.problem_type = getattr(model_config(module), "problem_type", None)
            cfg_type = self.config.loss_type
            self.loss_type = guess_loss_type(module, inputs) if cfg_type == "auto" else cfg_type
        if self.loss_type in ("causal_lm", "token"):
            check_no_targets_on_padding(inputs)
        if not self.loss_verified:
            self._verify_loss_type(module, inputs)
        if self.method is None or self._undecided:
            self._decide_method(module, inputs)
        elif self.method == "vmap":
            self._recheck_mask(module, inputs)
        return inputs

    def _verify_loss_type(self, module: nn.Module, inputs: dict) -> None:
        status, suggestion = check_loss_type(module, inputs, self.loss_type, self.problem_type)
        if status == "no_targets":
            return  # ask again on the next batch
        self.loss_verified = True
        if status == "no_model_loss":
            if self.config.loss_type == "auto" and self.loss_type != "sequence":
                warnings.warn(
                    f"DP: the model returns no loss for its labels, so loss_type={self.loss_type!r} (guessed from its "
                    "class) cannot be checked against it; set DPConfig(loss_type='causal_lm' or 'token') explicitly",
                    UserWarning, stacklevel=4,
                )
            return
        if suggestion is None:
            return
        fix = (f"loss_type={suggestion!r} does: set DPConfig(loss_type={suggestion!r})" if suggestion != "none" else
               "no built-in loss type does: set DPConfig(loss_type=...) to 'causal_lm', 'token' or 'sequence' as the "
               "model trains")
        message = (f"DP: the per-example losses of loss_type={self.loss_type!r} do not average to the model's own loss "
                   f"on the first batch; {fix}")
        if self.config.loss_type == "auto":
            raise ValueError(message)
        warnings.warn(message + f" (kept, since DPConfig(loss_type={self.loss_type!r}) was given)", UserWarning,
                      stacklevel=4)

    def _decide_method(self, module: nn.Module, inputs: dict) -> None:
        method = self.config.per_sample_method
        if method == "auto" and self.checkpointing:
            warnings.warn(
                "DP: activation checkpointing is on, so only per_sample_method='loop' is exact (slow); set "
                "activation_checkpointing=False for the fast vmap/hooks methods", UserWarning, stacklevel=4,
            )
            method = "loop"
        if method in ("auto", "vmap"):
            kind = choose_mask_kind(detect_mask_kinds(module, inputs))
            if kind == "ambiguous":  # e.g. only length-1 sequences: exact loop for this batch, decide on the next one
                self.method, self._undecided = "loop", True
                return
            self._undecided = False
            if kind is None and method == "vmap":
                raise ValueError(
                    "per_sample_method='vmap': could not verify how this model applies attention_mask to a 4D mask "
                    "(no causal, bidirectional or sliding-window mask reproduces its outputs); use "
                    "per_sample_method='loop'"
                )
            self.mask_kind = kind
            self.mask_verified_length = longest_real_length(inputs)
        if method == "auto":
            # vmap when verified (a deterministic choice, so runs with fixed seeds are reproducible), else hooks
            method = "vmap" if self.mask_kind is not None else self._fallback(module)
        self._use(module, method)

    def _recheck_mask(self, module: nn.Module, inputs: dict) -> None:
        """A window declared by the config only shows on longer rows: verify again on the first longer batch."""
        window = declared_window(module)
        length = longest_real_length(inputs)
        if window is None or self.mask_kind == "none" or self.mask_verified_length > window:
            return
        if length <= self.mask_verified_length:
            return
        matches = detect_mask_kinds(module, inputs) or []
        kind = self.mask_kind if self.mask_kind in matches else choose_mask_kind(matches)
        if kind not in (None, "ambiguous"):
            if kind != self.mask_kind:
                logger.info("DP: mask kind %s -> %s on a %d-token batch", self.mask_kind, kind, length)
            self.mask_kind, self.mask_verified_length = kind, length
            return
        if self.config.per_sample_method == "vmap":
            raise ValueError(
                f"per_sample_method='vmap': on a {length}-token batch (longer than the config's attention window "
                f"{window}) no 4D mask reproduces the model's own masking; use per_sample_method='loop'"
            )
        method = self._fallback(module)
        warnings.warn(f"DP: the vmap mask is not exact beyond {window} tokens for this model; using "
                      f"per_sample_method={method!r}", UserWarning, stacklevel=4)
        self.mask_kind = None
        self._use(module, method)

    def _fallback(self, module: nn.Module) -> str:
        """``hooks`` if Opacus supports every trainable layer (and no DeepSpeed), else ``loop``."""
        if not self.deepspeed and not unsupported_for_hooks(module):
            return "hooks"
        warnings.warn("DP: neither vmap nor Opacus hooks is exact for this model; using per_sample_method='loop'",
                      UserWarning, stacklevel=5)
        return "loop"

    def _use(self, module: nn.Module, method: str) -> None:
        if method == "hooks" and self._grad_sample_module is None:
            from opacus import GradSampleModule

            self._grad_sample_module = GradSampleModule(module, batch_first=True, loss_reduction="sum")
        self.method = method
        logger.info("DP: per-sample method %s, loss type %s", method, self.loss_type)

    # ---------------------------------------------------------------------------------------------------- compute

    def compute(
        self, module: nn.Module, params: Mapping[str, torch.Tensor], inputs: Mapping[str, object]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({name: (B, *shape)}, losses (B,))`` for a batch returned by :meth:`prepare` (or a chunk of one)."""
        args = (self.loss_type, self.label_smoothing, self.problem_type)
        auto = self.config.per_sample_method == "auto"
        if self.method == "vmap":
            try:
                return vmap_per_sample_grads(module, params, inputs, self.loss_type, self.mask_kind,
                                             self.label_smoothing, self.problem_type)
            except RuntimeError as exc:  # e.g. a forward hook calling requires_grad_ inside torch.func
                if not auto:
                    raise
                method = self._fallback(module)
                warnings.warn(f"DP: vmap failed ({str(exc)[:200]}); using per_sample_method={method!r}",
                              UserWarning, stacklevel=3)
                self._use(module, method)
        if self.method == "hooks":
            try:
                return hooks_per_sample_grads(self._grad_sample_module, params, inputs, *args)
            except NotPrivatizableError as exc:
                if not auto:
                    raise
                warnings.warn(f"{exc}; using per_sample_method='loop'", UserWarning, stacklevel=3)
                self.release_hooks()
                self._use(module, "loop")
        return loop_per_sample_grads(module, params, inputs, *args)

    def release_hooks(self) -> None:
        """Remove Opacus hooks from the model; the method is decided again on the next batch."""
        if self._grad_sample_module is not None:
            self._grad_sample_module._close()
            self._grad_sample_module = None
        self.method = None
