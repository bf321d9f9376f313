"""The DP trainer's own copy of ``TrainingArguments``: what DP changes there, changed on a copy only.

DP switches off batch-level gradient clipping (``max_grad_norm``, and DeepSpeed's ``gradient_clipping``): per-example
clipping to ``DPConfig.max_grad_norm`` replaces it. ``copy.copy`` of the arguments would still share the DeepSpeed
plugin and its config dict with the user's object, so those are copied too before anything is set.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings

logger = logging.getLogger(__name__)


def _field_default(args: object, name: str) -> object:
    for f in dataclasses.fields(type(args)):
        if f.name == name:
            return f.default
    return None


def private_arguments(args, dp_max_grad_norm: float):
    """A copy of ``args`` with ``max_grad_norm = 0`` and, under DeepSpeed, its own plugin whose config has
    ``gradient_clipping = 0``; ``args`` (and its plugin and config dicts) are left as they are.

    Warns when the user set ``max_grad_norm`` themselves; the ``TrainingArguments`` default is only logged.
    """
    own = copy.copy(args)
    norm = getattr(args, "max_grad_norm", 0.0)
    if norm and norm > 0:
        message = (f"TrainingArguments.max_grad_norm={norm} (clipping of the batch gradient) is disabled under DP; "
                   f"each example's gradient is clipped to DPConfig.max_grad_norm={dp_max_grad_norm} instead")
        if norm == _field_default(args, "max_grad_norm"):
            logger.info("DP: %s (the TrainingArguments default)", message)
        else:
            warnings.warn(message, UserWarning, stacklevel=4)
        own.max_grad_norm = 0.0
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        own.deepspeed_plugin = _plugin_without_clipping(plugin, norm)
        if getattr(args, "hf_deepspeed_config", None) is not None:
            own.hf_deepspeed_config = own.deepspeed_plugin.hf_ds_config
    return own


def _plugin_without_clipping(plugin, max_grad_norm: float):
    """A copy of an accelerate ``DeepSpeedPlugin`` with its own config dict, DeepSpeed's clipping off (a warning if
    it was set to something else than ``TrainingArguments.max_grad_norm``, which HF copies into "auto")."""
    config = copy.deepcopy(plugin.deepspeed_config)
    clip = config.get("gradient_clipping", 0)
    if clip not in (0, 0.0, "auto", None, max_grad_norm):
        warnings.warn(f"DeepSpeed gradient_clipping={clip} is disabled under DP", UserWarning, stacklevel=5)
    config["gradient_clipping"] = 0.0
    own = copy.copy(plugin)
    own.deepspeed_config = config
    if getattr(plugin, "hf_ds_config", None) is not None:
        own.hf_ds_config = copy.copy(plugin.hf_ds_config)
        own.hf_ds_config.config = config
    own.gradient_clipping = 0.0
    return own
