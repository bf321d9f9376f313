"""EVA's layout: LoRA widths, scales and the saved adapter format, per adapter, written into a PEFT model.

Two ways to apply a result:
- *masked* (inside a running Trainer): every module keeps ``r_max`` rows/columns; ranks beyond ``r_m`` are zero in A
  and B, so their gradients stay exactly zero. Saving truncates to ``r_m`` (``rank_pattern``/``alpha_pattern``).
- *resized* (``eva_init`` before a Trainer exists): LoRA layers are rebuilt with ``r_m`` ranks through PEFT's
  ``update_layer``; rank-0 modules lose this adapter, as PEFT's own EVA does.

What EVA records lives per adapter (:class:`AdapterLayout`): the LoRA config the user configured (EVA writes its
ranks into a private copy, never into the user's ``LoraConfig``) and the save/load hooks of the masked layout.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from hf_svd_plugins.lora import LoraPair, assign_lora_weights, full_shape, read_lora_weights, unwrap_peft_model

if TYPE_CHECKING:
    from hf_svd_plugins.eva.allocation import EvaResult
    from hf_svd_plugins.eva.config import EvaConfig

_STATE_ATTRIBUTE = "_hf_svd_eva_adapters"


def scale_divisor(r: int, use_rslora: bool) -> float:
    """LoRA's scale is ``alpha / scale_divisor(r)``: ``sqrt(r)`` with rsLoRA, ``r`` otherwise (as PEFT's layers)."""
    return math.sqrt(r) if use_rslora else float(r)


def uses_rslora(model: nn.Module, adapter: str) -> bool:
    return bool(getattr(unwrap_peft_model(model).peft_config[adapter], "use_rslora", False))


@dataclass
class AdapterLayout:
    """What EVA keeps for one adapter of a model.

    Attributes:
        configured: a copy of the adapter's ``LoraConfig`` as the user configured it (before EVA wrote its ranks).
        written: the private copy of that config that EVA writes its ranks into (installed in ``peft_config``).
        saved_layout: the masked layout's save/load hooks, once an ``EvaCallback`` installed them.
    """

    configured: object
    written: object | None = None
    saved_layout: SavedRankLayout | None = None


def adapter_layout(model: nn.Module, adapter: str) -> AdapterLayout:
    """The :class:`AdapterLayout` of ``adapter``, created (with a snapshot of its config) on first use."""
    peft_model = unwrap_peft_model(model)
    layouts = peft_model.__dict__.setdefault(_STATE_ATTRIBUTE, {})
    if adapter not in layouts:
        layouts[adapter] = AdapterLayout(configured=copy.deepcopy(peft_model.peft_config[adapter]))
    return layouts[adapter]


def configured_rank_and_alpha(model: nn.Module, pair: LoraPair) -> tuple[int, float]:
    """The rank ``r`` and ``alpha`` the user configured for this module (``rank_pattern``/``alpha_pattern`` aware)."""
    from peft.utils.other import get_pattern_key

    config = adapter_layout(model, pair.adapter).configured
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), pair.name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), pair.name), config.lora_alpha)
    return int(r), float(alpha)


def max_rank(model: nn.Module, pair: LoraPair, config: EvaConfig) -> int:
    """``r_max`` of a module: ``round(rho * r)`` of its configured rank, capped at its input width."""
    return min(config.max_components(configured_rank_and_alpha(model, pair)[0]), pair.in_features)


def _layer_config(model: nn.Module, adapter: str):
    layer_config = copy.copy(unwrap_peft_model(model).peft_config[adapter])
    layer_config.init_lora_weights = True
    return layer_config


def grow_to_max_rank(model: nn.Module, pairs: list[LoraPair], config: EvaConfig) -> None:
    """Give every LoRA layer ``r_max = round(rho * r)`` ranks (same scale ``alpha / r``) so EVA can redistribute
    ranks later without changing shapes. Call before the optimizer exists."""
    peft_model = unwrap_peft_model(model)
    if not pairs:
        return
    layer_config = _layer_config(peft_model, pairs[0].adapter)
    rslora = uses_rslora(peft_model, pairs[0].adapter)
    for pair in pairs:
        r0, alpha0 = configured_rank_and_alpha(peft_model, pair)
        r_max = max_rank(peft_model, pair, config)
        if pair.r == r_max:
            continue
        alpha_max = alpha0 / scale_divisor(r0, rslora) * scale_divisor(r_max, rslora)
        pair.module.update_layer(pair.adapter, r=r_max, lora_alpha=alpha_max, config=layer_config)


@torch.no_grad()
def apply_masked(pairs: list[LoraPair], result: EvaResult, optimizer: object | None = None) -> None:
    """Write EVA into fixed-width LoRA layers: ``A[:r_m] = V_m``, other rows 0, ``B = 0``; set the scales.

    Every rank ends with rank 0's values (see :func:`hf_svd_plugins.lora.assign_lora_weights`).
    """
    if any(p.A.device.type == "meta" for p in pairs):
        raise ValueError(
            "the LoRA weights are on the meta device (e.g. `get_peft_model(..., low_cpu_mem_usage=True)`), so EVA "
            "cannot write into them in place; call `eva_init(model, dataloader)`, which rebuilds the layers, or "
            "create the adapter without low_cpu_mem_usage"
        )
    values = {}
    for pair in pairs:
        a = torch.zeros(full_shape(pair.A), dtype=torch.float64)
        a[: result.ranks[pair.name]] = result.matrices[pair.name]
        values[pair.name] = (a, torch.zeros(full_shape(pair.B)))
        pair.module.scaling[pair.adapter] = result.scalings[pair.name]
    assign_lora_weights(pairs, values, optimizer=optimizer)


@torch.no_grad()
def zero_unused_ranks(pairs: list[LoraPair], ranks: Mapping[str, int], scalings: Mapping[str, float],
                      optimizer: object | None = None) -> None:
    """Re-impose EVA's mask on fixed-width layers (after a resume): zero A rows and B columns beyond ``r_m``."""
    current = read_lora_weights(pairs)
    values = {}
    for pair in pairs:
        a, b = current[pair.name]
        r_m = ranks[pair.name]
        a, b = a.clone(), b.clone()
        a[r_m:] = 0
        b[:, r_m:] = 0
        values[pair.name] = (a, b)
        pair.module.scaling[pair.adapter] = scalings[pair.name]
    assign_lora_weights(pairs, values, optimizer=optimizer)


