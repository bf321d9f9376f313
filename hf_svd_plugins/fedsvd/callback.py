"""Single-node FedSVD: refactorize every LoRA pair by SVD every ``k`` optimizer steps, inside any HF Trainer.

The thin adapter around :func:`hf_svd_plugins.fedsvd.core.refactorize`: it finds the pairs through
:mod:`hf_svd_plugins.lora` (which handles ZeRO-3 gathering, DDP/ZeRO-2 broadcast and DeepSpeed fp32 master copies),
calls the core and writes the results back. ``B' A' == B A``, so the model's function does not change.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_svd_plugins.fedsvd.core import refactorize
from hf_svd_plugins.lora import LoraPair, assign_lora_weights, find_lora_pairs, read_lora_weights
from hf_svd_plugins.trainer_utils import log_to_trainer

logger = logging.getLogger(__name__)

__all__ = ["FedSVDCallback", "freeze_lora_A", "refactorize_lora_model", "reset_optimizer_state"]


def freeze_lora_A(model: torch.nn.Module, adapter_name: str | None = None) -> int:  # noqa: N802 - the paper's name
    """FFA-LoRA: make every LoRA ``A (r, d_in)`` of ``adapter_name`` (default: the active adapter) non-trainable.

    Call it before the Trainer builds its optimizer and wraps the model (DDP and DeepSpeed only reduce the parameters
    that were trainable when they were set up).

    Returns:
        The number of ``A`` parameters that were trainable and are now frozen.

    Raises:
        ValueError: if ``model`` has no LoRA adapter.
    """
    frozen = 0
    for pair in find_lora_pairs(model, adapter_name):
        if pair.A.requires_grad:
            pair.A.requires_grad_(False)
            frozen += 1
    return frozen


def _optimizer_chain(optimizer: object | None) -> list[object]:
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


@torch.no_grad()
def reset_optimizer_state(optimizer: object | None, params: Sequence[torch.nn.Parameter]) -> str:
    """Forget the optimizer's per-parameter state (Adam moments, step count) of ``params``.

    * A torch optimizer (possibly inside accelerate's ``AcceleratedOptimizer``): ``state[p]`` is removed for each
      ``p`` in ``params``; the next step re-initialises it exactly as for a fresh optimizer.
    * DeepSpeed ZeRO (its base optimizer holds flat fp32 partitions, not the model's parameters): every state tensor
      of the base optimizer is zeroed and its step counts set to 0. That resets *all* trainable parameters; with
      FFA-LoRA (only B trainable) those are exactly the refactorized ones.

    Returns:
        ``"params"``, ``"all"`` (DeepSpeed) or ``"none"`` (no optimizer or nothing to reset).
    """
    chain = _optimizer_chain(optimizer)
    if not chain:
        return "none"
    deepspeed = any(type(o).__module__.startswith("deepspeed") or hasattr(o, "refresh_fp32_params") for o in chain)
    base = chain[-1]
    if not isinstance(base, torch.optim.Optimizer):
        return "none"
    if deepspeed:
        for state in base.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    value.zero_()
                elif key == "step":
                    state[key] = 0
        return "all"
    for p in params:
        base.state.pop(p, None)
    return "params"


@torch.no_grad()
def refactorize_lora_model(
    model: torch.nn.Module,
    optimizer: object | None = None,
    adapter_name: str | None = None,
    pairs: Sequence[LoraPair] | None = None,
) -> dict[str, torch.Tensor]:
    """Refactorize every LoRA pair of ``model`` in place (``B' A' = B A``, ``A'`` with orthonormal rows).

    Every rank must call it (ZeRO-3 gathers); every rank ends with rank 0's values.

    Args:
        model: a PEFT LoRA model (possibly wrapped by DDP/DeepSpeed).
        optimizer: passed on so DeepSpeed's fp32 master weights follow the new values (does not reset its state;
            see :func:`reset_optimizer_state`).
        adapter_name: which adapter (default: the active one).
        pairs: the pairs to use (default: ``find_lora_pairs(model, adapter_name)``).

    Returns:
        ``{module name: singular values (k,)}``, float32, descending.
    """
    pairs = list(find_lora_pairs(model, adapter_name) if pairs is None else pairs)
    if not pairs:
        return {}
    weights = read_lora_weights(pairs)
    names = [p.name for p in pairs]
    new_b, new_a, sv = refactorize(
        [weights[n][1] for n in names], [weights[n][0] for n in names], return_singular_values=True
    )
    assign_lora_weights(pairs, {n: (a, b) for n, a, b in zip(names, new_a, new_b, strict=True)}, optimizer=optimizer)
    return {n: s.float().cpu() for n, s in zip(names, sv, strict=True)}


class FedSVDCallback(TrainerCallback, ExportableState):
    """Every ``every_n_steps`` optimizer steps, replace each LoRA pair by its SVD refactorization (FedSVD, single node).

    Runs in ``on_step_end`` (after the optimizer step and ``zero_grad``). The adapter's function is unchanged, only its
    basis: ``A`` becomes the top right singular vectors of ``B @ A``, ``B`` the left ones scaled by the singular values.

    Args:
        every_n_steps: refactorize when ``state.global_step % every_n_steps == 0`` (so the schedule survives resume
            without restoring callback state).
        reset_optimizer_state: forget the optimizer state (Adam moments) of the refactorized parameters; they refer
            to the old basis. ``False`` keeps them.
        freeze_a: FFA-LoRA, train only ``B``. A is frozen in ``on_init_end`` (before the Trainer wraps the model);
            if the callback is added later, call :func:`freeze_lora_A` yourself before ``Trainer(...)``.
        log_top_singular_values: log this many top singular values per module (``fedsvd/<module>/sigma_<i>``), in the
            Trainer log at each refactorization step (every integration and ``state.log_history``); 0 logs only
            the counters.
        adapter_name: the LoRA adapter (default: the active one).

    State: ``n_refactorizations`` and ``last_step`` are exported with the Trainer state; on resume without
    ``restore_callback_states_from_checkpoint`` they are derived from ``state.global_step``.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        reset_optimizer_state: bool = True,
        freeze_a: bool = True,
        log_top_singular_values: int = 1,
        adapter_name: str | None = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(
                f"every_n_steps must be an int >= 1 (optimizer steps between refactorizations), got {every_n_steps!r}"
            )
        if (
            isinstance(log_top_singular_values, bool)
            or not isinstance(log_top_singular_values, int)
            or log_top_singular_values < 0
        ):
            raise ValueError(f"log_top_singular_values must be an int >= 0, got {log_top_singular_values!r}")
        if not isinstance(reset_optimizer_state, bool):
            raise ValueError(f"reset_optimizer_state must be True or False, got {reset_optimizer_state!r}")
        if not isinstance(freeze_a, bool):
            raise ValueError(f"freeze_a must be True or False, got {freeze_a!r}")
        self.every_n_steps = every_n_steps
        self.reset_optimizer_state = reset_optimizer_state
        self.freeze_a = freeze_a
        self.log_top_singular_values = log_top_singular_values
        self.adapter_name = adapter_name
        self.n_refactorizations = 0
        self.last_step = -1
        self._warned_reset_all = False

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {
            "args": {
                "every_n_steps": self.every_n_steps,
                "reset_optimizer_state": self.reset_optimizer_state,
                "freeze_a": self.freeze_a,
                "log_top_singular_values": self.log_top_singular_values,
                "adapter_name": self.adapter_name,
            },
            "attributes": {"n_refactorizations": self.n_refactorizations, "last_step": self.last_step},
        }

    # ------------------------------------------------------------------ events

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if self.freeze_a and model is not None:
            freeze_lora_A(model, self.adapter_name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        pairs = find_lora_pairs(model, self.adapter_name)
        if not pairs:
            raise ValueError(
                "FedSVDCallback found no LoRA pairs in the model; wrap it with `peft.get_peft_model(model, "
                "LoraConfig(target_modules=[...]))` on Linear layers"
            )
        if self.freeze_a and freeze_lora_A(model, self.adapter_name):
            warnings.warn(
                "FedSVDCallback(freeze_a=True) froze LoRA A only when training began; under DDP/DeepSpeed this is "
                "too late. Call `hf_svd_plugins.fedsvd.freeze_lora_A(model)` before creating the Trainer, or pass "
                "the callback in `Trainer(callbacks=[...])`.",
                stacklevel=2,
            )
        # Derive the counters from the global step (resume without restored callback state).
        k = self.every_n_steps
        if self.last_step < 0 and state.global_step > 0:
            self.n_refactorizations = state.global_step // k
            self.last_step = (state.global_step // k) * k if state.global_step >= k else -1

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or state.global_step % self.every_n_steps != 0 or state.global_step == self.last_step:
            return
        pairs = find_lora_pairs(model, self.adapter_name)
        spectrum = refactorize_lora_model(model, optimizer=optimizer, pairs=pairs)
        if self.reset_optimizer_state:
            params = [p for pair in pairs for p in (pair.A, pair.B)]
            how = reset_optimizer_state(optimizer, params)
            if how == "all" and not self._warned_reset_all:
                trainable = [p for p in model.parameters() if p.requires_grad]
                touched = {id(p) for p in params}
                if any(id(p) not in touched for p in trainable):
                    logger.warning(
                        "FedSVDCallback: DeepSpeed keeps optimizer state in flat partitions; the state of all "
                        "trainable parameters (not only the LoRA ones) was reset."
                    )
                self._warned_reset_all = True
        self.n_refactorizations += 1
        self.last_step = state.global_step
        logs: dict[str, float] = {"fedsvd/refactorizations": float(self.n_refactorizations)}
        top = self.log_top_singular_values
        if top:
            for name, s in spectrum.items():
                for i, v in enumerate(s[:top].tolist()):
                    logs[f"fedsvd/{name}/sigma_{i}"] = float(v)
        # Through Trainer.log, so every reporting integration (TensorBoard, W&B) and log_history see it.
        log_to_trainer(logs)
