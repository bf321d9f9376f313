"""Small helpers for callbacks that need the Trainer they run in."""

from __future__ import annotations

import inspect
import logging

logger = logging.getLogger(__name__)


def find_running_trainer() -> object | None:
    """The ``transformers.Trainer`` whose event is being dispatched (found on the call stack), or None.

    Callbacks receive no Trainer reference, but their numbers belong in ``Trainer.log`` so that every reporting
    integration (TensorBoard, W&B, ...) and ``state.log_history`` see them.
    """
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def log_to_trainer(metrics: dict[str, float]) -> None:
    """Send ``metrics`` through the running Trainer's ``log`` (all integrations), else to the Python logger."""
    trainer = find_running_trainer()
    if trainer is not None:
        trainer.log(dict(metrics))
    else:
        logger.info("%s", metrics)


def reads_train_data(callback: object) -> bool:
    """Whether a callback computes something from the Trainer's training batches and writes it into the model.

    Callbacks that do (EVA's activation statistics, a Fisher pass over the train dataloader) declare
    ``reads_train_data = True``. A private trainer (``DPTrainer``) refuses them: their output is an un-noised
    function of the private data that no accountant covers. Reading a separate public dataloader is fine.
    """
    return bool(getattr(callback, "reads_train_data", False))
