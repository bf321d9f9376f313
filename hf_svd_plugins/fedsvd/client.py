"""One federated client's local round, shared by the in-process :class:`~hf_svd_plugins.fedsvd.federation.Federation`
and the Flower ``ClientApp``: load the global adapter, train ``local_steps`` with a fresh HF Trainer, read back.

Also the checks every federation runs on the client ``trainer_kwargs`` before any training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

from hf_svd_plugins.fedsvd.core import trains_a
from hf_svd_plugins.lora import LoraPair, assign_lora_weights, find_lora_pairs, read_lora_weights
from hf_svd_plugins.trainer_utils import writes_lora_weights

logger = logging.getLogger(__name__)

__all__ = [
    "LoraUpdate",
    "accuracy_metrics",
    "check_client_trainer_kwargs",
    "check_federated_callbacks",
    "check_federated_dp_config",
    "client_seed",
    "client_training_args",
    "load_lora_state",
    "quiet_trainer",
    "set_trainable_for_method",
    "train_lora_client",
    "trainable_extra_names",
]

def check_client_trainer_kwargs(trainer_kwargs: Mapping[str, Any] | None) -> None:
    """The checks of a federation's client ``trainer_kwargs``, before any training: see
    :func:`check_federated_callbacks` and :func:`check_federated_dp_config`."""
    check_federated_callbacks(trainer_kwargs)
    check_federated_dp_config(trainer_kwargs)


def check_federated_callbacks(trainer_kwargs: Mapping[str, Any] | None) -> None:
    """``ValueError`` if a client callback writes LoRA weights itself (``EvaCallback``, ``FedSVDCallback``).

    The server holds the global ``A`` and every client starts from it; a client whose Trainer re-initialises or
    refactorizes ``A`` would train and send a ``B`` for another ``A``, and the aggregate would silently mix bases.
    """
    for callback in (trainer_kwargs or {}).get("callbacks") or []:
        if writes_lora_weights(callback):
            name = callback.__name__ if isinstance(callback, type) else type(callback).__name__
            raise ValueError(
                f"trainer_kwargs['callbacks'] contains {name}, which writes LoRA weights inside each client's "
                "Trainer: clients would leave the server's global A and their B updates would not match it. "
                "Initialise LoRA once before the federation instead (e.g. `eva_init(model, dataloader)`, then "
                "`Federation(model, ...)`); the FedSVD refactorization is the server's job (method='fedsvd')"
            )


def check_federated_dp_config(trainer_kwargs: Mapping[str, Any] | None) -> None:
    """``ValueError`` if a client ``dp_config`` has ``target_epsilon`` without ``total_steps``: sigma would be
    calibrated for one round and the whole budget spent in every round."""
    dp_config = (trainer_kwargs or {}).get("dp_config")
    if getattr(dp_config, "target_epsilon", None) is not None and getattr(dp_config, "total_steps", None) is None:
        raise ValueError(
            "trainer_kwargs['dp_config'] has target_epsilon but no total_steps: sigma would be calibrated for a "
            "single round's local_steps and the budget spent every round; set DPConfig(total_steps=rounds * "
            "local_steps) so target_epsilon covers every round a client may take part in"
        )


def quiet_trainer(trainer: Trainer) -> None:
    """No per-client console output (progress bars, metric prints); the federation logs one row per round."""
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)


def accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for classification: accuracy of ``argmax(logits, -1)`` against the labels."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


LoraUpdate = dict[str, tuple[torch.Tensor | None, torch.Tensor]]


def client_seed(seed: int, cid: int, rnd: int) -> int:
    """The Trainer seed of client ``cid`` in round ``rnd`` (0-based): ``seed + 1000 * rnd + cid``."""
    return int(seed) + 1000 * int(rnd) + int(cid)


def trainable_extra_names(model: nn.Module, pairs: Sequence[LoraPair]) -> list[str]:
    """Names of trainable parameters that are not LoRA A/B (e.g. a classifier head in PEFT ``modules_to_save``)."""
    lora_ids = {id(p) for pair in pairs for p in (pair.A, pair.B)}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]


def set_trainable_for_method(pairs: Sequence[LoraPair], method: str) -> None:
    """``B`` trainable always; ``A`` only for ``fedavg_lora`` (FFA-LoRA otherwise)."""
    for pair in pairs:
        pair.A.requires_grad_(trains_a(method))
        pair.B.requires_grad_(True)


@torch.no_grad()
def load_lora_state(
    model: nn.Module,
    pairs: Sequence[LoraPair],
    weights: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]],
    extra: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write ``{module: (A (r, d_in), B (d_out, r))}`` and extra parameters ``{name: tensor}`` into ``model``."""
    assign_lora_weights(pairs, dict(weights))
    if extra:
        params = dict(model.named_parameters())
        for n, t in extra.items():
            if n not in params:
                raise ValueError(f"extra parameter {n!r} is not a parameter of the model; same model on every client?")
            params[n].data.copy_(t.to(device=params[n].device, dtype=params[n].dtype))