def update_saved_layout(model: nn.Module, pairs: list[LoraPair], ranks: Mapping[str, int],
                        alphas: Mapping[str, float]) -> None:
    """Record EVA's ranks in the adapter's PEFT config so saved adapters are standard (``rank_pattern``/
    ``alpha_pattern``, rank-0 modules dropped from ``target_modules``).

    The first write replaces the adapter's config by a copy, so the user's ``LoraConfig`` object (which PEFT keeps
    by reference) is never changed: reusing it for another model gives that model the configured ranks.
    """
    peft_model = unwrap_peft_model(model)
    adapter = pairs[0].adapter
    layout = adapter_layout(peft_model, adapter)
    if peft_model.peft_config[adapter] is not layout.written:
        layout.written = copy.deepcopy(peft_model.peft_config[adapter])
        peft_model.peft_config[adapter] = layout.written
    config, configured = layout.written, layout.configured
    config.rank_pattern = {n: int(r) for n, r in ranks.items() if r > 0 and r != configured.r}
    config.alpha_pattern = {n: float(a) for n, a in alphas.items() if ranks[n] > 0 and a != configured.lora_alpha}
    config.target_modules = ({n for n, r in ranks.items() if r > 0} if any(r == 0 for r in ranks.values())
                             else copy.deepcopy(configured.target_modules))


class SavedRankLayout:
    """State-dict hooks that make a fixed-width (masked) EVA model save and load as a standard truncated adapter.

    Saving slices A to its first ``r_m`` rows and B to its first ``r_m`` columns (and drops rank-0 modules); loading
    a truncated adapter zero-pads back to the live width, so Trainer checkpoints resume into the masked layout.
    """

    def __init__(self, pairs: list[LoraPair], widths: Mapping[str, int]):
        self.widths = dict(widths)
        self.ranks: dict[str, int] | None = None
        self._handles = []
        for pair in pairs:
            for sub, axis in ((pair.module.lora_A[pair.adapter], 0), (pair.module.lora_B[pair.adapter], 1)):
                self._handles.append(sub.register_state_dict_post_hook(partial(self._truncate, pair.name, axis)))
                self._handles.append(sub.register_load_state_dict_pre_hook(partial(self._pad, pair.name, axis)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _truncate(self, name, axis, module, state_dict, prefix, local_metadata) -> None:
        if self.ranks is None or name not in self.ranks:
            return
        key = prefix + "weight"
        t = state_dict.get(key)
        if t is None or t.dim() != 2 or t.shape[axis] != self.widths[name]:
            return  # e.g. a ZeRO-3 shard: leave it alone
        r_m = self.ranks[name]
        if r_m == 0:
            del state_dict[key]
        else:
            state_dict[key] = t.narrow(axis, 0, r_m).clone()

    def _pad(self, name, axis, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "weight"
        t = state_dict.get(key)
        width = self.widths[name]
        if t is None or t.dim() != 2 or t.shape[axis] >= width:
            return
        shape = list(t.shape)
        shape[axis] = width - t.shape[axis]
        state_dict[key] = torch.cat([t, t.new_zeros(shape)], dim=axis)


@torch.no_grad()
def apply_resized(model: nn.Module, pairs: list[LoraPair], result: EvaResult) -> None:
    """Rebuild each LoRA layer with ``r_m`` ranks (PEFT ``update_layer``), A = EVA directions, B = 0. A rank-0
    layer loses this adapter (the whole LoRA layer is replaced by its base layer when no other adapter uses it).
    Only before an optimizer holds the old parameters."""
    from peft.utils.other import _get_submodules

    peft_model = unwrap_peft_model(model)
    layer_config = _layer_config(peft_model, pairs[0].adapter)
    for pair in pairs:
        r_m = result.ranks[pair.name]
        if r_m == 0:
            if set(pair.module.lora_A) - {pair.adapter}:  # other adapters live here: remove only this one
                active = list(pair.module.active_adapters)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PEFT would activate another adapter; restore below
                    pair.module.delete_adapter(pair.adapter)
                pair.module.set_adapter(active)
                continue
            full_name = next(n for n, m in peft_model.named_modules() if m is pair.module)
            parent, _, target_name = _get_submodules(peft_model, full_name)
            setattr(parent, target_name, pair.module.get_base_layer())
            continue
        pair.module.update_layer(pair.adapter, r=r_m, lora_alpha=result.alphas[pair.name], config=layer_config)
        pair.module.scaling[pair.adapter] = result.scalings[pair.name]
    kept = [p for p in pairs if result.ranks[p.name] > 0]
    assign_lora_weights(kept, {p.name: (result.matrices[p.name], torch.zeros(p.B.shape)) for p in kept})
    update_saved_layout(peft_model, pairs, result.ranks, result.alphas)
