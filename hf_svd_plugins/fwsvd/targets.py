"""Which layers FWSVD reads and compresses, by name, in plain and PEFT models."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from hf_svd_plugins.fwsvd.lowrank import LowRankLinear, dense_weight, is_linear_like, linear_shape
from hf_svd_plugins.lora import named_base_layers

#: what ``targets`` accepts: None (every Linear/Conv1D in the repeated blocks), module-name suffixes, or a regex
Targets = str | Sequence[str] | None


@dataclass
class TargetLayer:
    """A layer to compress.

    Attributes:
        name: module name in the (merged) model, e.g. ``model.layers.0.self_attn.q_proj``.
        outer: the module that runs in the forward pass (a PEFT ``LoraLayer`` for an adapted layer, else ``layer``).
        layer: the ``nn.Linear`` / ``Conv1D`` holding the base weight.
    """

    name: str
    outer: nn.Module
    layer: nn.Module

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``."""
        return linear_shape(self.layer)

    def weight(self):
        """The weight as ``(d_out, d_in)``."""
        return dense_weight(self.layer)


def _block_prefixes(model: nn.Module) -> list[str]:
    return [name + "." for name, module, _ in named_base_layers(model) if isinstance(module, nn.ModuleList) and name]


def _matches(name: str, targets: Targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_targets(model: nn.Module, targets: Targets = None) -> list[TargetLayer]:
    """The layers ``targets`` names, in module order.

    ``None``: every ``nn.Linear``/``Conv1D`` inside the model's repeated blocks (an ``nn.ModuleList``: decoder/encoder
    layers), so embeddings, ``lm_head``, BERT's pooler and task heads stay dense. A list: module names or name suffixes
    (``["q_proj", "mlp.down_proj"]``, PEFT's ``target_modules`` rule); a string: a regex that must match the whole name.
    The factors of layers that are already low-rank are never targets: compressing twice compresses what is dense.

    Raises:
        ValueError: nothing matches; a matched module is not a Linear/Conv1D; its weight is tied to another module.
    """
    factors = {name + "." for name, module, _ in named_base_layers(model) if isinstance(module, LowRankLinear)}
    layers = [(n, o, m) for n, o, m in named_base_layers(model) if not any(n.startswith(f) for f in factors)]
    if targets is None:
        prefixes = _block_prefixes(model)
        chosen = [(n, o, m) for n, o, m in layers if is_linear_like(m) and any(n.startswith(p) for p in prefixes)]
        if not chosen:
            raise ValueError(f"{type(model).__name__} has no Linear/Conv1D inside an nn.ModuleList of blocks; "
                             "name the layers to compress with targets=[...]")
    else:
        if not isinstance(targets, str) and (not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets)):
            raise TypeError(f"targets must be None, a regex string or a list of module-name suffixes, got {targets!r}")
        chosen = [(n, o, m) for n, o, m in layers if n and _matches(n, targets)]
        if not chosen:
            raise ValueError(f"targets={targets!r} matches no module of {type(model).__name__}")
        wrong = [(n, type(m).__name__) for n, _, m in chosen if not is_linear_like(m)]
        if wrong:
            raise ValueError(f"targets={targets!r} matches modules that are not nn.Linear/Conv1D: {wrong[:4]}; "
                             "name Linear layers (e.g. 'q_proj') or pass a regex that matches only them")
    tied = _tied_weights(model)
    shared = [n for n, _, m in chosen if id(m.weight) in tied]
    if shared:
        raise ValueError(f"{shared[:4]} share their weight with another module (tied embeddings?); compressing one "
                         "would untie them: leave them out of targets")
    return [TargetLayer(n, o, m) for n, o, m in chosen]


def _tied_weights(model: nn.Module) -> set[int]:
    seen, tied = {}, set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners = seen.setdefault(id(param), set())
            owners.add(id(module))
            if len(owners) > 1:
                tied.add(id(param))
    return tied