def client_training_args(
    output_dir: str, local_steps: int, seed: int, training_args: Mapping[str, Any] | None = None
) -> TrainingArguments:
    """``TrainingArguments`` of one local training: quiet, no checkpoints, ``max_steps=local_steps``."""
    kwargs: dict[str, Any] = {"report_to": [], "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True}
    kwargs.update(training_args or {})
    kwargs.update(output_dir=output_dir, max_steps=local_steps, seed=seed)
    return TrainingArguments(**kwargs)


def train_lora_client(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    method: str,
    global_weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    global_extra: Mapping[str, torch.Tensor] | None,
    local_steps: int,
    seed: int,
    output_dir: str,
    training_args: Mapping[str, Any] | None = None,
    data_collator: Callable | None = None,
    trainer_cls: type = Trainer,
    trainer_kwargs: Mapping[str, Any] | None = None,
    pairs: Sequence[LoraPair] | None = None,
    client_state: dict[str, Any] | None = None,
) -> tuple[LoraUpdate, dict[str, torch.Tensor], float]:
    """One client's local round: load the global adapter, train ``local_steps`` with a fresh optimizer, read back.

    Shared by :class:`Federation` and the Flower ``ClientApp``.

    ``client_state`` (a dict, updated in place) carries what a client keeps between rounds. With a DP trainer (one
    with a ``PrivacyAccountant`` in ``trainer.accountant``, e.g. ``hf_svd_plugins.dp.DPTrainer``) it holds the
    accountant's state: the history of earlier rounds is loaded before training, so the budget checks and the
    reported ``epsilon`` compose over all rounds the client took part in (also rounds whose update was rejected).

    Returns:
        ``({module: (A or None, B)}, {extra param: tensor}, train loss)``; ``A`` is sent only for ``fedavg_lora``.
    """
    pairs = list(find_lora_pairs(model) if pairs is None else pairs)
    set_trainable_for_method(pairs, method)
    extra_names = trainable_extra_names(model, pairs)
    load_lora_state(model, pairs, global_weights, global_extra)
    trainer = trainer_cls(
        model=model,
        args=client_training_args(output_dir, local_steps, seed, training_args),
        train_dataset=dataset,
        data_collator=data_collator,
        **dict(trainer_kwargs or {}),
    )
    quiet_trainer(trainer)
    accountant = getattr(trainer, "accountant", None)
    if client_state is not None and accountant is not None and client_state.get("accountant"):
        accountant.load_state_dict(client_state["accountant"])
    steps_before = accountant.steps if accountant is not None else 0
    try:
        out = trainer.train()
    finally:
        if client_state is not None and accountant is not None:
            client_state["accountant"] = accountant.state_dict()
            if hasattr(trainer, "get_epsilon") and accountant.steps > 0:
                client_state["epsilon"] = float(trainer.get_epsilon())
    took_steps = accountant.steps > steps_before if accountant is not None else trainer.state.global_step > 0
    if not took_steps:
        raise RuntimeError(
            "the client took no optimizer step (with a DP trainer: its privacy budget max_epsilon is spent)"
        )
    send_a = trains_a(method)
    update = {
        n: ((a.float().cpu() if send_a else None), b.float().cpu()) for n, (a, b) in read_lora_weights(pairs).items()
    }
    params = dict(model.named_parameters())
    extra = {n: params[n].detach().float().cpu().clone() for n in extra_names}
    return update, extra, float(out.training_loss)
