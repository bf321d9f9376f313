"""``PermutationMergeCallback``: at the end of training, align the trained model with other checkpoints and merge.

The thin Trainer adapter around :func:`hf_svd_plugins.merging.merge.merge_models`. The trained model is the
reference (its basis, config and class are kept); the others are ``save_pretrained`` directories or models. The
merge runs on the main process on the unwrapped model; the Trainer's own model is left as trained.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from hf_svd_plugins.merging.evaluation import evaluate
from hf_svd_plugins.merging.merge import METHODS, merge_models
from hf_svd_plugins.merging.specs import check_not_peft
from hf_svd_plugins.trainer_utils import find_running_trainer, log_to_trainer

logger = logging.getLogger(__name__)

__all__ = ["PermutationMergeCallback"]


class PermutationMergeCallback(TrainerCallback):
    """Merge the trained model with ``others`` at ``on_train_end`` (weight matching by default).

    Args:
        others: checkpoints to merge with: ``save_pretrained`` directories (loaded with the trained model's class)
            or models of the same architecture and config.
        method: ``"weight_matching"`` (MergeMany for 3 or more models), ``"activation"``, ``"ste"`` or ``"naive"``.
        output_dir: where the merged model (and the Trainer's tokenizer/processor) is saved; None: not saved.
        weights: mixing weights, the trained model first (default uniform).
        data: batches for ``"activation"``/``"ste"``; default the first ``num_batches`` of the Trainer's train
            dataloader (then the callback reads training data: ``reads_train_data``).
        num_batches: how many training batches to read when ``data`` is not given.
        merge_kwargs: passed to :func:`merge_models` (``max_passes``, ``seed``, ``ste_steps``, ``ste_lr``, ...).

    After training, ``merged_model``, ``alignment`` and ``metrics`` hold the results. Logged through the Trainer
    (``merge/seconds``, ``merge/objective``, ``merge/eval_loss``, ``merge/eval_accuracy``, and the trained model's
    ``merge/eval_loss_trained``, ``merge/eval_accuracy_trained`` on the same eval set).
    """

    def __init__(self, others: Sequence[str | os.PathLike | nn.Module], method: str = "weight_matching",
                 output_dir: str | os.PathLike | None = None, weights: Sequence[float] | None = None,
                 data: Iterable | None = None, num_batches: int = 8, **merge_kwargs) -> None:
        if isinstance(others, (str, os.PathLike, nn.Module)) or not others:
            raise ValueError("others must be a non-empty list of checkpoint directories or models")
        for i, other in enumerate(others):
            if isinstance(other, nn.Module):
                check_not_peft(other, f"others[{i}]")
            elif not os.path.isfile(os.path.join(os.fspath(other), "config.json")):
                raise ValueError(f"others[{i}] = {os.fspath(other)!r} is not a save_pretrained directory "
                                 "(no config.json)")
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}")
        if weights is not None and len(weights) != len(others) + 1:
            raise ValueError(f"weights has {len(weights)} values for {len(others) + 1} models (the trained model "
                             "first, then others)")
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.others = list(others)
        self.method = method
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.weights = None if weights is None else list(weights)
        self.data = None if data is None else list(data)
        self.num_batches = num_batches
        self.merge_kwargs = merge_kwargs
        self.merged_model: nn.Module | None = None
        self.alignment = None
        self.metrics: dict[str, float] = {}

    @property
    def reads_train_data(self) -> bool:
        """True when the merge is fitted on the Trainer's training batches (STE / activation matching)."""
        return self.method in ("ste", "activation") and self.data is None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError("PermutationMergeCallback does not gather ZeRO-3 shards; save the model and run "
                             "`hf-svd merge` on the checkpoints instead")
        if model is not None:
            check_not_peft(_unwrap(model), "the trained model")
            config = getattr(_unwrap(model), "config", None)
            for i, other in enumerate(self.others):
                if config is not None and not isinstance(other, nn.Module):
                    from transformers import AutoConfig

                    other_type = AutoConfig.from_pretrained(os.fspath(other)).model_type
                    if other_type != config.model_type:
                        raise ValueError(f"others[{i}] is a {other_type!r} model but the trained model is "
                                         f"{config.model_type!r}")

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        trainer = find_running_trainer()
        model = _unwrap(model if model is not None else trainer.model)
        start = time.perf_counter()
        device = next(model.parameters()).device
        others = [o if isinstance(o, nn.Module) else type(model).from_pretrained(os.fspath(o), dtype=model.dtype)
                  for o in self.others]
        others = [o.to(device) for o in others]
        data = self.data
        if data is None and self.method in ("ste", "activation"):
            data = _first_batches(train_dataloader, self.num_batches)
        merged, alignment = merge_models([model, *others], method=self.method, weights=self.weights, reference=0,
                                         data=data, return_alignment=True, **self.merge_kwargs)
        metrics = {"merge/seconds": time.perf_counter() - start, "merge/models": float(len(others) + 1)}
        result = next((r for r in alignment.results if r is not None), None)
        if result is not None and result.objective:
            metrics["merge/objective"] = result.objective[-1]
            metrics["merge/passes"] = float(result.passes)
        eval_batches = _eval_batches(trainer)
        if eval_batches:
            merged_eval, trained_eval = evaluate(merged, eval_batches), evaluate(model, eval_batches)
            metrics.update({"merge/eval_loss": merged_eval.loss, "merge/eval_accuracy": merged_eval.accuracy,
                            "merge/eval_loss_trained": trained_eval.loss,
                            "merge/eval_accuracy_trained": trained_eval.accuracy})
        log_to_trainer(metrics)
        if self.output_dir is not None:
            merged.save_pretrained(self.output_dir)
            processor = kwargs.get("processing_class")
            if processor is not None and hasattr(processor, "save_pretrained"):
                processor.save_pretrained(self.output_dir)
        self.merged_model, self.alignment, self.metrics = merged, alignment, metrics


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _first_batches(dataloader: Iterable | None, n: int) -> list:
    if dataloader is None:
        raise ValueError("STE / activation matching needs data: pass data=[...] or train with a train dataset")
    out = []
    for batch in dataloader:
        out.append({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                   if isinstance(batch, dict) else batch)
        if len(out) >= n:
            break
    return out


def _eval_batches(trainer) -> list | None:
    if trainer is None or getattr(trainer, "eval_dataset", None) is None:
        return None
    dataset = trainer.eval_dataset
    if isinstance(dataset, dict):  # several eval sets: use the first
        dataset = next(iter(dataset.values()))
    return list(trainer.get_eval_dataloader(dataset))
