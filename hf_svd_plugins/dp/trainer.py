"""Trainer adapter for DP-SGD: :class:`DPMixin` makes any ``transformers.Trainer`` subclass differentially private.

How it plugs into the Trainer's loop (transformers 5.x):

- ``get_train_dataloader``: Poisson-sampled logical batches (:class:`~.sampling.PoissonBatchSampler`), split into
  ``gradient_accumulation_steps`` micro-batches and, under DDP, into one share per rank. The expected logical batch is
  ``per_device_train_batch_size * gradient_accumulation_steps * world_size``.
- ``training_step``: per-example gradients of the trainable parameters (``vmap``/``hooks``/``loop``), each clipped to
  ``C``, summed into float32 accumulators. No ``loss.backward()``; HF's ``num_items_in_batch`` is ignored, each
  example's loss is the mean over its own valid targets.
- Right before the optimizer step (``_get_grad_norm``, with a ``on_pre_optimizer_step`` callback as a fallback):
  accumulators are summed over ranks, Gaussian noise ``N(0, sigma^2 C^2)`` is added once (the same noise on every rank,
  from a generator seeded identically), the result is divided by the expected batch size and written to ``.grad``.
  The accountant records the step. The logged ``grad_norm`` is that of the released (noised) gradient.
- DeepSpeed ZeRO-1/2: DeepSpeed steps inside ``accelerator.backward`` of the last micro-batch, so the release happens
  in ``training_step`` there, via a surrogate loss ``sum_p <p, g_p>`` (ZeRO-3 and FSDP are refused).
- ``log``: adds ``epsilon`` to every log (training logs and final metrics).
- ``_save_checkpoint`` / ``train(resume_from_checkpoint=...)``: ``dp_state.pt`` in every checkpoint holds the
  accountant history, the noise generator state, sigma, q and the sampler seed; resuming restores them.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import warnings
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_svd_plugins.distributed import all_reduce_sum_, broadcast_int
from hf_svd_plugins.dp.accounting import PrivacyAccountant, calibrate_noise_multiplier
from hf_svd_plugins.dp.clipping import clip_and_sum, privatize
from hf_svd_plugins.dp.config import DPConfig
from hf_svd_plugins.dp.per_sample import (
    detect_mask_kind,
    hooks_per_sample_grads,
    loop_per_sample_grads,
    trainable_parameters,
    unsupported_for_hooks,
    vmap_per_sample_grads,
)
from hf_svd_plugins.dp.sampling import EmptySafeCollator, PoissonBatchSampler, PoissonDataLoader, is_empty_batch
from hf_svd_plugins.lora import unwrap_model

logger = logging.getLogger(__name__)

DP_STATE_NAME = "dp_state.pt"
_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")


class _DPCallback(TrainerCallback):
    """Budget check at every step start and noise injection before the optimizer step (fallback hook)."""

    def __init__(self, trainer: DPMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._dp_on_train_begin()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._dp_release_hooks()

    def on_step_begin(self, args, state, control, **kwargs):
        t = self.trainer
        if t._dp_steps_left is not None and t._dp_steps_left <= 0:
            t._dp_stop_for_budget(control)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._dp_finalize_step()


class DPMixin:
    """Mix into any ``transformers.Trainer`` subclass (first in the bases) to train with DP-SGD.

    ``class MyDPTrainer(DPMixin, MyTrainer)``; construct with ``dp_config=DPConfig(...)`` plus the usual Trainer
    arguments. After training, :meth:`get_epsilon` is the privacy spent at the configured delta.

    Attributes (after construction):
        dp_config: the :class:`DPConfig`.
        noise_multiplier: sigma in use (given or calibrated).
        sample_rate: q = expected batch / N.
        target_delta: delta in use.
        expected_batch_size: ``per_device_train_batch_size * gradient_accumulation_steps * world_size``.
        accountant: the :class:`~.accounting.PrivacyAccountant` (its history survives checkpoints).
    """

    def __init__(self, *args: Any, dp_config: DPConfig | None = None, **kwargs: Any) -> None:
        if dp_config is None:
            raise ValueError(
                "dp_config is required, e.g. DPTrainer(..., dp_config=DPConfig(max_grad_norm=1.0, target_epsilon=8.0))"
            )
        if not isinstance(dp_config, DPConfig):
            raise TypeError(f"dp_config must be a DPConfig, got {type(dp_config).__name__}")
        dp_config.validate()
        self.dp_config = dp_config
        super().__init__(*args, **kwargs)
        self._dp_setup()

    # ------------------------------------------------------------------------------------------------------ setup

    def _dp_setup(self) -> None:
        cfg, args = self.dp_config, self.args
        if getattr(args, "fp16", False):
            raise ValueError(
                "fp16=True is not supported under DP: loss scaling would scale per-example gradients before clipping; "
                "use bf16=True or float32"
            )
        if self.is_fsdp_enabled:
            raise ValueError(
                "DPTrainer does not support FSDP (sharded parameters): run with DDP (`accelerate launch --multi_gpu`), "
                "DeepSpeed ZeRO-1/2, or a single process"
            )
        if self.is_deepspeed_enabled:
            plugin = self.accelerator.state.deepspeed_plugin
            if plugin.zero_stage == 3:
                raise ValueError(
                    "DPTrainer does not support DeepSpeed ZeRO-3: per-example gradients need the full weights on "
                    "every rank; use ZeRO-2 (or ZeRO-1, or DDP)"
                )
            if cfg.per_sample_method == "hooks":
                raise ValueError(
                    "per_sample_method='hooks' does not work under DeepSpeed (its backward would trigger DeepSpeed's "
                    "gradient reduction hooks); use 'vmap' or 'loop'"
                )
            ds_clip = plugin.deepspeed_config.get("gradient_clipping", 0)
            if ds_clip not in (0, 0.0, "auto", None):
                warnings.warn(f"DeepSpeed gradient_clipping={ds_clip} is disabled under DP", UserWarning, stacklevel=3)
            plugin.deepspeed_config["gradient_clipping"] = 0.0
        if self.compute_loss_func is not None:
            raise ValueError(
                "compute_loss_func is not supported by DPTrainer: the per-example loss is set by DPConfig.loss_type"
            )
        if args.max_grad_norm and args.max_grad_norm > 0:
            warnings.warn(
                f"TrainingArguments.max_grad_norm={args.max_grad_norm} is disabled under DP (batch-level clipping after "
                "the noise would break the guarantee); per-example clipping uses DPConfig.max_grad_norm="
                f"{cfg.max_grad_norm}",
                UserWarning,
                stacklevel=3,
            )
            args.max_grad_norm = 0.0
        model = unwrap_model(self.model)
        params = trainable_parameters(model)
        if not params:
            raise ValueError(
                "the model has no trainable parameters; add a LoRA adapter (peft.get_peft_model) or unfreeze some"
            )
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
                raise ValueError(
                    f"module {name} ({type(module).__name__}) mixes examples through batch statistics, which breaks "
                    "per-example privacy; replace it with GroupNorm/LayerNorm or put it in eval mode"
                )
        self._dp_checkpointing = bool(
            getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
            or getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False))
        )
        if self._dp_checkpointing and cfg.per_sample_method in ("vmap", "hooks"):
            raise ValueError(
                f"per_sample_method={cfg.per_sample_method!r} is not exact with activation (gradient) checkpointing: "
                "the forward recomputed inside backward breaks Opacus hooks and torch.func; set "
                "activation_checkpointing=False (and gradient_checkpointing=False) or per_sample_method='loop'"
            )
        if cfg.per_sample_method == "hooks":
            bad = unsupported_for_hooks(model)
            if bad:
                raise ValueError(
                    f"per_sample_method='hooks': Opacus has no grad sampler for trainable layers {bad[:5]}; "
                    "use per_sample_method='vmap' or 'loop'"
                )
        self._dp_param_names = list(params)
        ds = self.train_dataset
        if ds is None or not hasattr(ds, "__len__") or isinstance(ds, torch.utils.data.IterableDataset):
            raise ValueError(
                "DPTrainer needs a map-style train_dataset with len() (Poisson sampling and accounting need N)"
            )
        n = len(ds)
        self.target_delta = cfg.resolve_delta(n)
        world = max(1, args.world_size)
        self.expected_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        if self.expected_batch_size > n:
            raise ValueError(
                f"expected batch per optimizer step ({self.expected_batch_size} = per_device_train_batch_size x "
                f"gradient_accumulation_steps x world_size) exceeds the {n} training examples; lower the batch size"
            )
        self.num_train_examples = n
        self.sample_rate = self.expected_batch_size / n
        self.dp_steps_per_epoch = max(1, n // self.expected_batch_size)
        self.planned_steps = self._dp_planned_steps()
        if cfg.noise_multiplier is not None:
            self.noise_multiplier = float(cfg.noise_multiplier)
        else:
            self.noise_multiplier = calibrate_noise_multiplier(
                cfg.target_epsilon, self.target_delta, self.sample_rate, self.planned_steps, cfg.accountant,
                cfg.epsilon_tolerance, cfg.eps_error,
            )
        self.accountant = PrivacyAccountant(cfg.accountant, cfg.eps_error)
        limit = cfg.epsilon_limit
        if limit is not None and cfg.noise_multiplier is not None:
            planned = self.accountant.epsilon_after(
                self.target_delta, self.noise_multiplier, self.sample_rate, self.planned_steps
            )
            if planned > limit:
                raise ValueError(
                    f"the planned {self.planned_steps} steps at noise_multiplier={self.noise_multiplier} and "
                    f"sample_rate={self.sample_rate:.4g} spend epsilon={planned:.3f} > max_epsilon={limit}; raise "
                    "noise_multiplier, train fewer steps, or give target_epsilon instead to calibrate sigma"
                )
        seed = cfg.noise_seed if cfg.noise_seed is not None else secrets.randbits(62)
        # every rank adds the same noise to the same all-reduced sum: noise is added once
        seed = broadcast_int(seed, src=0)
        self._dp_noise_generator = torch.Generator().manual_seed(seed)
        self._dp_sampler_seed = cfg.sampler_seed if cfg.sampler_seed is not None else args.seed
        self._dp_acc: list[torch.Tensor] | None = None
        self._dp_pending = False
        self._dp_last_finalized_step = -1
        self._dp_steps_left: int | None = None
        self._dp_method: str | None = None
        self._dp_mask_kind: str | None = None
        self._dp_loss_type: str | None = None
        self._dp_problem_type: str | None = None
        self._dp_undecided = False
        self.dp_method_used: str | None = None
        self._dp_grad_sample_module = None
        self.callback_handler.callbacks.insert(0, _DPCallback(self))
        logger.info(
            "DP-SGD: C=%s sigma=%.4f q=%.5g delta=%.3g expected batch=%d planned steps=%d accountant=%s",
            cfg.max_grad_norm, self.noise_multiplier, self.sample_rate, self.target_delta, self.expected_batch_size,
            self.planned_steps, cfg.accountant,
        )

    def _dp_planned_steps(self) -> int:
        args = self.args
        if self.dp_config.total_steps is not None:
            return int(self.dp_config.total_steps)
        if args.max_steps and args.max_steps > 0:
            return int(args.max_steps)
        if self.dp_config.poisson_sampling:
            per_epoch = self.dp_steps_per_epoch
        else:
            micro = math.ceil(self.num_train_examples / (args.per_device_train_batch_size * max(1, args.world_size)))
            per_epoch = max(1, micro // args.gradient_accumulation_steps)
        return max(1, math.ceil(args.num_train_epochs * per_epoch))

    # ---------------------------------------------------------------------------------------------------- public

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far (all steps, including those before a resume) at ``delta`` (default: the config's)."""
        return self.accountant.get_epsilon(self.target_delta if delta is None else delta)

    # ------------------------------------------------------------------------------------------------------ data

    def get_train_dataloader(self):
        if not self.dp_config.poisson_sampling:
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset, collator = self.train_dataset, self.data_collator
        try:
            import datasets

            is_hf = isinstance(dataset, datasets.Dataset)
        except ImportError:  # pragma: no cover
            is_hf = False
        if is_hf:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        args = self.args
        sampler = PoissonBatchSampler(
            num_examples=len(dataset),
            sample_rate=self.sample_rate,
            steps_per_epoch=self.dp_steps_per_epoch,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            world_size=max(1, args.world_size),
            rank=args.process_index,
            seed=self._dp_sampler_seed,
        )
        return PoissonDataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=EmptySafeCollator(collator),
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
        )

    # ---------------------------------------------------------------------------------------------- per-example

    def _dp_resolve(self, module: nn.Module, inputs: dict) -> None:
        """Pick the loss type and the per-sample method on the first non-empty batch."""
        cfg = self.dp_config
        if any(k in inputs for k in _PACKED_KEYS):
            raise ValueError(
                "packed / padding-free batches put several examples in one row, which breaks per-example privacy; "
                "disable packing and padding_free"
            )
        self._dp_problem_type = getattr(getattr(module, "config", None), "problem_type", None)
        if cfg.loss_type != "auto":
            self._dp_loss_type = cfg.loss_type
        elif "shift_labels" in inputs:
            self._dp_loss_type = "token"
        else:
            labels = inputs.get("labels")
            if labels is None:
                raise ValueError("the batches have no `labels`; DP training needs them to compute per-example losses")
            if labels.dim() == 1 or labels.dtype.is_floating_point:
                self._dp_loss_type = "sequence"
            else:
                self._dp_loss_type = "causal_lm" if _is_causal_lm(module) else "token"
        method = cfg.per_sample_method
        if method == "auto" and self._dp_checkpointing:
            warnings.warn(
                "DP: activation checkpointing is on, so only per_sample_method='loop' is exact (slow); set "
                "activation_checkpointing=False for the fast vmap/hooks methods", UserWarning, stacklevel=2,
            )
            method = "loop"
        if method in ("auto", "vmap"):
            kind = detect_mask_kind(module, inputs)
            if kind == "ambiguous":  # e.g. only length-1 sequences: exact loop for this batch, decide on the next one
                self._dp_method = "loop"
                self._dp_undecided = True
                return
            self._dp_undecided = False
            if kind is None:
                if method == "vmap":
                    raise ValueError(
                        "per_sample_method='vmap': could not verify how this model applies attention_mask to a 4D "
                        "mask (neither causal nor bidirectional reproduces its outputs); use per_sample_method='loop'"
                    )
            else:
                self._dp_mask_kind = kind
        if method == "auto":
            # vmap when verified (deterministic choice, so runs with fixed seeds are reproducible), else hooks
            method = "vmap" if self._dp_mask_kind is not None else self._dp_fallback_method(module)
        if method == "hooks" and self._dp_grad_sample_module is None:
            from opacus import GradSampleModule

            self._dp_grad_sample_module = GradSampleModule(module, batch_first=True, loss_reduction="sum")
        self._dp_method = method
        self.dp_method_used = method
        logger.info("DP: per-sample method %s, loss type %s", method, self._dp_loss_type)

    def _dp_fallback_method(self, module: nn.Module) -> str:
        """``hooks`` if Opacus supports every trainable layer (and no DeepSpeed), else ``loop``."""
        if not self.is_deepspeed_enabled and not unsupported_for_hooks(module):
            return "hooks"
        warnings.warn("DP: neither vmap nor Opacus hooks is exact for this model; using per_sample_method='loop'",
                      UserWarning, stacklevel=3)
        return "loop"

    def _dp_release_hooks(self) -> None:
        """Remove Opacus hooks from the user's model (re-created on the next train())."""
        if self._dp_grad_sample_module is not None:
            self._dp_grad_sample_module._close()
            self._dp_grad_sample_module = None
        self._dp_method = None
        self._dp_param_cache = None

    def _dp_params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The privatised parameters ``{name: param}`` (looked up once per ``train()``)."""
        cached = getattr(self, "_dp_param_cache", None)
        if cached is None or cached[0] is not module:
            wanted = set(self._dp_param_names)
            cached = (module, {n: p for n, p in module.named_parameters() if n in wanted})
            self._dp_param_cache = cached
        return cached[1]

    def _dp_per_sample(self, module: nn.Module, params: dict, inputs: dict) -> tuple[dict, torch.Tensor]:
        ls = float(getattr(self.args, "label_smoothing_factor", 0.0) or 0.0)
        if self._dp_method == "vmap":
            try:
                return vmap_per_sample_grads(module, params, inputs, self._dp_loss_type, self._dp_mask_kind, ls,
                                             self._dp_problem_type)
            except RuntimeError as exc:  # e.g. a forward hook calling requires_grad_ inside torch.func
                if self.dp_config.per_sample_method != "auto":
                    raise
                self._dp_method = self.dp_method_used = self._dp_fallback_method(module)
                warnings.warn(f"DP: vmap failed ({str(exc)[:200]}); using per_sample_method={self._dp_method!r}",
                              UserWarning, stacklevel=2)
                if self._dp_method == "hooks":
                    from opacus import GradSampleModule

                    self._dp_grad_sample_module = GradSampleModule(module, batch_first=True, loss_reduction="sum")
        if self._dp_method == "hooks":
            return hooks_per_sample_grads(self._dp_grad_sample_module, params, inputs, self._dp_loss_type, ls,
                                          self._dp_problem_type)
        return loop_per_sample_grads(module, params, inputs, self._dp_loss_type, ls, self._dp_problem_type)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Add this micro-batch's clipped per-example gradient sum to the step's accumulators.

        Returns the micro-batch's summed per-example loss divided by the expected per-rank batch
        (``per_device_train_batch_size * gradient_accumulation_steps``), so the Trainer's logged loss is the mean
        per-example loss of the logical batch. ``num_items_in_batch`` is ignored on purpose.
        """
        loss = self._dp_accumulate(model, inputs)
        if self.is_deepspeed_enabled and self.accelerator.sync_gradients:
            self._dp_deepspeed_release()
        return loss

    def _dp_accumulate(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        device = self.args.device
        if is_empty_batch(inputs) or (self._dp_steps_left is not None and self._dp_steps_left <= 0):
            return torch.zeros((), device=device)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        module = unwrap_model(self.model)
        params = self._dp_params(module)
        if self._dp_method is None or self._dp_undecided:
            self._dp_resolve(module, inputs)
        targets = inputs.get("shift_labels", inputs.get("labels"))
        batch = int(targets.shape[0])
        chunk = self.dp_config.max_physical_batch_size or batch
        if self._dp_acc is None:
            self._dp_acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params.values()]
        total_loss = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, batch, chunk):
            sub = {k: (v[start : start + chunk] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v)
                   for k, v in inputs.items()}
            grads, losses = self._dp_per_sample(module, params, sub)
            sums, _ = clip_and_sum([grads[n] for n in params], self.dp_config.max_grad_norm)
            for acc, s in zip(self._dp_acc, sums, strict=True):
                acc.add_(s.to(acc.dtype))
            total_loss += losses.detach().float().sum().to(device)
        self._dp_pending = True
        per_rank = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        return total_loss / per_rank

    def _dp_deepspeed_release(self) -> None:
        """DeepSpeed steps inside ``accelerator.backward`` of the last micro-batch: release the private gradient
        there, through a surrogate loss ``sum_p <p, g_p>`` whose gradient is exactly ``g`` (identical on every rank,
        so DeepSpeed's data-parallel averaging keeps it unchanged)."""
        params = list(self._dp_params(unwrap_model(self.model)).values())
        released = self._dp_release_gradient(params)
        if released is None:
            return  # budget exhausted: no backward, so DeepSpeed takes no step
        surrogate = sum((p * g.to(dtype=p.dtype, device=p.device)).sum() for p, g in zip(params, released, strict=True))
        self.accelerator.backward(surrogate, scale_wrt_gas=False)

    # -------------------------------------------------------------------------------------------- optimizer step

    def _get_grad_norm(self, model, grad_norm=None):
        # Called by the Trainer right before the optimizer step: privatise first, so that what is measured (and
        # logged as grad_norm) is the released, noised gradient.
        self._dp_finalize_step()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    @torch.no_grad()
    def _dp_finalize_step(self) -> None:
        """DDP / single process: release the private gradient into ``.grad`` right before the optimizer step."""
        if self.is_deepspeed_enabled:
            return  # released inside the last micro-batch's backward (see _dp_deepspeed_release)
        params = list(self._dp_params(unwrap_model(self.model)).values())
        if self._dp_last_finalized_step == self.state.global_step:
            return
        released = self._dp_release_gradient(params)
        if released is None:
            for p in params:  # no update at all: optimizers skip parameters without a gradient
                p.grad = None
            return
        for p, g in zip(params, released, strict=True):
            p.grad = g.to(dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def _dp_release_gradient(self, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
        """Sum the accumulators over ranks, add noise once, divide by the expected batch; record the step.

        Returns None (and stops training) when the step would exceed the hard budget.
        """
        self._dp_last_finalized_step = self.state.global_step
        acc = self._dp_acc or [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        self._dp_acc = None
        self._dp_pending = False
        if self._dp_steps_left is not None and self._dp_steps_left <= 0:
            self._dp_stop_for_budget(self.control)
            return None
        all_reduce_sum_(acc)
        released = privatize(acc, self.noise_multiplier, self.dp_config.max_grad_norm, self.expected_batch_size,
                             self._dp_noise_generator)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        if self._dp_steps_left is not None:
            self._dp_steps_left -= 1
        return released

    def _dp_stop_for_budget(self, control) -> None:
        if not control.should_training_stop:
            logger.warning(
                "DP: stopping at step %d: one more step would exceed max_epsilon=%s (epsilon so far %.4f at delta=%.3g)",
                self.state.global_step, self.dp_config.epsilon_limit, self.get_epsilon(), self.target_delta,
            )
        control.should_training_stop = True

    def _dp_on_train_begin(self) -> None:
        self._dp_acc = None
        self._dp_last_finalized_step = -1
        limit = self.dp_config.epsilon_limit
        if limit is None:
            self._dp_steps_left = None
            return
        remaining = max(0, self.state.max_steps - self.state.global_step)
        # A small slack for the calibration tolerance: sigma was chosen so the full plan meets target_epsilon.
        self._dp_steps_left = self.accountant.max_extra_steps(
            limit * (1 + 1e-9), self.target_delta, self.noise_multiplier, self.sample_rate, upper=remaining
        )
        if self._dp_steps_left < remaining:
            logger.warning(
                "DP: only %d of the %d remaining steps fit in max_epsilon=%s; training will stop early",
                self._dp_steps_left, remaining, limit,
            )

    # ------------------------------------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if getattr(self, "accountant", None) is not None and self.accountant.steps > 0:
            logs["epsilon"] = self.get_epsilon()
        super().log(logs, start_time)

    # -------------------------------------------------------------------------------------------- checkpoints

    def dp_state_dict(self) -> dict:
        """Everything DP needs to resume: accountant history, noise RNG, sigma, q, delta, sampler seed."""
        return {
            "version": 1,
            "accountant": self.accountant.state_dict(),
            "noise_generator": self._dp_noise_generator.get_state(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "target_delta": self.target_delta,
            "max_grad_norm": self.dp_config.max_grad_norm,
            "expected_batch_size": self.expected_batch_size,
            "sampler_seed": self._dp_sampler_seed,
            "global_step": self.state.global_step,
            "config": self.dp_config.to_dict(),
        }

    def load_dp_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self._dp_noise_generator.set_state(state["noise_generator"])
        self._dp_sampler_seed = state["sampler_seed"]
        if state["sample_rate"] != self.sample_rate or state["noise_multiplier"] != self.noise_multiplier:
            if self.dp_config.target_epsilon is not None:
                # sigma was calibrated for the original plan; keep it so the plan's guarantee still holds
                self.noise_multiplier = float(state["noise_multiplier"])
            warnings.warn(
                f"DP: resuming with sample_rate={self.sample_rate:.4g}, sigma={self.noise_multiplier:.4g} (checkpoint: "
                f"{state['sample_rate']:.4g}, {state['noise_multiplier']:.4g}); the accountant composes both",
                UserWarning,
                stacklevel=2,
            )

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            out = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(out, exist_ok=True)
            torch.save(self.dp_state_dict(), os.path.join(out, DP_STATE_NAME))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            path = os.path.join(checkpoint, DP_STATE_NAME)
            if not os.path.isfile(path):
                raise ValueError(
                    f"resume_from_checkpoint={checkpoint!r} has no {DP_STATE_NAME}: it was not written by a DP trainer, "
                    "and resuming from it would forget the privacy already spent"
                )
            self.load_dp_state_dict(torch.load(path, weights_only=False))
        return super().train(resume_from_checkpoint, *args, **kwargs)


def _is_causal_lm(module: nn.Module) -> bool:
    """Same rule as ``Trainer.compute_loss``: the (PEFT-unwrapped) model class is a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class DPTrainer(DPMixin, Trainer):
    """``transformers.Trainer`` with DP-SGD. ``DPTrainer(model=..., args=..., train_dataset=..., dp_config=...)``."""


_DP_SFT_TRAINER: type | None = None


def get_dp_sft_trainer_class() -> type:
    """``DPSFTTrainer(DPMixin, trl.SFTTrainer)``, built on first use so that importing this module does not import TRL."""
    global _DP_SFT_TRAINER
    if _DP_SFT_TRAINER is None:
        from trl import SFTTrainer

        class DPSFTTrainer(DPMixin, SFTTrainer):
            """TRL ``SFTTrainer`` with DP-SGD. Packing and padding-free batches are refused (they mix examples)."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                sft_args = kwargs.get("args")
                if sft_args is not None and (getattr(sft_args, "packing", False)
                                             or getattr(sft_args, "padding_free", False)):
                    raise ValueError(
                        "SFTConfig(packing=True / padding_free=True) puts several examples in one row, which breaks "
                        "per-example privacy; set packing=False and padding_free=False"
                    )
                super().__init__(*args, **kwargs)

        DPSFTTrainer.__module__ = __name__
        _DP_SFT_TRAINER = DPSFTTrainer
    return _DP_SFT_TRAINER


def __getattr__(name: str):
    if name == "DPSFTTrainer":
        return get_dp_sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
