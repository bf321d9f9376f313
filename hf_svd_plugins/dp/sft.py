"""``DPSFTTrainer(DPMixin, trl.SFTTrainer)``, built on first use so that importing the DP package does not import TRL.

What of ``SFTConfig`` holds under DP: the labels TRL builds (``completion_only_loss``, ``assistant_only_loss``: -100
outside the completion / assistant turns) are honoured, since each example's loss is the mean over its own targets.
``loss_type`` other than ``"nll"`` (DFT reweights every token by its probability) and packing / padding-free batches
are refused. The MoE router auxiliary loss SFTTrainer adds (``output_router_logits``) is not part of the DP objective.
"""

from __future__ import annotations

from typing import Any

_DP_SFT_TRAINER: type | None = None


def check_sft_args(sft_args: object) -> None:
    """Refuse ``SFTConfig`` settings DP would silently not honour, or that mix examples."""
    if sft_args is None:
        return
    if getattr(sft_args, "packing", False) or getattr(sft_args, "padding_free", False):
        raise ValueError(
            "SFTConfig(packing=True / padding_free=True) puts several examples in one row, which breaks "
            "per-example privacy; set packing=False and padding_free=False"
        )
    loss_type = getattr(sft_args, "loss_type", "nll")
    if loss_type != "nll":
        raise ValueError(
            f"SFTConfig(loss_type={loss_type!r}) is not supported under DP: each example's loss is the mean negative "
            "log-likelihood of its own targets (SFTTrainer.compute_loss is not called); set loss_type='nll'"
        )


def get_dp_sft_trainer_class() -> type:
    """The ``DPSFTTrainer`` class (TRL is imported on the first call)."""
    global _DP_SFT_TRAINER
    if _DP_SFT_TRAINER is None:
        from trl import SFTTrainer

        from hf_svd_plugins.dp.trainer import DPMixin

        class DPSFTTrainer(DPMixin, SFTTrainer):
            """TRL ``SFTTrainer`` with DP-SGD. Packing, padding-free batches and ``loss_type`` other than "nll" are
            refused."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                check_sft_args(kwargs.get("args", args[1] if len(args) > 1 else None))
                super().__init__(*args, **kwargs)

        # pickled by reference as hf_svd_plugins.dp.DPSFTTrainer (the package's lazy attribute)
        DPSFTTrainer.__module__, DPSFTTrainer.__qualname__ = "hf_svd_plugins.dp", "DPSFTTrainer"
        _DP_SFT_TRAINER = DPSFTTrainer
    return _DP_SFT_TRAINER
