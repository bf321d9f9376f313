"""``EvaCallback``: EVA initialisation inside a Trainer (plain ``Trainer``, TRL ``SFTTrainer``).

``DPTrainer`` refuses EVA on its private training data (EVA's statistics are an un-noised function of it). Initialise
on public data instead: ``EvaCallback(dataloader=public_loader)``, or ``eva_init`` before the ``DPTrainer`` exists.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_svd_plugins.eva.allocation import EvaResult, compute_eva, eva_pairs
from hf_svd_plugins.eva.config import EvaConfig
from hf_svd_plugins.eva.layout import (
    SavedRankLayout,
    adapter_layout,
    apply_masked,
    grow_to_max_rank,
    max_rank,
    scale_divisor,
    update_saved_layout,
    uses_rslora,
    zero_unused_ranks,
)
from hf_svd_plugins.lora import full_shape, is_zero3_param, unwrap_peft_model
from hf_svd_plugins.trainer_utils import log_to_trainer

logger = logging.getLogger(__name__)


class EvaCallback(TrainerCallback, ExportableState):
    """Initialise LoRA with EVA on the Trainer's own first minibatches, before the first optimizer step.

    Pass it to the constructor, ``Trainer(..., callbacks=[EvaCallback()])``: with ``rho > 1`` it widens every LoRA
    layer to ``r_max = round(rho * r)`` ranks at the end of ``Trainer.__init__`` (before the optimizer, DDP or
    DeepSpeed see the parameters). At ``on_train_begin`` it reads minibatches from the train dataloader, computes
    EVA, writes ``A`` (orthonormal rows; ranks beyond a module's ``r_m`` are zero) and zeroes ``B`` on every rank.
    Zero ranks receive exactly zero gradient, so they stay zero under SGD/Adam/AdamW. Saved adapters are truncated to
    ``r_m`` with ``rank_pattern``/``alpha_pattern``: ``PeftModel.from_pretrained`` loads them as usual. Under
    DeepSpeed ZeRO-3 the consolidated save cannot be truncated on the fly: adapters are saved at the full width
    ``r_max`` (unused ranks zero) with alphas that keep every module's scale, which loads and predicts the same.

    The ranks and a done flag are saved with every checkpoint (``TrainerState.stateful_callbacks``); resuming never
    recomputes EVA. Each adapter of a model keeps its own layout, so a second adapter can be EVA-initialised too
    (``config.adapter_name``, or make it the active adapter).

    ``DPTrainer`` refuses an ``EvaCallback`` that reads its private training batches: EVA's statistics are an
    un-noised function of them. Initialise on public data instead: ``EvaCallback(dataloader=public_loader)``, or
    ``eva_init`` on the model before the ``DPTrainer`` exists.

    Args:
        config: an :class:`EvaConfig`; or give its fields as keyword arguments (``EvaCallback(rho=2.0, tau=0.99)``).
        dataloader: batches to read instead of the Trainer's train dataloader, e.g. public data when the training
            data is private. Same format as the training batches.
    """

    def __init__(self, config: EvaConfig | None = None, *, dataloader: Iterable | None = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError("pass either config=EvaConfig(...) or keyword arguments, not both")
        self.config = config if config is not None else EvaConfig(**kwargs)
        self.dataloader = dataloader
        self.done = False
        self.ranks: dict[str, int] | None = None
        self.scalings: dict[str, float] | None = None
        self.alphas: dict[str, float] | None = None
        self.result: EvaResult | None = None
        self._layout: SavedRankLayout | None = None
        self._prepared: tuple[int, str] | None = None
        self._mask_pairs: list = []

    @property
    def reads_train_data(self) -> bool:
        """True when EVA reads the Trainer's own training batches (see :func:`~hf_svd_plugins.trainer_utils.reads_train_data`)."""
        return self.dataloader is None

    # -------------------------------------------------------------------------------- Trainer events

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return
        if optimizer is not None and self.config.rho > 1:
            raise ValueError(
                f"EvaCallback(rho={self.config.rho}) widens LoRA layers at the end of Trainer.__init__, but an "
                "optimizer was passed through `optimizers=` and would keep the old parameters; pass "
                "`optimizer_cls_and_kwargs=(cls, kwargs)` instead, use rho=1, or call `eva_init` before building "
                "the optimizer"
            )
        self._prepare(model, allow_growth=True)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("EvaCallback needs the Trainer's model; is it attached to a transformers.Trainer?")
        self._prepare(model, allow_growth=False)
        pairs = eva_pairs(model, self.config)
        # whole (non-ZeRO-3) pairs, found once: on_step_end re-zeroes their unused ranks every step
        self._mask_pairs = [p for p in pairs if not is_zero3_param(p.A)]
        if not self.done:
            self._restore_from_checkpoint_state(state)
        if self.done:
            # Resumed: the checkpoint holds trained weights; only re-impose the mask and the save layout.
            zero_unused_ranks(pairs, self.ranks, self.scalings, optimizer=optimizer)
            self._set_layout(model, pairs)
            return
        if state.global_step > 0:
            warnings.warn(
                f"resuming at step {state.global_step} from a checkpoint without EVA state; EVA is not recomputed "
                "over trained weights (the checkpoint's LoRA weights are kept)",
                stacklevel=2,
            )
            self.done = True
            return
        loader = self.dataloader if self.dataloader is not None else train_dataloader
        if loader is None:
            raise ValueError("EvaCallback found no train dataloader; Trainer.train() provides one")
        result = compute_eva(model, loader, self.config, pairs)
        apply_masked(pairs, result, optimizer=optimizer)
        self.result, self.ranks, self.scalings, self.alphas = result, result.ranks, result.scalings, result.alphas
        self.done = True
        self._set_layout(model, pairs)
        logger.info("EVA: %d batches, %.1f s, ranks %s", result.batches_used, result.seconds, result.ranks)
        log_to_trainer(result.log_metrics())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Unused ranks get exactly zero gradient, so plain optimizers never move them. A trainer that adds
        # something to every gradient (DP-SGD noise) would; re-zeroing after the step is post-processing, so it
        # costs no privacy. ZeRO-3 shards are skipped: checking them would need a gather every step.
        if not self.done or not self.ranks:
            return
        with torch.no_grad():
            for pair in self._mask_pairs:
                r_m = self.ranks.get(pair.name)
                if r_m is None:
                    continue
                pair.A[r_m:].zero_()
                pair.B[:, r_m:].zero_()

    # -------------------------------------------------------------------------------- checkpoint state

    def state(self) -> dict:
        return {
            "args": self.config.to_dict(),
            "attributes": {"done": self.done, "ranks": self.ranks, "scalings": self.scalings, "alphas": self.alphas},
        }

    def _restore_from_checkpoint_state(self, state) -> None:
        # Read from TrainerState directly: Trainer only re-creates callbacks from it when
        # `restore_callback_states_from_checkpoint=True`, but EVA must never be recomputed on resume.
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        attributes = (saved or {}).get("attributes", {})
        if state.global_step > 0 and attributes.get("done"):
            self.done = True
            self.ranks = {k: int(v) for k, v in attributes["ranks"].items()}
            self.scalings = {k: float(v) for k, v in attributes["scalings"].items()}
            self.alphas = {k: float(v) for k, v in attributes["alphas"].items()}

    # -------------------------------------------------------------------------------- helpers

    def _prepare(self, model, allow_growth: bool) -> None:
        """Validate, widen to ``r_max`` (only before the optimizer exists) and install the save/load layout hooks."""
        peft_model = unwrap_peft_model(model)
        pairs = eva_pairs(peft_model, self.config)
        adapter = pairs[0].adapter
        if self._prepared == (id(peft_model), adapter):
            return
        lora_config = peft_model.peft_config[adapter]
        if self.config.rho > 1 and (getattr(lora_config, "use_dora", False) or getattr(lora_config, "lora_bias", False)):
            # a module given rank 0 keeps training its DoRA magnitude / lora_B bias, which saving drops
            raise ValueError(
                f"EvaCallback(rho={self.config.rho}) with LoraConfig(use_dora=True) or lora_bias=True: a module that "
                "EVA gives rank 0 would still train its DoRA magnitude or LoRA bias, and the saved adapter (which "
                "leaves rank-0 modules out) would not reproduce the model. Call `eva_init(model, dataloader)` before "
                "building the Trainer (it removes rank-0 adapters), or use rho=1"
            )
        layout = adapter_layout(peft_model, adapter)
        if layout.saved_layout is None and allow_growth:
            grow_to_max_rank(peft_model, pairs, self.config)
            pairs = eva_pairs(peft_model, self.config)
        widths = {p.name: full_shape(p.A)[0] for p in pairs}
        if any(widths[p.name] < max_rank(peft_model, p, self.config) for p in pairs):
            raise ValueError(
                f"EvaCallback(rho={self.config.rho}) must widen LoRA layers before the optimizer is built: "
                "pass it to the Trainer constructor (`Trainer(..., callbacks=[EvaCallback(...)])`) instead "
                "of `trainer.add_callback`, or call `eva_init(model, dataloader)` before creating the Trainer"
            )
        if layout.saved_layout is None:
            layout.saved_layout = SavedRankLayout(pairs, widths)
        # else: e.g. a callback re-created by restore_callback_states_from_checkpoint reuses the installed hooks
        self._layout = layout.saved_layout
        self._prepared = (id(peft_model), adapter)

    def _set_layout(self, model, pairs) -> None:
        if any(is_zero3_param(p.A) for p in pairs):
            # ZeRO-3 consolidates weights for saving without state-dict hooks, so adapters cannot be truncated on
            # the fly: save them at full width r_max (unused ranks are zero) with alphas that keep each scale.
            rslora = uses_rslora(model, pairs[0].adapter)
            widths = dict(self._layout.widths)
            alphas = {n: self.scalings[n] * scale_divisor(w, rslora) for n, w in widths.items()}
            update_saved_layout(model, pairs, widths, alphas)
            return
        self._layout.ranks = dict(self.ranks)
        update_saved_layout(model, pairs, self.ranks, self.alphas)
