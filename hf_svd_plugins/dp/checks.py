"""Refusals: what breaks the DP guarantee is stopped with a ``ValueError`` that names the fix.

At construction (before any training work): settings that change what is clipped (fp16 loss scaling, sharded
parameters) or couple an example to its batch (NEFTune's noise, scaled by the padded length), a loss the per-example computation would silently ignore (``compute_loss_func``, an overridden
``compute_loss``), modules that couple examples (BatchNorm), callbacks that write an un-noised function of the private
batches into the model (EVA on the training data, or on a loader over the training set), data sets without ``len()``.
When a callback is added, at every step begin and before every release: those callbacks again.
At train begin and before every optimizer step: the trainable parameters and the optimizer's must be exactly the
privatised ones and no other parameter may carry a gradient (a parameter unfrozen after construction would
otherwise train on raw gradients, or be silently left untrained), and no saved buffer of the model may have changed
(a running statistic computed from private data).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hf_svd_plugins.dp.config import DPConfig
from hf_svd_plugins.dp.per_sample import unsupported_for_hooks
from hf_svd_plugins.trainer_utils import reads_train_data


def check_trainer_features(trainer, cfg: DPConfig) -> None:
    """fp16, FSDP, DeepSpeed ZeRO-3 / hooks under DeepSpeed, NEFTune, ``compute_loss_func``, an overridden
    ``compute_loss``."""
    if getattr(trainer.args, "fp16", False):
        raise ValueError(
            "fp16=True is not supported under DP: loss scaling would scale per-example gradients before clipping; "
            "use bf16=True or float32"
        )
    if trainer.is_fsdp_enabled:
        raise ValueError(
            "DPTrainer does not support FSDP (sharded parameters): run with DDP (`accelerate launch --multi_gpu`), "
            "DeepSpeed ZeRO-1/2, or a single process"
        )
    if trainer.is_deepspeed_enabled:
        plugin = trainer.accelerator.state.deepspeed_plugin
        if plugin.zero_stage == 3:
            raise ValueError(
                "DPTrainer does not support DeepSpeed ZeRO-3: per-example gradients need the full weights on every "
                "rank; use ZeRO-2 (or ZeRO-1, or DDP)"
            )
        if cfg.per_sample_method == "hooks":
            raise ValueError(
                "per_sample_method='hooks' does not work under DeepSpeed (its backward would trigger DeepSpeed's "
                "gradient reduction hooks); use 'vmap' or 'loop'"
            )
    if getattr(trainer.args, "neftune_noise_alpha", None) is not None:
        raise ValueError(
            f"neftune_noise_alpha={trainer.args.neftune_noise_alpha!r} is not supported under DP: NEFTune scales its "
            "embedding noise by the batch's padded length, so one example's gradient depends on how long the other "
            "examples of its batch are; set neftune_noise_alpha=None"
        )
    if trainer.compute_loss_func is not None:
        raise ValueError(
            "compute_loss_func is not supported by DPTrainer: the per-example loss is set by DPConfig.loss_type"
        )
    check_compute_loss(trainer)


def _is_stock_compute_loss(owner: type) -> bool:
    from transformers import Trainer

    return owner is Trainer or (owner.__name__ == "SFTTrainer" and owner.__module__.split(".")[0] == "trl")


def check_compute_loss(trainer) -> None:
    """Refuse a Trainer subclass that overrides ``compute_loss``: DP never calls it (each example's loss comes from
    the model's logits per ``DPConfig.loss_type``), so the override would silently not be trained. Trainer's and
    TRL SFTTrainer's own are fine (SFTConfig.loss_type other than "nll" is refused by DPSFTTrainer)."""
    owner = next((cls for cls in type(trainer).__mro__ if "compute_loss" in vars(cls)), None)
    if owner is not None and not _is_stock_compute_loss(owner):
        raise ValueError(
            f"{owner.__qualname__}.compute_loss is never called under DP: each example's loss is computed from the "
            "model's logits (DPConfig.loss_type='causal_lm', 'token' or 'sequence', mean over the example's own "
            "targets), so this override would silently not be trained. Remove it, or express the objective "
            "through labels (-100 for positions without a loss) and DPConfig.loss_type"
        )


def check_no_batch_statistics(model: nn.Module) -> None:
    """Refuse every BatchNorm (whatever its mode: in train mode it mixes the examples of a batch, and its running
    statistics are updated from private data whenever the Trainer puts the model in train mode) and every norm that
    tracks running statistics. Opacus refuses BatchNorm the same way."""
    for name, module in model.named_modules():
        batch_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        tracking = isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
        if batch_norm or tracking:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) normalises with batch statistics or tracks running "
                "statistics: that mixes examples and writes un-noised statistics of the private data into the "
                "model, whatever train/eval mode it is in now; replace it with GroupNorm or LayerNorm "
                "(opacus.validators.ModuleValidator.fix(model) does this)"
            )


