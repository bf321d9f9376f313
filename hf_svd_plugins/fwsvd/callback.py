"""``FisherCallback``: the Fisher importances FWSVD needs, from the Trainer's own batches, and optional compression.

Two modes:

* ``"train"``: the hooks of :class:`~hf_svd_plugins.fwsvd.fisher.FisherAccumulator` read the Trainer's own forward
  and backward passes over the last part of training: no extra compute beyond turning the token embeddings' output
  into a graph input. Per-example gradients are recovered from the batched backward (see
  :mod:`hf_svd_plugins.fwsvd.fisher`): whatever scales the loss before ``backward`` (gradient accumulation, fp16 loss
  scaling, DeepSpeed, ``num_items_in_batch``) is divided out.
* ``"end"``: at ``on_train_end``, a pass over ``max_batches`` batches of the train dataloader on the fine-tuned
  weights (eval mode, one extra forward and backward per batch, no ``.grad`` touched).

Under DDP, DeepSpeed ZeRO-2/3 and FSDP2 every rank reads its own batches; the sums are all-reduced, so every rank ends
with the Fisher of all ranks' batches. The hooks read layer inputs and output gradients, which are whole under every
layout (only weights are sharded), so the Fisher pass never gathers a weight. In ``"train"`` mode the sums are reduced after every recorded optimizer step into
rank 0 (the other ranks restart from zero, so nothing is counted twice) and saved with every checkpoint
(``TrainerState.stateful_callbacks``, float64 as base64): resuming continues the same sums.
"""

from __future__ import annotations

import base64
import logging
import math
import os

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_svd_plugins.distributed import all_reduce_sum_, process_rank
from hf_svd_plugins.fwsvd.core import DEFAULT_CHUNK_BYTES
from hf_svd_plugins.fwsvd.fisher import FisherAccumulator, run_fisher_passes
from hf_svd_plugins.fwsvd.targets import Targets, select_targets
from hf_svd_plugins.lora import unwrap_model
from hf_svd_plugins.trainer_utils import log_to_trainer

logger = logging.getLogger(__name__)

MODES = ("train", "end")


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().cpu().to(torch.float64).numpy().astype("<f8").tobytes()).decode("ascii")


def _decode(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype="<f8").copy())


