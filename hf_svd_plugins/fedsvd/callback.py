"""Single-node FedSVD: refactorize every LoRA pair by SVD every ``k`` optimizer steps, inside any HF Trainer.

The thin adapter around :func:`hf_svd_plugins.fedsvd.core.refactorize`: it finds the pairs and reads, writes and
carries optimizer state through :mod:`hf_svd_plugins.lora` (which handles ZeRO-3 gathering, FSDP2 DTensors,
DDP/ZeRO-2 broadcast and DeepSpeed fp32 master copies), calls the core and writes the results back.
``B' A' == B A``, so the model's function does not change.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_svd_plugins.distributed import broadcast_flag, process_rank
from hf_svd_plugins.fedsvd.checkpoints import (
    LORA_A_FILE,
    checkpoint_mismatch,
    gather_lora_A,
    lora_a_key,
    lora_b_sum_of_squares,
    new_run_id,
    read_lora_A_file,
    recorded_run_id,
    resume_folders,
    save_lora_A_file,
    write_lora_A_file,
)
from hf_svd_plugins.fedsvd.core import basis_change, refactorize, transform_moments
from hf_svd_plugins.lora import (
    LoraPair,
    assign_lora_weights,
    find_lora_pairs,
    full_shape,
    is_zero3_param,
    master_weights_optimizer,
    read_lora_weights,
    read_optimizer_state,
    reset_optimizer_state,
    save_full_adapter,
    write_optimizer_state,
)
from hf_svd_plugins.lora.saving import gathered_adapter_state_dict, save_adapter_state_dict
from hf_svd_plugins.trainer_utils import log_to_trainer

logger = logging.getLogger(__name__)

__all__ = ["LORA_A_FILE", "OPTIMIZER_STATE_POLICIES", "FedSVDCallback", "freeze_lora_A", "read_lora_A_file",
           "refactorize_lora_model", "reset_optimizer_state", "write_lora_A_file"]


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


OPTIMIZER_STATE_POLICIES = ("transform", "reset", "keep")
"""What :class:`FedSVDCallback` does with the optimizer state of the refactorized parameters: ``transform`` carries
first moments exactly and second moments by a diagonal approximation into the new basis
(:func:`~hf_svd_plugins.fedsvd.core.transform_moments`), ``reset`` forgets them, ``keep`` leaves them in the old basis."""

_CHUNK_NUMEL = 1 << 22  # gather and refactorize at most ~4.2M LoRA entries (A and B) at a time


def _chunks(pairs: Sequence[LoraPair]) -> list[list[LoraPair]]:
    """Consecutive groups of pairs with at most ``_CHUNK_NUMEL`` entries each (one pair may exceed it alone)."""
    out: list[list[LoraPair]] = [[]]
    size = 0
    for pair in pairs:
        numel = math.prod(full_shape(pair.A)) + math.prod(full_shape(pair.B))
        if out[-1] and size + numel > _CHUNK_NUMEL:
            out.append([])
            size = 0
        out[-1].append(pair)
        size += numel
    return [c for c in out if c]


@torch.no_grad()
def refactorize_lora_model(
    model: torch.nn.Module,
    optimizer: object | None = None,
    adapter_name: str | None = None,
    pairs: Sequence[LoraPair] | None = None,
    optimizer_state: str = "keep",
) -> dict[str, torch.Tensor]:
    """Refactorize every LoRA pair of ``model`` in place (``B' A' = B A``, ``A'`` with orthonormal rows).

    Every rank must call it (ZeRO-3 and FSDP2 gather); every rank ends with rank 0's values. The SVD runs in float64
    on the gathered weights (on DeepSpeed's fp32 masters of the trainable ones, not their 16-bit copies) and each
    parameter is written once: one cast to its dtype, and the masters get the float32 values. Pairs are processed in
    chunks of at most ~4.2M entries (``(d_out + d_in) r`` per pair), so the transient memory is a few float64 copies
    of one chunk whatever the model size.

    Args:
        model: a PEFT LoRA model (possibly wrapped by DDP/DeepSpeed, or sharded by FSDP2).
        optimizer: the training optimizer: DeepSpeed's fp32 master weights follow the new values, and its state is
            handled by ``optimizer_state``.
        adapter_name: which adapter (default: the active one).
        pairs: the pairs to use (default: ``find_lora_pairs(model, adapter_name)``).
        optimizer_state: one of :data:`OPTIMIZER_STATE_POLICIES` (default ``"keep"``: the state is not touched).

    Returns:
        ``{module name: singular values (k,)}``, float32, descending.
    """
    if optimizer_state not in OPTIMIZER_STATE_POLICIES:
        raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_POLICIES}, got {optimizer_state!r}")
    pairs = list(find_lora_pairs(model, adapter_name) if pairs is None else pairs)
    spectrum: dict[str, torch.Tensor] = {}
    for chunk in _chunks(pairs):
        weights = read_lora_weights(chunk, optimizer)
        names = [p.name for p in chunk]
        new_b, new_a, sv = refactorize(
            [weights[n][1].double() for n in names], [weights[n][0].double() for n in names],
            return_singular_values=True,
        )
        assign_lora_weights(chunk, {n: (a, b) for n, a, b in zip(names, new_a, new_b, strict=True)}, optimizer)
        if optimizer_state == "transform":
            _transform_state(optimizer, chunk, [weights[n][0] for n in names], new_a)
        elif optimizer_state == "reset":
            reset_optimizer_state(optimizer, [p for pair in chunk for p in (pair.A, pair.B) if p.requires_grad])
        spectrum.update({n: s.float().cpu() for n, s in zip(names, sv, strict=True)})
    return spectrum


def _transform_state(
    optimizer: object | None, pairs: Sequence[LoraPair], old_a: Sequence[torch.Tensor], new_a: Sequence[torch.Tensor]
) -> None:
    """Carry the optimizer moments of each pair's trainable B (and A) into the refactorized basis."""
    params, factors, maps = [], [], []
    for pair, a_old, a_new in zip(pairs, old_a, new_a, strict=True):
        # gradients are taken at the stored A (the parameter's dtype, also when a master copy is fp32)
        t, w = basis_change(a_old.to(pair.A.dtype), a_new.to(pair.A.dtype))
        for param, factor in ((pair.B, "B"), (pair.A, "A")):
            if param.requires_grad:
                params.append(param)
                factors.append(factor)
                maps.append((t, w))
    states = read_optimizer_state(optimizer, params)
    new_states = [
        transform_moments(state, factor, t, w) if state else {}
        for state, factor, (t, w) in zip(states, factors, maps, strict=True)
    ]
    write_optimizer_state(optimizer, params, new_states)


def _under_deepspeed(args) -> bool:
    from accelerate.utils import DistributedType

    state = getattr(args, "distributed_state", None)
    return state is not None and state.distributed_type == DistributedType.DEEPSPEED


class FedSVDCallback(TrainerCallback, ExportableState):
    """Every ``every_n_steps`` optimizer steps, replace each LoRA pair by its SVD refactorization (FedSVD, single node).

    Runs in ``on_step_end`` (after the optimizer step and ``zero_grad``). The adapter's function is unchanged, only its
    basis: ``A`` becomes the top right singular vectors of ``B @ A``, ``B`` the left ones scaled by the singular values.

    Args:
        every_n_steps: refactorize when ``state.global_step % every_n_steps == 0`` (so the schedule survives resume
            without restoring callback state). Default 50 (see docs/fedsvd.md for the measurement).
        optimizer_state: what happens to the optimizer state of the refactorized parameters, whose moments refer to
            the old basis: ``"transform"`` (default) carries first moments exactly into the new basis (with A frozen)
            and second moments by a diagonal approximation
            (:func:`~hf_svd_plugins.fedsvd.core.transform_moments`); ``"reset"`` forgets them (Adam restarts, so
            its next update is ``lr * sign(g)``; under DeepSpeed every trainable parameter is reset); ``"keep"``
            leaves them as they are.
        freeze_a: FFA-LoRA, train only ``B``. A is frozen in ``on_init_end`` (before the Trainer wraps the model);
            if the callback is added later, call :func:`freeze_lora_A` yourself before ``Trainer(...)``.
        log_top_singular_values: log this many top singular values per module (``fedsvd/<module>/sigma_<i>``), in the
            Trainer log at each refactorization step (every integration and ``state.log_history``); 0 logs only
            the counters.
        adapter_name: the LoRA adapter (default: the active one).
        reset_optimizer_state: deprecated, use ``optimizer_state``: True is ``"reset"``, False is ``"keep"``.

    State: ``n_refactorizations``, ``last_step`` and ``run_id`` are exported with the Trainer state (so they are in
    every checkpoint's ``trainer_state.json``); on resume without ``restore_callback_states_from_checkpoint`` the
    counters are derived from ``state.global_step`` and ``run_id`` is read from the resumed ``state.stateful_callbacks``.

    Checkpoints: ``on_save`` writes every A into the checkpoint folder (:data:`LORA_A_FILE`, with ``run_id``: a random
    id drawn at a fresh start and kept across resumes) and, under ZeRO-3 with a frozen A, rewrites the folder's adapter
    with the whole adapter (transformers leaves frozen weights out of both its DeepSpeed checkpoint and its ZeRO-3
    adapter). It writes only into ``{output_dir}/checkpoint-{global_step}`` when that folder's ``trainer_state.json``
    records this step and run; under ``Trainer.hyperparameter_search`` (per-trial folders callbacks are not told) it
    writes nothing and warns once. On resume, ``on_train_begin`` writes the saved A back (the DeepSpeed checkpoint
    brought back the initial one) if the file has the resumed step and run id, or, under DeepSpeed after the first
    refactorization, warns. It looks in ``TrainingArguments.resume_from_checkpoint``, then
    ``{output_dir}/checkpoint-{global_step}``: resuming from any other folder, set
    ``TrainingArguments(resume_from_checkpoint=folder)`` as well as ``train(resume_from_checkpoint=folder)``.
    ``on_train_end`` does the same for ``load_best_model_at_end`` (the best checkpoint's B next to the last A). For
    the final adapter under ZeRO-3 use :func:`~hf_svd_plugins.lora.save_full_adapter` instead of
    ``trainer.save_model``.

    Push to Hub: the Trainer uploads each checkpoint (``_push_from_checkpoint``, in the background) *before* any
    callback's ``on_save``. With ``push_to_hub`` the callback therefore gathers A (and under ZeRO-3 the adapter) in
    ``on_step_end``/``on_epoch_end`` once a save is announced (``control.should_save``; with ``save_strategy="best"``
    at every evaluation), and writes it in ``on_push_begin``, between the Trainer's save and its upload; ``on_save``
    then writes only what no push wrote. ``Trainer.push_to_hub()`` at the end saves through ``save_model`` (under
    ZeRO-3 without ``lora_A``; warned once): push the folder written by ``save_full_adapter`` instead.
    """

    writes_lora_weights = True  # see hf_svd_plugins.trainer_utils.writes_lora_weights (federations refuse it)

    def __init__(
        self,
        every_n_steps: int = 50,
        optimizer_state: str = "transform",
        freeze_a: bool = True,
        log_top_singular_values: int = 1,
        adapter_name: str | None = None,
        reset_optimizer_state: bool | None = None,
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
        if reset_optimizer_state is not None:
            if not isinstance(reset_optimizer_state, bool):
                raise ValueError(f"reset_optimizer_state must be True or False, got {reset_optimizer_state!r}")
            warnings.warn(
                "FedSVDCallback(reset_optimizer_state=...) is deprecated; pass optimizer_state='reset' or 'keep' "
                "(the default 'transform' carries the moments into the new basis)",
                FutureWarning,
                stacklevel=2,
            )
            optimizer_state = "reset" if reset_optimizer_state else "keep"
        if optimizer_state not in OPTIMIZER_STATE_POLICIES:
            raise ValueError(
                f"optimizer_state must be one of {', '.join(map(repr, OPTIMIZER_STATE_POLICIES))}, "
                f"got {optimizer_state!r}"
            )
        if not isinstance(freeze_a, bool):
            raise ValueError(f"freeze_a must be True or False, got {freeze_a!r}")
        self.every_n_steps = every_n_steps
        self.optimizer_state = optimizer_state
        self.freeze_a = freeze_a
        self.log_top_singular_values = log_top_singular_values
        self.adapter_name = adapter_name
        self.n_refactorizations = 0
        self.last_step = -1
        self.run_id: str | None = None  # set in on_train_begin: new at step 0, the checkpoint's on resume
        self._warned_reset_all = False
        self._warned_hp_search = False
        self._gathered_step = -1  # the step whose checkpoint files were gathered before the Trainer's save and push
        self._for_push: dict | None = None  # those files' contents, on the ranks that write

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {
            "args": {
                "every_n_steps": self.every_n_steps,
                "optimizer_state": self.optimizer_state,
                "freeze_a": self.freeze_a,
                "log_top_singular_values": self.log_top_singular_values,
                "adapter_name": self.adapter_name,
            },
            "attributes": {"n_refactorizations": self.n_refactorizations, "last_step": self.last_step,
                           "run_id": self.run_id},
        }

    # ------------------------------------------------------------------ events

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if self.freeze_a and model is not None:
            freeze_lora_A(model, self.adapter_name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._gathered_step, self._for_push = -1, None  # a callback reused by a second train() starts clean
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
                "FedSVDCallback(freeze_a=True) froze LoRA A only when training began; under DDP/DeepSpeed/FSDP this "
                "is too late. Call `hf_svd_plugins.fedsvd.freeze_lora_A(model)` before creating the Trainer, or pass "
                "the callback in `Trainer(callbacks=[...])`.",
                stacklevel=2,
            )
        if args.push_to_hub and process_rank() == 0 and any(is_zero3_param(p.A) and not p.A.requires_grad for p in pairs):
            warnings.warn(
                "FedSVDCallback with push_to_hub under ZeRO-3: the checkpoints it pushes get the whole adapter, but "
                "Trainer.push_to_hub() saves the adapter through save_model, without the frozen lora_A "
                "(PeftModel.from_pretrained would keep a random A). Push the final adapter saved with "
                "`save_full_adapter(trainer, d)` instead (rank 0: `huggingface_hub.upload_folder(repo_id=..., "
                "folder_path=d)`).",
                stacklevel=2,
            )
        # The counters follow from the global step (the schedule is `step % k == 0`): this equals restored callback
        # state, and a callback reused for another train() does not carry the previous run's counters.
        k = self.every_n_steps
        self.n_refactorizations = state.global_step // k
        self.last_step = (state.global_step // k) * k if state.global_step >= k else -1
        if state.global_step == 0:
            self.run_id = new_run_id()
            return
        # resumed: transformers has loaded the checkpoint (and its trainer_state.json into `state`) by now
        self.run_id = recorded_run_id(state.stateful_callbacks, type(self).__name__, self.adapter_name)
        self._restore_lora_a(args, resume_folders(args, state), state.global_step, model, kwargs.get("optimizer"),
                             pairs, "resuming")
        if self.run_id is None:  # a checkpoint from before run ids: the checkpoints from here on get one
            self.run_id = new_run_id()

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return
        if state.is_hyper_param_search:
            # the Trainer saved into output_dir/run-<trial>/checkpoint-N; callbacks are not told the trial's folder
            if not self._warned_hp_search and process_rank() == 0:
                logger.warning(
                    "FedSVDCallback: under Trainer.hyperparameter_search the checkpoints go to per-trial folders that "
                    "callbacks cannot see, so %s is not written into them: a DeepSpeed resume from a trial checkpoint "
                    "would bring back the initial LoRA A", LORA_A_FILE,
                )
            self._warned_hp_search = True
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        why = ""
        if process_rank() == 0:
            why = checkpoint_mismatch(folder, state.global_step, type(self).__name__, self.adapter_name, self.run_id)
        if broadcast_flag(bool(why)):  # never write into a folder that is not the checkpoint just saved
            if process_rank() == 0:
                logger.warning(
                    "FedSVDCallback: %s is not the checkpoint the Trainer just saved (%s); LoRA A not saved with it, a "
                    "DeepSpeed resume from that checkpoint would bring back the initial A", folder, why,
                )
            self._for_push = None
            return
        if self._gathered_step == state.global_step:  # every rank: gathered in on_step_end/on_epoch_end
            self._write_gathered(args, state, model)  # unless on_push_begin wrote it already
            return
        pairs = find_lora_pairs(model, self.adapter_name)
        write_lora_A_file(pairs, folder, state.global_step, optimizer, write=bool(args.should_save), run_id=self.run_id)
        if any(is_zero3_param(p.A) and not p.A.requires_grad for p in pairs):
            # transformers wrote the checkpoint's adapter from a ZeRO-3 consolidation without frozen weights
            save_full_adapter(model, folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # load_best_model_at_end under DeepSpeed loads the best checkpoint without frozen parameters, before this event:
        # its B now sits next to the last A
        if model is not None and args.load_best_model_at_end and state.best_model_checkpoint is not None:
            step = state.best_global_step
            if step is None:  # states saved before transformers recorded it: the folder name has it
                step = int(os.path.basename(os.path.normpath(state.best_model_checkpoint)).rsplit("-", 1)[-1])
            pairs = find_lora_pairs(model, self.adapter_name)
            self._restore_lora_a(args, [state.best_model_checkpoint], step, model, kwargs.get("optimizer"), pairs,
                                 "loading the best checkpoint")

    def _restore_lora_a(
        self, args, folders: Sequence[str], step: int, model, optimizer, pairs: Sequence[LoraPair], event: str
    ) -> None:
        """Write the A saved with the checkpoint of ``step`` (the first of ``folders`` that has it) back into the
        model (rank 0 reads; every rank calls), or warn under DeepSpeed."""
        values, reasons, problem = None, [], ""
        b_sum_of_squares = lora_b_sum_of_squares(pairs, optimizer)  # B as the checkpoint loader left it
        if process_rank() == 0:
            for folder in folders:
                values, why = read_lora_A_file(folder, step, b_sum_of_squares, self.run_id)
                if values is not None:
                    break
                reasons.append(why)
            if values is not None:
                missing = [lora_a_key(p) for p in pairs if lora_a_key(p) not in values]
                wrong = [lora_a_key(p) for p in pairs if lora_a_key(p) in values
                         and tuple(values[lora_a_key(p)].shape) != full_shape(p.A)]
                if missing or wrong:
                    problem = f"missing {missing[:3]}, wrong shape {wrong[:3]}"
        if broadcast_flag(values is not None):
            if broadcast_flag(bool(problem)):
                raise ValueError(
                    f"{LORA_A_FILE} of the checkpoint of step {step} does not fit the model's LoRA pairs "
                    f"({problem or 'see rank 0'}): resume with the same LoraConfig (r, target_modules) and adapter_name"
                )
            assign_lora_weights(
                pairs, {p.name: (values[lora_a_key(p)] if values is not None else p.A.new_zeros(full_shape(p.A)), None)
                        for p in pairs}, optimizer,
            )
            return
        refactorized = step >= self.every_n_steps  # before the first refactorization A is the initial A anyway
        if refactorized and process_rank() == 0 and _under_deepspeed(args) and any(not p.A.requires_grad for p in pairs):
            warnings.warn(
                f"FedSVDCallback: {event} at step {step} under DeepSpeed, but no {LORA_A_FILE} for that step was "
                f"found ({'; '.join(reasons)}). transformers' DeepSpeed checkpoint leaves frozen parameters out, so "
                "LoRA's A is not the refactorized A that the checkpoint's B was trained with (on resume it is the one "
                "the model was created with): the adapter's function B @ A is not the checkpoint's. Use a checkpoint "
                f"written by this version of FedSVDCallback, in `{args.output_dir}/checkpoint-<step>`, or set "
                "`TrainingArguments.resume_from_checkpoint` to the folder you pass to `train()`.",
                stacklevel=2,
            )

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return
        if state.global_step % self.every_n_steps == 0 and state.global_step != self.last_step:
            self._refactorize(state, model, optimizer)
        self._gather_before_push(args, state, control, model, optimizer)

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None:
            self._gather_before_push(args, state, control, model, optimizer)

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        # rank 0 only, inside Trainer._save_checkpoint: the checkpoint is on disk, its upload not started yet
        self._write_gathered(args, state, model)

    def _gather_before_push(self, args, state, control, model, optimizer) -> None:
        """With ``push_to_hub`` the Trainer uploads a checkpoint before ``on_save``; ``on_push_begin`` comes first but
        runs on rank 0 alone (no gather possible), so gather on every rank now, when a save is announced, what
        ``on_save`` would write (A, and under ZeRO-3 with a frozen A the whole adapter)."""
        if not args.push_to_hub or args.hub_strategy == "end" or state.is_hyper_param_search:
            return
        if self._gathered_step == state.global_step or not (
            control.should_save or (args.save_strategy == "best" and control.should_evaluate)
        ):
            return
        pairs = find_lora_pairs(model, self.adapter_name)
        values, b_sum = gather_lora_A(pairs, optimizer, keep=bool(args.should_save))
        adapter = None
        if any(is_zero3_param(p.A) and not p.A.requires_grad for p in pairs):
            adapter = gathered_adapter_state_dict(model)
        self._gathered_step = state.global_step
        self._for_push = None if values is None else {
            "step": state.global_step, "adapter_name": pairs[0].adapter, "a": values, "b_sum": b_sum,
            "adapter": adapter,
        }

    def _write_gathered(self, args, state, model) -> None:
        """Write what :meth:`_gather_before_push` gathered into the checkpoint just saved (this process only)."""
        pending = self._for_push
        if pending is None or pending["step"] != state.global_step:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if checkpoint_mismatch(folder, state.global_step, type(self).__name__, self.adapter_name, self.run_id):
            return  # on_save says why
        self._for_push = None
        save_lora_A_file(pending["a"], folder, pending["step"], pending["adapter_name"], pending["b_sum"], self.run_id)
        if pending["adapter"] is not None:
            save_adapter_state_dict(model, folder, pending["adapter"])

    def _refactorize(self, state, model, optimizer) -> None:
        pairs = find_lora_pairs(model, self.adapter_name)
        spectrum = refactorize_lora_model(model, optimizer=optimizer, pairs=pairs, optimizer_state=self.optimizer_state)
        if self.optimizer_state == "reset" and not self._warned_reset_all:
            self._warn_if_reset_all(model, optimizer, pairs)
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

    def _warn_if_reset_all(self, model, optimizer, pairs) -> None:
        self._warned_reset_all = True
        if master_weights_optimizer(optimizer) is None:
            return
        touched = {id(p) for pair in pairs for p in (pair.A, pair.B)}
        if any(p.requires_grad and id(p) not in touched for p in model.parameters()):
            logger.warning(
                "FedSVDCallback(optimizer_state='reset'): DeepSpeed keeps optimizer state in flat partitions; the "
                "state of all trainable parameters (not only the LoRA ones) was reset."
            )