def check_per_sample_method(model: nn.Module, cfg: DPConfig, checkpointing: bool) -> None:
    """Activation checkpointing only with ``loop``; ``hooks`` only if Opacus has a grad sampler for every trainable
    layer."""
    if checkpointing and cfg.per_sample_method in ("vmap", "hooks"):
        raise ValueError(
            f"per_sample_method={cfg.per_sample_method!r} is not exact with activation (gradient) checkpointing: "
            "the forward recomputed inside backward breaks Opacus hooks and torch.func; set "
            "activation_checkpointing=False (and gradient_checkpointing=False) or per_sample_method='loop'"
        )
    if cfg.per_sample_method == "hooks":
        bad = unsupported_for_hooks(model)
        if bad:
            raise ValueError(
                f"per_sample_method='hooks': Opacus has no grad sampler for trainable layers {bad[:5]}; "
                "use per_sample_method='vmap' or 'loop'"
            )


def check_dataset(dataset: object) -> int:
    """``N`` of a map-style data set with ``len()``; ``ValueError`` otherwise."""
    if dataset is None or not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
        raise ValueError("DPTrainer needs a map-style train_dataset with len() (Poisson sampling and accounting need N)")
    return len(dataset)


def _datasets_under(obj: object, depth: int = 0) -> Iterable[object]:
    """``obj`` and what it wraps: a DataLoader's ``dataset``, a ``Subset``'s, a ``ConcatDataset``'s parts."""
    if obj is None or depth > 8:
        return
    yield obj
    inner = getattr(obj, "dataset", None)
    if inner is not None and inner is not obj:
        yield from _datasets_under(inner, depth + 1)
    for part in getattr(obj, "datasets", None) or ():
        yield from _datasets_under(part, depth + 1)


def shares_dataset(obj: object, dataset: object) -> bool:
    """Whether ``obj`` (a DataLoader or data set) reads ``dataset``: the same object, wrapped (``Subset``,
    ``ConcatDataset``, a DataLoader), or a ``datasets.Dataset`` over the same Arrow table or cache files (``select``,
    ``shuffle``, ``filter`` views)."""
    if obj is None or dataset is None:
        return False
    files, buffers = _storage(dataset)
    for d in _datasets_under(obj):
        if d is dataset:
            return True
        other_files, other_buffers = _storage(d)
        if files & other_files or buffers & other_buffers:
            return True
    return False


def _storage(dataset: object) -> tuple[set, set]:
    """A ``datasets.Dataset``'s cache files and the addresses of its Arrow buffers (shared by its views)."""
    files = {f.get("filename") for f in getattr(dataset, "cache_files", None) or [] if isinstance(f, dict)} - {None}
    table = getattr(getattr(dataset, "_data", None), "table", None)
    buffers = set()
    for column in getattr(table, "columns", None) or ():
        for chunk in column.chunks:
            buffers |= {b.address for b in chunk.buffers() if b is not None and b.size > 0}
    return files, buffers


