"""Small helpers for callbacks that need the Trainer they run in."""

from __future__ import annotations

import inspect
import logging

logger = logging.getLogger(__name__)


def find_running_trainer() -> object | None:
    """The ``transformers.Trainer`` whose event is being dispatched (found on the call stack), or None.

    Callbacks receive no Trainer reference, but their numbers belong in ``Trainer.log`` so that every reporting
    integration (TensorBoard, W&B, ...) and ``state.log_history`` see them. transformers 5.24 offers no supported
    route: ``CallbackHandler.call_event`` passes ``model``, ``processing_class``, ``optimizer``, ``lr_scheduler`` and
    the dataloaders, never the Trainer; ``on_log`` hands callbacks the ``logs`` dict only after ``Trainer.log`` has
    appended it to ``log_history``, and user callbacks run after the reporting integrations, so adding keys there
    would reach neither. Hence this one place walks the frames of the event dispatch (``Trainer`` ->
    ``CallbackHandler`` -> callback), and :func:`log_to_trainer` is the only caller.
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
    """Send ``metrics`` through the running Trainer's ``log`` (all integrations), else to the Python logger.

    ``Trainer.log`` ends in ``CallbackHandler.on_log``, which clears ``control.should_log``; called from inside an
    event (e.g. ``on_step_end``, after ``DefaultFlowCallback`` asked for the step's loss to be logged) that would
    silently drop the Trainer's own loss/learning-rate entry of that step, so the flag is restored.
    """
    trainer = find_running_trainer()
    if trainer is None:
        logger.info("%s", metrics)
        return
    control = getattr(trainer, "control", None)
    should_log = getattr(control, "should_log", False)
    trainer.log(dict(metrics))
    if control is not None:
        control.should_log = should_log
        if trainer.control is not control:  # a callback returned another TrainerControl from on_log
            trainer.control.should_log = should_log


def reads_train_data(callback: object) -> bool:
    """Whether a callback computes something from the Trainer's training batches and writes it into the model.

    Callbacks that do (EVA's activation statistics, a Fisher pass over the train dataloader) declare
    ``reads_train_data = True``. A private trainer (``DPTrainer``) refuses them: their output is an un-noised
    function of the private data that no accountant covers. Reading a separate public dataloader is fine.
    """
    return bool(getattr(callback, "reads_train_data", False))


def writes_lora_weights(callback: object) -> bool:
    """Whether a callback (instance or class) writes LoRA weights itself inside the Trainer.

    EVA's initialisation (replaces A at train begin) and FedSVD's refactorization (rotates A and B) do. Callbacks
    declare it with ``writes_lora_weights = True``; ``EvaCallback`` (and subclasses) are recognised by class name as
    well, so no method has to import another. A federation refuses such callbacks in its clients: the server owns
    the global A, and a client that changes it would send a B that no longer matches.
    """
    cls = callback if isinstance(callback, type) else type(callback)
    return bool(getattr(callback, "writes_lora_weights", False)) or any(
        c.__name__ == "EvaCallback" for c in cls.__mro__
    )
