"""``DPSFTTrainer(DPMixin, trl.SFTTrainer)``, built on first use so that importing the DP package does not import TRL."""

from __future__ import annotations

from typing import Any

_DP_SFT_TRAINER: type | None = None


def get_dp_sft_trainer_class() -> type:
    """The ``DPSFTTrainer`` class (TRL is imported on the first call)."""
    global _DP_SFT_TRAINER
    if _DP_SFT_TRAINER is None:
        from trl import SFTTrainer

        from hf_svd_plugins.dp.trainer import DPMixin

        class DPSFTTrainer(DPMixin, SFTTrainer):
            """TRL ``SFTTrainer`` with DP-SGD. Packing and padding-free batches are refused (they mix examples)."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                sft_args = kwargs.get("args")
                if sft_args is not None and (getattr(sft_args, "packing", False)
                                             or getattr(sft_args, "padding_free", False)):
                    raise ValueError(
                        "SFTConfig(packing=True / padding_free=True) puts several examples in one row, which breaks "
                        "per-example privacy; set packing=False and padding_free=False"
                    )
                super().__init__(*args, **kwargs)

        DPSFTTrainer.__module__ = "hf_svd_plugins.dp.trainer"
        _DP_SFT_TRAINER = DPSFTTrainer
    return _DP_SFT_TRAINER
