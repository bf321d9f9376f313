"""Trainer adapter for DP-SGD: :class:`DPMixin` makes any ``transformers.Trainer`` subclass differentially private.

How it plugs into the Trainer's loop (transformers 5.x):

- ``__init__``: refusals (:mod:`.checks`), noise calibration, secret seeds (:mod:`.seeds`). The user's
  ``TrainingArguments`` and ``DPConfig`` are copied, never modified.
- ``get_train_dataloader``: Poisson-sampled logical batches (:class:`~.sampling.PoissonBatchSampler`), split into
  ``gradient_accumulation_steps`` micro-batches and, under DDP, into one share per rank. The expected logical batch is
  ``per_device_train_batch_size * gradient_accumulation_steps * world_size``.
- ``training_step``: per-example gradients of the trainable parameters (:class:`~.engine.PerExampleGradients`), each
  clipped to ``C``, summed into float32 accumulators (:class:`~.release.NoisyRelease`). No ``loss.backward()``; HF's
  ``num_items_in_batch`` is not computed (each example's loss is the mean over its own valid targets).
- Right before the optimizer step (``_get_grad_norm``, with a ``on_pre_optimizer_step`` callback as a fallback):
  the optimizer must hold exactly the privatised parameters; accumulators are summed over ranks, Gaussian noise
  ``N(0, sigma^2 C^2)`` is added once, the result is divided by the expected batch size and written to ``.grad``.
  The accountant records the step. The logged ``grad_norm`` is that of the released (noised) gradient.
- DeepSpeed ZeRO-1/2: DeepSpeed steps inside ``accelerator.backward`` of the last micro-batch, so the release happens
  in ``training_step`` there, via a surrogate loss ``sum_p <p, g_p>`` (ZeRO-3 and FSDP are refused).
- ``log``: adds ``epsilon`` to every log (training logs and final metrics).
- ``_save_checkpoint`` / ``train(resume_from_checkpoint=...)``: the private DP state (accountant history, noise
  generator, sampler seed) is kept next to each checkpoint, never inside it (:mod:`.checkpoint`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_svd_plugins.distributed import world_size
from hf_svd_plugins.dp.accounting import PrivacyAccountant, calibrate_noise_multiplier
from hf_svd_plugins.dp.checkpoint import (
    LEGACY_STATE_NAME,
    STATE_VERSION,
    prune_private_states,
    read_private_state,
    refuse_noise_replay,
    warn_if_checkpoints_pushed,
    write_private_state,
)
from hf_svd_plugins.dp.checks import (
    check_buffers_unchanged,
    check_callbacks,
    check_dataset,
    check_no_batch_statistics,
    check_only_private_parameters,
    check_per_sample_method,
    check_trainer_features,
    saved_float_buffers,
)
from hf_svd_plugins.dp.clipping import clip_and_sum
from hf_svd_plugins.dp.config import DPConfig
from hf_svd_plugins.dp.engine import PerExampleGradients
from hf_svd_plugins.dp.per_sample import trainable_parameters
from hf_svd_plugins.dp.plan import planned_steps, steps_per_epoch, warn_shuffled_batches
from hf_svd_plugins.dp.release import NoisyRelease
from hf_svd_plugins.dp.sampling import is_empty_batch, poisson_dataloader
from hf_svd_plugins.dp.seeds import derived_seed, secret_seed, shared_seed
from hf_svd_plugins.lora import unwrap_model

logger = logging.getLogger(__name__)

#: kept for code that looked for the state inside checkpoint folders (versions < 2)
DP_STATE_NAME = LEGACY_STATE_NAME


class _DPCallback(TrainerCallback):
    """Checks at train begin, budget check at every step start, noise injection before the optimizer step."""

    def __init__(self, trainer: DPMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.trainer._dp_on_train_begin(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._dp_engine.release_hooks()

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
        dp_config: a copy of the :class:`DPConfig`.
        noise_multiplier: sigma in use (given or calibrated).
        sample_rate: q = expected batch / N.
        target_delta: delta in use.
        expected_batch_size: ``per_device_train_batch_size * gradient_accumulation_steps * world_size``.
        accountant: the :class:`~.accounting.PrivacyAccountant` (its history survives checkpoints).
        dp_method_used, dp_loss_type: the per-example method and loss type chosen on the first batch.
    """

    def __init__(self, *args: Any, dp_config: DPConfig | None = None, **kwargs: Any) -> None:
        if dp_config is None:
            raise ValueError(
                "dp_config is required, e.g. DPTrainer(..., dp_config=DPConfig(max_grad_norm=1.0, target_epsilon=8.0))"
            )
        if not isinstance(dp_config, DPConfig):
            raise TypeError(f"dp_config must be a DPConfig, got {type(dp_config).__name__}")
        self.dp_config = dataclasses.replace(dp_config)  # validated copy: later edits of the user's object do nothing
        super().__init__(*args, **kwargs)
        self.args = copy.copy(self.args)  # DP changes max_grad_norm; the user's TrainingArguments stay as given
        self._dp_setup()

    # ------------------------------------------------------------------------------------------------------ setup

    def _dp_setup(self) -> None:
        cfg, args = self.dp_config, self.args
        check_trainer_features(self, cfg)
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
        check_no_batch_statistics(model)
        checkpointing = bool(
            getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
            or getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False))
        )
        check_per_sample_method(model, cfg, checkpointing)
        check_callbacks(self.callback_handler.callbacks)
        warn_if_checkpoints_pushed(args)
        self._dp_param_names = list(params)
        self._dp_param_cache: tuple[nn.Module, dict[str, nn.Parameter]] | None = None
        n = check_dataset(self.train_dataset)
        self.num_train_examples = n
        self.target_delta = cfg.resolve_delta(n)
        self.expected_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(
            1, args.world_size
        )
        if self.expected_batch_size > n:
            raise ValueError(
                f"expected batch per optimizer step ({self.expected_batch_size} = per_device_train_batch_size x "
                f"gradient_accumulation_steps x world_size) exceeds the {n} training examples; lower the batch size"
            )
        self.sample_rate = self.expected_batch_size / n
        self.dp_steps_per_epoch = steps_per_epoch(args, cfg, n, self.expected_batch_size)
        self.planned_steps = planned_steps(args, cfg, self.dp_steps_per_epoch)
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
        if not cfg.poisson_sampling:
            warn_shuffled_batches(cfg, self.noise_multiplier, self.planned_steps, self.dp_steps_per_epoch,
                                  self.target_delta)
        # every rank adds the same noise to the same all-reduced sum, and takes its share of the same Poisson sample
        self._dp_release = NoisyRelease(self.noise_multiplier, cfg.max_grad_norm, self.expected_batch_size,
                                        shared_seed(cfg.noise_seed, "noise_seed"))
        self._dp_lineage = secret_seed()  # identifies this noise stream among the run's saved states
        self._dp_noise_draws = 0
        self._dp_sampler_seed = shared_seed(cfg.sampler_seed, "sampler_seed")
        self._dp_train_calls = 0
        self._dp_engine = PerExampleGradients(cfg, checkpointing, self.is_deepspeed_enabled,
                                              getattr(args, "label_smoothing_factor", 0.0),
                                              low_precision=bool(getattr(args, "bf16", False)))
        self._dp_method_used: str | None = None
        self._dp_buffers: dict[str, torch.Tensor] = {}
        self._dp_last_finalized_step = -1
        self._dp_steps_left: int | None = None
        self.callback_handler.callbacks.insert(0, _DPCallback(self))
        logger.info(
            "DP-SGD: C=%s sigma=%.4f q=%.5g delta=%.3g expected batch=%d planned steps=%d accountant=%s",
            cfg.max_grad_norm, self.noise_multiplier, self.sample_rate, self.target_delta, self.expected_batch_size,
            self.planned_steps, cfg.accountant,
        )

    # ---------------------------------------------------------------------------------------------------- public

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far (all steps, including those before a resume) at ``delta`` (default: the config's)."""
        return self.accountant.get_epsilon(self.target_delta if delta is None else delta)

    @property
    def dp_method_used(self) -> str | None:
        """The per-example method of the last batch: ``vmap``, ``hooks`` or ``loop``."""
        return self._dp_method_used

    @property
    def dp_loss_type(self) -> str | None:
        """The per-example loss type: ``causal_lm``, ``token`` or ``sequence`` (None before the first batch)."""
        return self._dp_engine.loss_type

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
        return poisson_dataloader(dataset, collator, self.sample_rate, self.dp_steps_per_epoch, self.args,
                                  self._dp_sampler_seed)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> None:
        # DP normalises every example by its own targets and ignores num_items_in_batch. Not computing it also
        # avoids a KeyError on empty Poisson micro-batches and a gather that a rank with an empty share would skip.
        return None

    def _track_num_input_tokens(self, inputs):
        if is_empty_batch(inputs):  # count 0, but still join the gather the other ranks run
            name = getattr(self.model, "main_input_name", "input_ids")
            empty = torch.zeros((0,), dtype=torch.long, device=self.args.device)
            inputs = {name: empty, "attention_mask": empty}
        return super()._track_num_input_tokens(inputs)

    # ---------------------------------------------------------------------------------------------- per-example

    def _dp_params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The privatised parameters ``{name: param}`` (fixed at construction; looked up once per module)."""
        if self._dp_param_cache is None or self._dp_param_cache[0] is not module:
            wanted = set(self._dp_param_names)
            self._dp_param_cache = (module, {n: p for n, p in module.named_parameters() if n in wanted})
        return self._dp_param_cache[1]

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

    def _dp_guarded(self, fn, *args: Any) -> Any:
        """Run ``fn``; in a distributed run, a failure is recorded and raised on every rank at the step instead of
        leaving the other ranks waiting in the all-reduce."""
        if world_size() <= 1:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank by NoisyRelease.release
            logger.error("DP: this rank failed; stopping all ranks at the step: %r", exc)
            self._dp_release.record_failure(exc)
            return None

    def _dp_accumulate(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        device = self.args.device
        if (is_empty_batch(inputs) or (self._dp_steps_left is not None and self._dp_steps_left <= 0)
                or self._dp_release.failure is not None):
            return torch.zeros((), device=device)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        loss = self._dp_guarded(self._dp_clip_and_add, self._prepare_inputs(inputs))
        if loss is None:
            return torch.zeros((), device=device)
        per_rank = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        return loss / per_rank

    def _dp_clip_and_add(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Per-example gradients of one micro-batch, clipped and added to the accumulators; returns the summed loss."""
        module = unwrap_model(self.model)
        params = self._dp_params(module)
        engine = self._dp_engine
        inputs = engine.prepare(module, params, inputs)
        targets = inputs.get("shift_labels", inputs.get("labels"))
        batch = int(targets.shape[0])
        chunk = self.dp_config.max_physical_batch_size or batch
        total_loss = torch.zeros((), dtype=torch.float32, device=self.args.device)
        for start in range(0, batch, chunk):
            sub = {k: (v[start : start + chunk] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v)
                   for k, v in inputs.items()}
            grads, losses = engine.compute(module, params, sub)
            sums, _ = clip_and_sum([grads[n] for n in params], self.dp_config.max_grad_norm)
            self._dp_release.add(sums)
            total_loss += losses.detach().float().sum().to(self.args.device)
        self._dp_method_used = engine.method
        return total_loss

    def _dp_deepspeed_release(self) -> None:
        """DeepSpeed steps inside ``accelerator.backward`` of the last micro-batch: release the private gradient
        there, through a surrogate loss ``sum_p <p, g_p>`` whose gradient is exactly ``g`` (identical on every rank,
        so DeepSpeed's data-parallel averaging keeps it unchanged)."""
        module = unwrap_model(self.model)
        private = self._dp_params(module)
        self._dp_guarded(check_only_private_parameters, module, private, self.optimizer, True)
        self._dp_guarded(check_buffers_unchanged, module, self._dp_buffers)
        params = list(private.values())
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
        if self._dp_last_finalized_step == self.state.global_step:
            return
        module = unwrap_model(self.model)
        private = self._dp_params(module)
        self._dp_guarded(check_only_private_parameters, module, private, self.optimizer)
        self._dp_guarded(check_buffers_unchanged, module, self._dp_buffers)
        params = list(private.values())
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
        if self._dp_steps_left is not None and self._dp_steps_left <= 0:
            self._dp_release.discard()
            if self._dp_release.failure is not None:  # no rank runs a collective here: raise locally
                raise self._dp_release.failure
            self._dp_stop_for_budget(self.control)
            return None
        released = self._dp_release.release(params)
        self._dp_noise_draws += 1
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

    def _dp_on_train_begin(self, optimizer) -> None:
        check_callbacks(self.callback_handler.callbacks)  # also those added after construction
        self._dp_release.discard()
        self._dp_last_finalized_step = -1
        module = unwrap_model(self.model)
        check_only_private_parameters(module, self._dp_params(module), optimizer, self.is_deepspeed_enabled)
        self._dp_buffers = saved_float_buffers(module)
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
        """Everything DP needs to resume: accountant history, noise RNG, sampler seed (secret), sigma, q, delta."""
        return {
            "version": STATE_VERSION,
            "lineage": self._dp_lineage,
            "noise_draws": self._dp_noise_draws,
            "accountant": self.accountant.state_dict(),
            "noise_generator": self._dp_release.generator.get_state(),
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
        self._dp_release.generator.set_state(state["noise_generator"])
        self._dp_sampler_seed = int(state["sampler_seed"])
        self._dp_lineage = state.get("lineage", self._dp_lineage)
        self._dp_noise_draws = int(state.get("noise_draws", self.accountant.steps))
        if state["sample_rate"] != self.sample_rate or state["noise_multiplier"] != self.noise_multiplier:
            if self.dp_config.target_epsilon is not None:
                # sigma was calibrated for the original plan; keep it so the plan's guarantee still holds
                self.noise_multiplier = self._dp_release.noise_multiplier = float(state["noise_multiplier"])
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

            run_dir = self._get_output_dir(trial=trial)
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            write_private_state(self.dp_state_dict(), folder)
            prune_private_states(run_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        check_callbacks(self.callback_handler.callbacks)
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            state, _ = read_private_state(checkpoint)
            refuse_noise_replay(checkpoint, state)
            self.load_dp_state_dict(state)
        elif self._dp_train_calls > 0:
            # a new run on the same data: a new Poisson sample, or the accountant would compose replayed batches
            # as if they were independent
            explicit = self.dp_config.sampler_seed
            self._dp_sampler_seed = secret_seed() if explicit is None else derived_seed(explicit, self._dp_train_calls)
        self._dp_train_calls += 1
        return super().train(resume_from_checkpoint, *args, **kwargs)


class DPTrainer(DPMixin, Trainer):
    """``transformers.Trainer`` with DP-SGD. ``DPTrainer(model=..., args=..., train_dataset=..., dp_config=...)``."""


def __getattr__(name: str):
    if name == "DPSFTTrainer":
        from hf_svd_plugins.dp.sft import get_dp_sft_trainer_class

        return get_dp_sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