class FisherCallback(TrainerCallback, ExportableState):
    """Accumulate FWSVD's Fisher importances ``{layer: (d_in,)}`` inside any Trainer; optionally compress at the end.

    Args:
        targets: the layers (see :func:`~hf_svd_plugins.fwsvd.targets.select_targets`); default every Linear/Conv1D
            of the repeated blocks. In a PEFT model, adapted layers are read at the LoRA layer (merged weight).
        mode: ``"train"`` (read the Trainer's own batches during the last part of training) or ``"end"`` (one pass
            over the train dataloader at ``on_train_end``).
        max_batches: ``"train"``: the micro-batches of the last ``ceil(max_batches / gradient_accumulation_steps)``
            optimizer steps, at most ``max_batches`` per process (None: the whole run); ``"end"``: batches per
            process (None: one epoch of the train dataloader).
        per_example: the paper's per-example estimator (True) or squared mini-batch gradients (False), see
            :func:`~hf_svd_plugins.fwsvd.fisher.estimate_fisher`.
        compress_ratio: if set, at ``on_train_end`` compress a copy of the model (adapters merged) with
            ``fwsvd_compress(method=compress_method, ratio=compress_ratio)`` and ``save_pretrained`` it to
            ``output_dir`` (with the tokenizer). The Trainer's model is left unchanged. Under ZeRO-3 and FSDP2 the
            weights are gathered one at a time into a CPU copy on rank 0, which compresses and saves (FSDP1's
            flattened weights are refused at ``on_train_begin``).
        compress_method: ``"fisher"`` or ``"svd"``.
        output_dir: where the compressed model is saved (required with ``compress_ratio``).

    After training, ``callback.fisher`` holds the sums on every rank and ``callback.report`` the compression report
    (rank 0). The callback reads the training batches (``reads_train_data``): ``DPTrainer`` refuses it.
    """

    reads_train_data = True

    def __init__(self, targets: Targets = None, mode: str = "train", max_batches: int | None = None,
                 per_example: bool = True, compress_ratio: float | None = None, compress_method: str = "fisher",
                 output_dir: str | os.PathLike | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 1):
            raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
        if not isinstance(per_example, bool):
            raise ValueError(f"per_example must be True or False, got {per_example!r}")
        if compress_ratio is not None:
            if isinstance(compress_ratio, bool) or not isinstance(compress_ratio, (int, float)) or not 0 < compress_ratio <= 1:
                raise ValueError(f"compress_ratio must be in (0, 1] (fraction of each layer's weights kept), got "
                                 f"{compress_ratio!r}")
            if output_dir is None:
                raise ValueError("compress_ratio needs output_dir= (where the compressed model is saved)")
        elif output_dir is not None:
            raise ValueError("output_dir is where the compressed model goes: pass compress_ratio= as well")
        if compress_method not in ("fisher", "svd"):
            raise ValueError(f"compress_method must be 'fisher' or 'svd', got {compress_method!r}")
        self.targets = targets
        self.mode = mode
        self.max_batches = max_batches
        self.per_example = per_example
        self.compress_ratio = compress_ratio
        self.compress_method = compress_method
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.chunk_bytes = chunk_bytes
        self.fisher: dict[str, torch.Tensor] | None = None
        self.examples = 0
        self.batches = 0
        self.report = None
        self._accumulator: FisherAccumulator | None = None
        self._restored: dict | None = None
        self._start_step = 0

    # ------------------------------------------------------------------ checkpoint state

    def _args(self) -> dict:
        targets = self.targets if isinstance(self.targets, (str, type(None))) else list(self.targets)
        return {"targets": targets, "mode": self.mode, "max_batches": self.max_batches, "per_example": self.per_example}

    def state(self) -> dict:
        acc = self._accumulator
        sums = {} if acc is None else {name: _encode(s) for name, s in acc.sums.items()}
        return {
            "args": self._args(),
            "attributes": {"sums": sums, "examples": 0 if acc is None else acc.examples,
                           "batches": 0 if acc is None else acc.batches,
                           "local_batches": 0 if acc is None else acc.local_batches},
        }

    def _saved_state(self, state) -> dict | None:
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):  # several FisherCallbacks in one Trainer: the one with the same arguments
            saved = next((entry for entry in saved if entry.get("args") == self._args()), None)
        return (saved or {}).get("attributes") if state.global_step > 0 else None

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("FisherCallback needs the Trainer's model; is it attached to a transformers.Trainer?")
        if self.mode == "train":
            if getattr(args, "gradient_checkpointing", False):
                raise ValueError("FisherCallback(mode='train') reads each layer's forward once per backward; "
                                 "gradient checkpointing re-runs forwards: use mode='end' or turn it off")
            if getattr(args, "label_smoothing_factor", 0.0):
                raise ValueError("FisherCallback(mode='train') needs the model's own loss, but label_smoothing_factor "
                                 f"={args.label_smoothing_factor} replaces it: use mode='end'")
        inner = unwrap_model(model)
        if self.compress_ratio is not None:
            from hf_svd_plugins.fwsvd.compress import refuse_fsdp1

            refuse_fsdp1(inner)  # before training, not after it
        layers = select_targets(inner, self.targets)
        self._accumulator = FisherAccumulator(inner, layers, per_example=self.per_example,
                                              chunk_bytes=self.chunk_bytes)
        saved = self._saved_state(state)
        if saved and saved.get("sums"):
            self._restore(saved)
        if self.mode == "train":
            if self.max_batches is None:
                self._start_step = 0
            else:
                steps = math.ceil(self.max_batches / max(1, args.gradient_accumulation_steps))
                self._start_step = max(0, state.max_steps - steps)
            self._accumulator.limit = self.max_batches
            self._accumulator.recording = state.global_step >= self._start_step
            self._accumulator.attach()

    def _restore(self, saved: dict) -> None:
        acc = self._accumulator
        unknown = sorted(set(saved["sums"]) - set(acc.sums))
        if unknown:
            raise ValueError(f"the checkpoint's Fisher sums name layers this model does not target: {unknown[:3]}")
        if process_rank() == 0:  # rank 0 carries the global sums, the others restart from zero
            for name, encoded in saved["sums"].items():
                acc.sums[name].copy_(_decode(encoded))
            acc.examples, acc.batches = int(saved["examples"]), int(saved["batches"])
        else:
            acc.examples = acc.batches = 0
        acc.local_batches = int(saved.get("local_batches", 0))  # every process records as many micro-batches

    def on_step_end(self, args, state, control, **kwargs):
        if self.mode != "train" or self._accumulator is None:
            return
        if state.global_step - 1 >= self._start_step:
            self._reduce_into_rank0()
        self._accumulator.recording = state.global_step >= self._start_step

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, processing_class=None,
                     **kwargs):
        acc = self._accumulator
        if acc is None:
            return
        if self.mode == "end":
            loader = train_dataloader
            if loader is None:
                raise ValueError("FisherCallback(mode='end') found no train dataloader")
            acc.attach()
            try:
                run_fisher_passes(acc.model, acc, loader, self.max_batches)
            finally:
                acc.detach()
        else:
            acc.detach()
        # the local sums of all ranks add up to the global ones (after a reduction rank 0 holds them, the others 0)
        sums = [s.clone() for s in acc.sums.values()]
        counts = torch.tensor([float(acc.examples), float(acc.batches)], dtype=torch.float64)
        all_reduce_sum_([*sums, counts])
        self.fisher = {name: s.cpu() for name, s in zip(acc.sums, sums, strict=True)}
        self.examples, self.batches = int(counts[0]), int(counts[1])
        if self.batches == 0:
            raise ValueError(f"FisherCallback(mode={self.mode!r}) read no batch; check max_batches and max_steps")
        log_to_trainer({"fwsvd/fisher_examples": float(self.examples), "fwsvd/fisher_batches": float(self.batches)})
        if self.compress_ratio is not None:
            self._compress_and_save(model, processing_class)

    def _reduce_into_rank0(self) -> None:
        """All-reduce the local sums; rank 0 keeps the totals, the other ranks restart from zero."""
        acc = self._accumulator
        counts = torch.tensor([float(acc.examples), float(acc.batches)], dtype=torch.float64)
        tensors = [*acc.sums.values(), counts]
        all_reduce_sum_(tensors)
        if process_rank() != 0:
            for s in acc.sums.values():
                s.zero_()
            acc.examples = acc.batches = 0
        else:
            acc.examples, acc.batches = int(counts[0]), int(counts[1])

    def _compress_and_save(self, model, processing_class) -> None:
        import copy

        from hf_svd_plugins.fwsvd.compress import fwsvd_compress
        from hf_svd_plugins.lora import is_sharded

        inner = unwrap_model(model)
        sharded = any(is_sharded(p) for p in inner.parameters())
        target = inner if sharded else copy.deepcopy(inner)  # ZeRO-3/FSDP2: fwsvd_compress gathers a copy on rank 0
        importance = self.fisher if self.compress_method == "fisher" else None
        self.report = fwsvd_compress(target, self.compress_method, importance=importance, ratio=self.compress_ratio,
                                     targets=self.targets, progress=False)
        if process_rank() == 0 and self.report.model is not None:
            self.report.model.save_pretrained(self.output_dir)
            if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                processing_class.save_pretrained(self.output_dir)
            logger.info("FWSVD: saved the compressed model to %s: %s", self.output_dir, self.report.summary())
            log_to_trainer(self.report.log_metrics())
        from hf_svd_plugins.distributed import is_distributed

        if is_distributed():
            import torch.distributed as dist

            dist.barrier()

