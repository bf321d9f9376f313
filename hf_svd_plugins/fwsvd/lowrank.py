"""The low-rank module, and loading compressed checkpoints with plain ``from_pretrained``.

A compressed checkpoint is an ordinary ``save_pretrained`` directory: safetensors with ``<layer>.down.weight``,
``<layer>.up.weight`` (and ``<layer>.up.bias``) instead of ``<layer>.weight``, and a ``quantization_config`` entry in
``config.json`` that records the method and every layer's rank::

    "quantization_config": {"quant_method": "hf_svd_low_rank", "method": "fisher", "ranks": {"model.layers.0...": 96}}

Importing ``hf_svd_plugins`` registers that quantization method with transformers (``register_quantization_config``
and ``register_quantizer`` in ``transformers.quantizers.auto``). ``from_pretrained`` then builds the model skeleton,
calls :meth:`LowRankHfQuantizer._process_model_before_weight_loading`, which swaps each recorded Linear/Conv1D for a
:class:`LowRankLinear` of the recorded rank, and loads the weights as usual, so ``dtype``, ``device_map`` and the
other ``from_pretrained`` options keep working. The weights are ordinary float tensors: nothing is dequantized.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.quantizers import auto as quantizers_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

#: the ``quant_method`` written to ``config.json``
QUANT_METHOD = "hf_svd_low_rank"


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a Linear (or GPT-2 ``Conv1D``) of rank ``k``, as two ``nn.Linear``.

    ``down``: ``in_features -> rank``, weight ``(rank, in_features)``, no bias; ``up``: ``rank -> out_features``,
    weight ``(out_features, rank)``, with the original bias. Both are plain ``nn.Linear``, so PEFT LoRA can target them
    (``target_modules=["down", "up"]``) to heal a compressed model.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of an ``nn.Linear`` or GPT-2 ``Conv1D`` (which stores its weight as ``(d_in, d_out)``)."""
    if is_conv1d(module):
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    return int(module.out_features), int(module.in_features)


def is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or GPT-2 ``Conv1D``: the layers FWSVD can factorize."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(d_out, d_in)`` (a transposed view for ``Conv1D``)."""
    return module.weight.T if is_conv1d(module) else module.weight


def low_rank_like(module: nn.Module, rank: int) -> LowRankLinear:
    """An (uninitialised) :class:`LowRankLinear` replacing ``module``, on its device and dtype (meta included)."""
    d_out, d_in = linear_shape(module)
    weight = module.weight
    return LowRankLinear(d_in, d_out, rank, bias=module.bias is not None, device=weight.device, dtype=weight.dtype)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def resolve_module_name(model: nn.Module, name: str) -> str:
    """``name`` as it exists in ``model``; also across head classes (``model.layers.0...`` recorded by a
    ``LlamaForCausalLM`` and loaded as ``LlamaModel``, or the reverse), like transformers' ``base_model_prefix``."""
    names = dict(model.named_modules())
    if name in names:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in names:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in names:
        return f"{prefix}.{name}"
    raise ValueError(f"the checkpoint records a low-rank layer {name!r} that this model does not have")


def replace_with_low_rank(model: nn.Module, ranks: Mapping[str, int]) -> dict[str, LowRankLinear]:
    """Swap each named Linear/Conv1D for an uninitialised :class:`LowRankLinear` of that rank; returns the new modules."""
    new = {}
    for recorded, rank in ranks.items():
        name = resolve_module_name(model, recorded)
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            if module.rank != int(rank):
                raise ValueError(f"{name} is already low-rank with rank {module.rank}, not {rank}")
            new[name] = module
            continue
        if not is_linear_like(module):
            raise ValueError(f"{name} is a {type(module).__name__}, not a Linear/Conv1D; cannot make it low-rank")
        new[name] = low_rank_like(module, int(rank))
        set_submodule(model, name, new[name])
    return new


# --------------------------------------------------------------------------------------------- transformers glue