def check_callbacks(callbacks: Iterable[object], train_dataset: object = None) -> None:
    """Refuse callbacks that compute something from the Trainer's training batches and write it into the model
    (:func:`~hf_svd_plugins.trainer_utils.reads_train_data`), and such callbacks given a loader over the training
    set itself (``EvaCallback(dataloader=DataLoader(train_dataset))``): that output is an un-noised function of the
    private data that no accountant covers."""
    bad = [type(cb).__name__ for cb in callbacks if reads_train_data(cb)]
    private_loader = [type(cb).__name__ for cb in callbacks
                      if hasattr(cb, "reads_train_data") and shares_dataset(getattr(cb, "dataloader", None),
                                                                            train_dataset)]
    if bad or private_loader:
        what = (f"callbacks {bad} read the Trainer's private training batches" if bad else
                f"callbacks {private_loader} were given a dataloader over the private training set")
        raise ValueError(
            f"{what} and write the result into the model with no noise and no accounting, which voids the DP "
            "guarantee. Give them public data instead: EvaCallback(dataloader=public_loader), or run "
            "eva_init(model, public_loader) before creating the DPTrainer"
        )


def check_only_private_parameters(
    model: nn.Module, private: dict[str, nn.Parameter], optimizer: object | None, deepspeed: bool = False
) -> None:
    """The trainable parameters (``requires_grad``) and the optimizer's must be exactly the privatised ones, and no
    other parameter may hold a gradient. Whatever the per-example method: under Opacus hooks a parameter unfrozen
    later gets the raw batch gradient, under vmap and loop it would be silently left out.

    Args:
        model: the unwrapped model.
        private: ``{name: param}`` privatised (fixed at construction).
        optimizer: the Trainer's optimizer (``param_groups``), or None before it exists. Under DeepSpeed the
            optimizer holds flat partitions, so only ``requires_grad`` is compared there.
    """
    private_ids = {id(p) for p in private.values()}
    names = {id(p): n for n, p in model.named_parameters()}
    stray_grads = [n for n, p in model.named_parameters() if id(p) not in private_ids and p.grad is not None]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    held = set() if deepspeed or optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
    unfrozen = sorted(names.get(i, "?") for i in trainable - private_ids)
    frozen = sorted(names.get(i, "?") for i in private_ids - trainable)
    extra = sorted(names.get(i, "<not in the model>") for i in held - private_ids)
    missing = sorted(names.get(i, "?") for i in private_ids - held) if held else []
    if stray_grads or unfrozen or frozen or extra or missing:
        details = []
        if extra:
            details.append(f"in the optimizer but not privatised: {extra[:5]}")
        if unfrozen:
            details.append(f"trainable (requires_grad) but not privatised: {unfrozen[:5]}")
        if frozen:
            details.append(f"privatised but frozen since (requires_grad=False): {frozen[:5]}")
        if missing:
            details.append(f"privatised but not trained: {missing[:5]}")
        if stray_grads:
            details.append(f"holding a gradient outside the privatised set: {stray_grads[:5]}")
        raise ValueError(
            "DP: the parameters being trained are not the privatised set fixed when the DPTrainer was built ("
            + "; ".join(details) + "). A parameter outside it would be updated with raw, un-clipped, un-noised "
            "gradients. Set requires_grad on exactly the parameters to train before creating the DPTrainer (and "
            "build any custom optimizer over those only)"
        )


def saved_float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's persistent floating-point buffers (what ``save_pretrained`` writes besides weights)."""
    out = {}
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().clone()
    return out


def check_buffers_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Refuse a step after which a saved buffer differs from ``snapshot``: it was computed from the private batch
    without noise (a custom running statistic, say) and would be released with the model."""
    if not snapshot:
        return
    now = saved_float_buffers(model)
    changed = [n for n, before in snapshot.items() if n in now and not torch.equal(now[n], before)]
    if changed:
        raise ValueError(
            f"DP: the model's saved buffers {changed[:5]} changed during a training step. They are computed from the "
            "private batch without noise and would be released with the model; freeze whatever updates them (or "
            "replace the module, e.g. BatchNorm by GroupNorm)"
        )
