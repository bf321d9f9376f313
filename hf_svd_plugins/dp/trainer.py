"""Trainer adapter for DP-SGD: :class:`DPMixin` makes any ``transformers.Trainer`` subclass differentially private.

How it plugs into the Trainer's loop (transformers 5.x):

- ``__init__``: the Trainer gets a private copy of the ``TrainingArguments`` (:mod:`.arguments`: batch clipping off,
  DeepSpeed's too); refusals (:mod:`.checks`), noise calibration, secret seeds (:mod:`.seeds`). The user's
  arguments and ``DPConfig`` are never modified.
- ``get_train_dataloader``: Poisson-sampled logical batches (:class:`~.sampling.PoissonBatchSampler`), split into
  ``gradient_accumulation_steps`` micro-batches and, under DDP, into one share per rank. The expected logical batch is
  ``per_device_train_batch_size * gradient_accumulation_steps * world_size``. Every collated micro-batch (Poisson or
  shuffled) must have one row per example drawn (:class:`~.sampling.PrivateCollator`).
- ``training_step``: per-example gradients of the trainable parameters (:class:`~.engine.PerExampleGradients`), each
  clipped to ``C``, summed into float32 accumulators (:class:`~.release.NoisyRelease`). No ``loss.backward()``; HF's
  ``num_items_in_batch`` is not computed (each example's loss is the mean over its own valid targets).
- Right before the optimizer step (``_get_grad_norm``, with a ``on_pre_optimizer_step`` callback as a fallback):
  trainable and optimizer parameters must be exactly the privatised ones; accumulators are summed over ranks,
  Gaussian noise ``N(0, sigma^2 C^2)`` is added once, the result is divided by the expected batch size and written
  to ``.grad``. The accountant records the step (:mod:`.budget`). The logged ``grad_norm`` is that of the released
  (noised) gradient.
- DeepSpeed ZeRO-1/2: DeepSpeed steps inside ``accelerator.backward`` of the last micro-batch, so the release happens
  in ``training_step`` there, via a surrogate loss ``sum_p <p, g_p>`` (ZeRO-3 and FSDP are refused).
- ``log``: adds ``epsilon`` (the bound that holds for the batches in use) to every log.
- ``_save_checkpoint`` / ``train(resume_from_checkpoint=...)``: the private DP state (accountant, noise generator,
  sampler seed) is kept next to each checkpoint, never inside it; resuming draws fresh secrets (:mod:`.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_svd_plugins.distributed import world_size
from hf_svd_plugins.dp.accounting import PrivacyAccountant, calibrate_noise_multiplier
from hf_svd_plugins.dp.arguments import private_arguments
from hf_svd_plugins.dp.budget import EpochKey, PrivacyBudget
from hf_svd_plugins.dp.checkpoint import (
    LEGACY_STATE_NAME,
    check_trial_not_pushed,
    dp_state_dict,
    prune_private_states,
    resume_private_state,
    warn_if_checkpoints_pushed,
    write_private_state,
    write_release_log,
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
from hf_svd_plugins.dp.plan import accounted_plan, planned_steps, steps_per_epoch, warn_shuffled_batches
from hf_svd_plugins.dp.release import NoisyRelease
from hf_svd_plugins.dp.sampling import PrivateCollator, is_empty_batch, poisson_dataloader
from hf_svd_plugins.dp.seeds import derived_seed, secret_seed, shared_seed
from hf_svd_plugins.lora import unwrap_model

logger = logging.getLogger(__name__)

#: kept for code that looked for the state inside checkpoint folders (versions < 2)
DP_STATE_NAME = LEGACY_STATE_NAME


class _DPCallback(TrainerCallback):
    """Checks at train begin and every step start (budget, callbacks), noise injection before the optimizer step."""

    def __init__(self, trainer: DPMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.trainer._dp_on_train_begin(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._dp_engine.release_hooks()

    def on_step_begin(self, args, state, control, **kwargs):
        t = self.trainer
        # also those added by other callbacks (in a distributed run raised on every rank at the release)
        t._dp_guarded(check_callbacks, t.callback_handler.callbacks, t.train_dataset)
        if not t._dp_budget.allows(t._dp_epoch_key()):
            t._dp_stop_for_budget(control)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._dp_finalize_step()


def _activation_checkpointing(args, model: nn.Module) -> bool:
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        return True
    flag = getattr(model, "is_activation_checkpointing", None)  # the deprecated name only for older models
    return bool(flag if flag is not None else getattr(model, "is_gradient_checkpointing", False))


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
        # DP changes max_grad_norm (and DeepSpeed's clipping): on a copy, before the Trainer reads them
        if kwargs.get("args") is not None:
            kwargs["args"] = private_arguments(kwargs["args"], self.dp_config.max_grad_norm)
        elif len(args) > 1 and args[1] is not None:
            args = (args[0], private_arguments(args[1], self.dp_config.max_grad_norm), *args[2:])
        super().__init__(*args, **kwargs)
        if self.args.max_grad_norm:  # the Trainer built default arguments itself
            self.args = private_arguments(self.args, self.dp_config.max_grad_norm)
        self._dp_setup()

    # ------------------------------------------------------------------------------------------------------ setup

    def _dp_setup(self) -> None:
        cfg, args = self.dp_config, self.args
        check_trainer_features(self, cfg)
        model = unwrap_model(self.model)
        params = trainable_parameters(model)
        if not params:
            raise ValueError(
                "the model has no trainable parameters; add a LoRA adapter (peft.get_peft_model) or unfreeze some"
            )
        check_no_batch_statistics(model)
        checkpointing = _activation_checkpointing(args, model)
        check_per_sample_method(model, cfg, checkpointing)
        check_callbacks(self.callback_handler.callbacks, self.train_dataset)
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
        # shuffled batches: calibrated and checked against the bound that holds (no amplification)
        rate, releases = accounted_plan(cfg, self.sample_rate, self.planned_steps, self.dp_steps_per_epoch)
        if cfg.noise_multiplier is not None:
            self.noise_multiplier = float(cfg.noise_multiplier)
        else:
            self.noise_multiplier = calibrate_noise_multiplier(
                cfg.target_epsilon, self.target_delta, rate, releases, cfg.accountant, cfg.epsilon_tolerance,
                cfg.eps_error,
            )
        self.accountant = PrivacyAccountant(cfg.accountant, cfg.eps_error)
        self._dp_budget = PrivacyBudget(self.accountant, self.target_delta, cfg.poisson_sampling,
                                        self.dp_steps_per_epoch)
        limit = cfg.epsilon_limit
        if limit is not None and cfg.noise_multiplier is not None:
            planned = self.accountant.epsilon_after(self.target_delta, self.noise_multiplier, rate, releases,
                                                    amplified=cfg.poisson_sampling)
            if planned > limit:
                raise ValueError(
                    f"the planned {self.planned_steps} steps at noise_multiplier={self.noise_multiplier} and "
                    f"sample_rate={self.sample_rate:.4g} spend epsilon={planned:.3f} > max_epsilon={limit}; raise "
                    "noise_multiplier, train fewer steps, or give target_epsilon instead to calibrate sigma"
                )
        if not cfg.poisson_sampling:
            warn_shuffled_batches(cfg, self.noise_multiplier, self.sample_rate, self.planned_steps,
                                  self.dp_steps_per_epoch, self.target_delta)
        # every rank adds the same noise to the same all-reduced sum, and takes its share of the same Poisson sample
        self._dp_release = NoisyRelease(self.noise_multiplier, cfg.max_grad_norm, self.expected_batch_size,
                                        shared_seed(cfg.noise_seed, "noise_seed"))
        self._dp_lineage = secret_seed()  # identifies this run's releases among the saved states
        self._dp_noise_draws = 0
        self._dp_sampler_seed = shared_seed(cfg.sampler_seed, "sampler_seed")
        self._dp_train_calls = 0
        self._dp_engine = PerExampleGradients(cfg, checkpointing, self.is_deepspeed_enabled,
                                              getattr(args, "label_smoothing_factor", 0.0),
                                              low_precision=bool(getattr(args, "bf16", False)))
        self._dp_method_used: str | None = None
        self._dp_buffers: dict[str, torch.Tensor] = {}
        self._dp_last_finalized_step = -1
        self.callback_handler.callbacks.insert(0, _DPCallback(self))
        logger.info(
            "DP-SGD: C=%s sigma=%.4f q=%.5g delta=%.3g expected batch=%d planned steps=%d accountant=%s",
            cfg.max_grad_norm, self.noise_multiplier, self.sample_rate, self.target_delta, self.expected_batch_size,
            self.planned_steps, cfg.accountant,
        )

    def add_callback(self, callback) -> None:
        """``Trainer.add_callback``, refusing at once a callback that would read the private training batches."""
        super().add_callback(callback)
        if getattr(self, "_dp_budget", None) is None:  # the Trainer's own callbacks, during construction
            return
        try:
            check_callbacks(self.callback_handler.callbacks, self.train_dataset)
        except ValueError:
            self.callback_handler.remove_callback(callback)
            raise

    # ---------------------------------------------------------------------------------------------------- public

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far (all steps, including those before a resume) at ``delta`` (default: the config's):
        for Poisson batches the amplified bound, for shuffled batches the bound without amplification."""
        return self._dp_budget.epsilon(delta)

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
        if not self.dp_config.poisson_sampling:  # the Trainer's shuffled batches, still one row per example
            user_collator = self.data_collator
            self.data_collator = PrivateCollator(user_collator)  # read once, when the loader is built
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = user_collator
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

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """0: the Trainer's count (``total_flos`` in ``trainer_state.json``) is the number of tokens of the batches
        actually drawn, a function of the secret Poisson sample."""
        return 0

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
        if (is_empty_batch(inputs) or not self._dp_budget.allows(self._dp_epoch_key())
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

    def _dp_check_step(self, module: nn.Module, private: dict[str, nn.Parameter]) -> None:
        """Before a release: what is trained is the privatised set, no buffer changed, no callback reads the
        private batches (failures recorded for every rank in a distributed run)."""
        self._dp_guarded(check_only_private_parameters, module, private, self.optimizer, self.is_deepspeed_enabled)
        self._dp_guarded(check_buffers_unchanged, module, self._dp_buffers)
        self._dp_guarded(check_callbacks, self.callback_handler.callbacks, self.train_dataset)

    def _dp_deepspeed_release(self) -> None:
        """DeepSpeed steps inside ``accelerator.backward`` of the last micro-batch: release the private gradient
        there, through a surrogate loss ``sum_p <p, g_p>`` whose gradient is exactly ``g`` (identical on every rank,
        so DeepSpeed's data-parallel averaging keeps it unchanged)."""
        module = unwrap_model(self.model)
        private = self._dp_params(module)
        self._dp_check_step(module, private)
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
        self._dp_check_step(module, private)
        params = list(private.values())
        released = self._dp_release_gradient(params)
        if released is None:
            for p in params:  # no update at all: optimizers skip parameters without a gradient
                p.grad = None
            return
        for p, g in zip(params, released, strict=True):
            p.grad = g.to(dtype=p.dtype, device=p.device)

    def _dp_epoch_key(self) -> EpochKey:
        """The epoch of the step about to be taken (shuffled batches: one participation per epoch)."""
        return self._dp_budget.epoch_key(self._dp_train_calls, self.state.global_step)

    @torch.no_grad()
    def _dp_release_gradient(self, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
        """Sum the accumulators over ranks, add noise once, divide by the expected batch; record the step.

        Returns None (and stops training) when the step would exceed the hard budget.
        """
        self._dp_last_finalized_step = self.state.global_step
        key = self._dp_epoch_key()
        if not self._dp_budget.allows(key):
            self._dp_release.discard()
            if self._dp_release.failure is not None:  # no rank runs a collective here: raise locally
                raise self._dp_release.failure
            self._dp_stop_for_budget(self.control)
            return None
        released = self._dp_release.release(params)
        self._dp_noise_draws += 1
        self._dp_budget.record(self.noise_multiplier, self.sample_rate, key)
        if self.args.should_save and str(getattr(self.args.save_strategy, "value", self.args.save_strategy)) != "no":
            # what this run has released, for a resume from an older checkpoint or after a crash
            write_release_log(self._get_output_dir(trial=None), self._dp_lineage, self._dp_noise_draws,
                              self.accountant.state_dict())
        return released

    def _dp_stop_for_budget(self, control) -> None:
        if not control.should_training_stop:
            logger.warning(
                "DP: stopping at step %d: one more step would exceed max_epsilon=%s (epsilon so far %.4f at delta=%.3g)",
                self.state.global_step, self.dp_config.epsilon_limit, self.get_epsilon(), self.target_delta,
            )
        control.should_training_stop = True

    def _dp_on_train_begin(self, optimizer) -> None:
        check_callbacks(self.callback_handler.callbacks, self.train_dataset)  # also those added after construction
        self._dp_release.discard()
        self._dp_last_finalized_step = -1
        module = unwrap_model(self.model)
        check_only_private_parameters(module, self._dp_params(module), optimizer, self.is_deepspeed_enabled)
        self._dp_buffers = saved_float_buffers(module)
        budget = self._dp_budget
        needed = budget.releases_needed(self._dp_train_calls, self.state.global_step, self.state.max_steps)
        allowed = budget.start(self.dp_config.epsilon_limit, self.noise_multiplier, self.sample_rate, needed)
        if allowed is not None and allowed < needed:
            logger.warning(
                "DP: only %d of the %d remaining %s fit in max_epsilon=%s; training will stop early", allowed, needed,
                "steps" if budget.poisson else "epochs", self.dp_config.epsilon_limit,
            )

    # ------------------------------------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if getattr(self, "accountant", None) is not None and self.accountant.steps > 0:
            logs["epsilon"] = self.get_epsilon()
        super().log(logs, start_time)

    # -------------------------------------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        check_callbacks(self.callback_handler.callbacks, self.train_dataset)  # nothing they wrote gets saved
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            run_dir = self._get_output_dir(trial=trial)
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            write_private_state(dp_state_dict(self), folder)
            prune_private_states(run_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        check_callbacks(self.callback_handler.callbacks, self.train_dataset)
        check_trial_not_pushed(self.args, kwargs.get("trial", args[0] if args else None))
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            resume_private_state(self, checkpoint)
        elif self._dp_train_calls > 0:
            # a new run on the same data: a new Poisson sample, or the accountant would compose replayed batches
            # as if they were independent
            explicit = self.dp_config.sampler_seed
            self._dp_sampler_seed = secret_seed() if explicit is None else derived_seed(explicit, self._dp_train_calls)
        self._dp_train_calls += 1
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:  # also after an exception or KeyboardInterrupt: no Opacus hooks are left on the user's model
            self._dp_engine.release_hooks()


class DPTrainer(DPMixin, Trainer):
    """``transformers.Trainer`` with DP-SGD. ``DPTrainer(model=..., args=..., train_dataset=..., dp_config=...)``."""