@dataclass
class LowRankConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compressed checkpoint.

    Attributes:
        ranks: ``{module name: rank}`` of every factorized layer (names in the saved model's ``named_modules()``).
        method: how the factors were computed (``fisher``, ``svd`` or ``whiten``); informational.
        format_version: layout version of the checkpoint.
    """

    ranks: dict[str, int] = field(default_factory=dict)
    method: str = "fisher"
    format_version: int = 1
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        self.quant_method = QUANT_METHOD
        self.ranks = {str(k): int(v) for k, v in dict(self.ranks).items()}


class LowRankHfQuantizer(HfQuantizer):
    """Rebuilds the :class:`LowRankLinear` layers of a compressed checkpoint before ``from_pretrained`` loads weights.

    Nothing is quantized: the factors are float tensors loaded in the requested ``dtype``. The model is therefore
    marked ``is_quantized = False`` after loading, so ``.half()``, ``.float()``, gradient checkpointing and the Trainer
    treat it as the ordinary float model it is (full fine-tuning and PEFT both work, ``is_trainable``).
    """

    requires_calibration = True  # factors come from fwsvd_compress: a dense checkpoint cannot be "quantized" on load
    quantization_config: LowRankConfig

    def _process_model_before_weight_loading(self, model, **kwargs):
        replace_with_low_rank(model, self.quantization_config.ranks)
        _tolerate_low_rank_in_init_weights(model)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            module.__dict__.pop("_init_weights", None)
        model.is_quantized = False
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def _tolerate_low_rank_in_init_weights(model: nn.Module) -> None:
    """Let ``from_pretrained``'s weight initialisation pass over modules whose children became low-rank.

    Some models' ``_init_weights`` read a child's weight from the parent (GPT-2 rescales ``attn.c_proj.weight`` when
    it visits ``GPT2Attention``); a :class:`LowRankLinear` has no ``weight``, and its factors come from the checkpoint
    anyway. Only that AttributeError, on a module with a low-rank child, is skipped; removed again after loading.
    """
    from transformers import PreTrainedModel

    for sub in model.modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        original = sub._init_weights

        def init_weights(module, _original=original):
            try:
                _original(module)
            except AttributeError:
                if not any(isinstance(child, LowRankLinear) for child in module.children()):
                    raise

        sub._init_weights = init_weights


def register_low_rank_quantizer() -> None:
    """Register :class:`LowRankConfig` / :class:`LowRankHfQuantizer` under :data:`QUANT_METHOD` (idempotent)."""
    if QUANT_METHOD not in quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        quantizers_auto.register_quantization_config(QUANT_METHOD)(LowRankConfig)
    if QUANT_METHOD not in quantizers_auto.AUTO_QUANTIZER_MAPPING:
        quantizers_auto.register_quantizer(QUANT_METHOD)(LowRankHfQuantizer)


register_low_rank_quantizer()


def mark_compressed(model: nn.Module, ranks: Mapping[str, int], method: str) -> None:
    """Record the low-rank layout on a compressed ``PreTrainedModel`` so ``save_pretrained`` writes it, and attach
    the quantizer exactly as ``from_pretrained`` would (a compressed model behaves the same whether built or loaded)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        return
    existing = getattr(config, "quantization_config", None)
    previous = {}
    if existing is not None:
        existing = existing if isinstance(existing, dict) else existing.to_dict()
        if existing.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"the model is already quantized with {existing.get('quant_method')!r}; compress a float model")
        previous = dict(existing.get("ranks", {}))
    quant_config = LowRankConfig(ranks={**previous, **dict(ranks)}, method=method)
    config.quantization_config = quant_config
    model.hf_quantizer = LowRankHfQuantizer(quant_config, pre_quantized=True)
    model.quantization_method = QUANT_METHOD
    model.is_quantized = False


def load_compressed(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a compressed checkpoint with the model class recorded in its ``config.json`` (``architectures[0]``).

    Same as ``AutoModelFor<Task>.from_pretrained(path, **kwargs)`` after ``import hf_svd_plugins``; ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    quant = getattr(config, "quantization_config", None)
    quant = quant if isinstance(quant, dict) or quant is None else quant.to_dict()
    if not quant or quant.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path} is not a compressed checkpoint (no quantization_config with quant_method "
                         f"{QUANT_METHOD!r} in its config.json); save one with fwsvd_compress + save_pretrained")
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(f"{path}/config.json names no transformers architecture ({architectures}); load it with "
                         "the right AutoModelFor*.from_pretrained instead")
    return model_class.from_pretrained(path, **kwargs)
