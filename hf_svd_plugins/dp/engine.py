"""How a model's per-example losses and gradients are computed: decided on real batches, verified, then applied.

Decisions (each against a reference the model provides, never against our own code):

- padding (:func:`.padding.check_padding_invariance`, on the first padded batch whatever the padding side and
  whether or not the collator gives ``position_ids``): the model's outputs at each example's real tokens must equal
  its outputs alone and unpadded, with positions counted from the mask under left padding where the model needs it;
  otherwise refused, naming the cause (``config.pad_token_id`` unset, a model ignoring ``attention_mask``);
- the loss type (:func:`.loss_type.guess_loss_type`, then :func:`.loss_type.check_loss_type` against the model's own
  loss on the first batch with targets);
- the method: ``vmap`` when a 4D mask kind reproduces the model's own masking (:func:`.masks.detect_mask_kinds`),
  re-verified on the first batch longer than a window the config declares; else Opacus ``hooks`` when it supports
  every trainable layer and returns a per-example gradient for each; else ``loop``. Never settled on a batch of one
  (nothing to compare). On the first padded batch a ``vmap`` or ``hooks`` choice is verified against ``loop`` (each
  example alone, its padding stripped): every checked example's output (vmap) and the per-example gradients of the
  two most padded examples (model in eval mode). ``auto`` falls back (vmap -> hooks -> loop); an explicit method
  that fails is refused.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from hf_svd_plugins.dp.batch import check_no_targets_on_padding, check_not_packed, split_inputs
from hf_svd_plugins.dp.clipping import per_sample_norms
from hf_svd_plugins.dp.config import DPConfig
from hf_svd_plugins.dp.loss_type import check_loss_type, guess_loss_type, is_causal_lm
from hf_svd_plugins.dp.masks import (
    choose_mask_kind,
    declared_window,
    detect_mask_kinds,
    longest_real_length,
    model_config,
)
from hf_svd_plugins.dp.padding import (
    attention_mask_2d,
    check_padding_invariance,
    check_position_ids,
    has_left_padding,
    has_padding,
    outputs_alone,
    outputs_match_alone,
    position_ids_from_mask,
    rows_to_check,
    take_rows,
)
from hf_svd_plugins.dp.per_sample import (
    NotPrivatizableError,
    hooks_per_sample_grads,
    loop_per_sample_grads,
    unsupported_for_hooks,
    vmap_per_example_outputs,
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
        low_precision: the forward runs in half precision (bf16 autocast): looser tolerances in the checks.

    Attributes:
        method: ``"vmap"``, ``"hooks"`` or ``"loop"`` once decided (None before the first batch).
        loss_type: ``"causal_lm"``, ``"token"`` or ``"sequence"`` once decided.
        mask_kind: the 4D mask kind ``vmap`` uses (see :mod:`.masks`).
        positions: ``"from_mask"`` or ``"model"`` once a left-padded batch was seen.
        padding_checked: the model's handling of padding was checked against each example alone.
        verified_methods: the methods verified against ``loop`` on a padded batch.
    """

    def __init__(self, config: DPConfig, checkpointing: bool, deepspeed: bool, label_smoothing: float = 0.0,
                 low_precision: bool = False) -> None:
        self.config = config
        self.low_precision = low_precision
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
        self.padding_checked = False
        self.verified_methods: set[str] = set()
        self._undecided = False
        self._grad_sample_module = None

    # ---------------------------------------------------------------------------------------------------- batches

    def prepare(self, module: nn.Module, params: Mapping[str, torch.Tensor], inputs: Mapping[str, object]) -> dict:
        """Check a (non-empty, device-placed) batch, add what the per-example computation needs (``position_ids``
        under left padding) and take the decisions still open. Returns the batch to compute on."""
        check_not_packed(inputs)
        check_position_ids(inputs)
        inputs = dict(inputs)
        am = attention_mask_2d(inputs)
        left = am is not None and "position_ids" not in inputs and has_left_padding(am)
        if (left and self.positions is None) or (has_padding(inputs) and not self.padding_checked):
            positions = check_padding_invariance(module, inputs, self.config.max_physical_batch_size,
                                                 self.low_precision)
            self.padding_checked = True
            if left:
                self.positions = positions
                logger.info("DP: left padding; positions %s", positions)
        if left and self.positions == "from_mask":
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
        self._verify_method(module, params, inputs)
        return inputs

    def _verify_loss_type(self, module: nn.Module, inputs: dict) -> None:
        check = check_loss_type(module, inputs, self.loss_type, self.problem_type)
        suggestion = check.suggestion
        if check.status == "no_targets":
            return  # ask again on the next batch
        self.loss_verified = True
        if check.status == "no_model_loss":
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
                   f"on the first batch ({check.details}); {fix}")
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
            _, targets, _ = split_inputs(inputs)
            if int(targets.shape[0]) == 1:  # nothing to compare a batch of one with: exact loop, decide on the next
                self.method, self._undecided = "loop", True
                return
            kind = choose_mask_kind(detect_mask_kinds(module, inputs))
            if kind == "ambiguous" and has_padding(inputs):
                # the mask kind does not change the outputs (the padding check passed): either kind is exact
                kind = "causal" if is_causal_lm(module) else "bidirectional"
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

    def _verify_method(self, module: nn.Module, params: Mapping[str, torch.Tensor], inputs: dict) -> None:
        """On the first padded batch a method sees: ``vmap``/``hooks`` must reproduce each example alone and unpadded
        (``loop``, exact by construction). ``auto`` falls back to the next method, an explicit one is refused."""
        method = self.method
        if method in (None, "loop") or method in self.verified_methods or self._undecided or not has_padding(inputs):
            return
        try:
            problem = self._method_problem(module, params, inputs)
        except RuntimeError as exc:  # e.g. vmap under autocast, or a model torch.func cannot run
            if self.config.per_sample_method != "auto":
                raise
            problem = f"it fails: {str(exc)[:200]}"
        if problem is None:
            self.verified_methods.add(method)
            return
        if self.config.per_sample_method != "auto":
            raise ValueError(
                f"per_sample_method={method!r} does not reproduce each example alone and unpadded on this model "
                f"({problem}), so an example's gradient would depend on the padding of its batch; use "
                "per_sample_method='loop' (every example alone, its padding stripped)"
            )
        fallback = self._fallback(module) if method == "vmap" else "loop"
        warnings.warn(f"DP: per_sample_method={method!r} is not exact for this model on padded batches ({problem}); "
                      f"using per_sample_method={fallback!r}", UserWarning, stacklevel=4)
        self.release_hooks()
        self._use(module, fallback)
        self._verify_method(module, params, inputs)

    def _method_problem(self, module: nn.Module, params: Mapping[str, torch.Tensor], inputs: dict) -> str | None:
        """What differs between the method and each example alone and unpadded on this batch, or None."""
        _, targets, _ = split_inputs(inputs)
        batch = int(targets.shape[0])
        rows = rows_to_check(inputs, batch, self.config.max_physical_batch_size)
        sub = take_rows(inputs, rows, batch)
        two = take_rows(sub, range(min(2, len(rows))), len(rows))
        args = (self.loss_type, self.label_smoothing, self.problem_type)
        was_training = module.training
        module.eval()  # no dropout: the method and the reference must see the same function
        try:
            if self.method == "vmap":
                if not outputs_match_alone(vmap_per_example_outputs(module, sub, self.mask_kind), sub,
                                           outputs_alone(module, sub, len(rows)), self.low_precision):
                    return "the outputs it computes for padded examples differ from theirs alone"
                got, _ = vmap_per_sample_grads(module, params, two, self.loss_type, self.mask_kind, *args[1:])
            else:
                for m in module.modules():  # Opacus only records in train mode: the layers it hooks, nothing else
                    if any(p.requires_grad for p in m.parameters(recurse=False)):
                        m.training = True
                try:
                    got, _ = hooks_per_sample_grads(self._grad_sample_module, params, two, *args,
                                                    low_precision=self.low_precision)
                except NotPrivatizableError as exc:
                    if self.config.per_sample_method != "auto":
                        raise
                    return str(exc)[:300]
                module.eval()
            gsm = self._grad_sample_module
            if gsm is not None:
                gsm.disable_hooks()  # the reference runs on the plain model
            try:
                ref, _ = loop_per_sample_grads(module, params, two, *args)
            finally:
                if gsm is not None:
                    gsm.enable_hooks()
        finally:
            module.train(was_training)
        names = list(params)
        diff = per_sample_norms([got[n].double() - ref[n].double() for n in names])
        size = per_sample_norms([ref[n].double() for n in names])
        low = self.low_precision or any(p.dtype in (torch.float16, torch.bfloat16) for p in params.values())
        if bool((diff > (5e-2 if low else 1e-3) * size + 1e-6 * float(size.max()) + 1e-12).any()):
            return (f"per-example gradients of padded examples differ from theirs alone by up to "
                    f"{float(diff.max()):.3g} (norm {float(size.max()):.3g})")
        return None

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
                self._verify_method(module, params, inputs)
        if self.method == "hooks":
            try:
                return hooks_per_sample_grads(self._grad_sample_module, params, inputs, *args,
                                              low_precision=self.low_precision)
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
