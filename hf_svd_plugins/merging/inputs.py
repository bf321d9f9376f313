"""Checks on what users pass to the merging entry points, run before any work starts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hf_svd_plugins.merging.specs import check_not_peft, named_weights

__all__ = ["check_configs", "check_models", "mixing_weights", "model_state"]

# Config fields that may differ between two checkpoints of one architecture: provenance, dtype and runtime flags
# (the Trainer itself switches ``use_cache`` off while training).
_IGNORED_CONFIG_KEYS = {
    "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
    "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal", "architectures",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
}


def check_models(models: Sequence[nn.Module], argument: str = "models") -> None:
    """Refuse fewer than 2 models, PEFT models, and models of different classes, configs or parameter shapes.

    Raises:
        TypeError: an item that is not an ``nn.Module``.
        ValueError: naming the first difference found and how to fix it.
    """
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise TypeError(f"{argument} must be a list of models, got {type(models).__name__}")
    if len(models) < 2:
        raise ValueError(f"{argument}: merging needs at least 2 models, got {len(models)}")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{argument}[{i}] is a {type(model).__name__}, not a torch.nn.Module")
        check_not_peft(model, f"{argument}[{i}]")
    first = models[0]
    shapes = {n: tuple(p.shape) for n, p in named_weights(first).items()}
    config = _config_dict(first)
    for i, model in enumerate(models[1:], start=1):
        if type(model) is not type(first):
            raise ValueError(f"{argument}[{i}] is a {type(model).__name__} but {argument}[0] is a "
                             f"{type(first).__name__}; only models of one architecture can be merged")
        _check_same_config(config, _config_dict(model), f"{argument}[{i}]", f"{argument}[0]")
        other_shapes = {n: tuple(p.shape) for n, p in named_weights(model).items()}
        if other_shapes != shapes:
            diff = sorted(n for n in set(shapes) | set(other_shapes) if shapes.get(n) != other_shapes.get(n))
            raise ValueError(f"{argument}[{i}] differs from {argument}[0] in parameters {diff[:5]} (names or "
                             "shapes, including which weights are tied); merge models of one architecture")


def _config_dict(model_or_config: object) -> dict | None:
    config = model_or_config if hasattr(model_or_config, "to_dict") else getattr(model_or_config, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    return {k: v for k, v in config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}


def _check_same_config(first: dict | None, other: dict | None, name: str, first_name: str) -> None:
    if first is None or other is None or first == other:
        return
    keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
    raise ValueError(f"{name} has a different config from {first_name} (fields {keys[:6]}); only checkpoints of "
                     "one architecture and configuration can be merged")


def check_configs(configs: Sequence[object], names: Sequence[str]) -> None:
    """The cheap part of :func:`check_models` on configs alone (before any weights are loaded)."""
    first = _config_dict(configs[0])
    for config, name in zip(configs[1:], names[1:], strict=True):
        _check_same_config(first, _config_dict(config), name, names[0])


def mixing_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """``weights`` normalised to sum to 1 (default uniform).

    Raises:
        ValueError: wrong length, a negative or non-finite weight, or all zero.
    """
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} values for {n} models; give one mixing weight per model")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: detached parameter}``, each tied parameter once."""
    return {n: p.detach() for n, p in named_weights(model).items()}
