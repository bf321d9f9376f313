"""Differentially private training (DP-SGD): per-example clipping, Gaussian noise, Opacus accounting.

Public names: :class:`DPConfig`, :class:`DPMixin`, :class:`DPTrainer` and (imports TRL on first use)
:class:`DPSFTTrainer`. The tensor-level core lives in :mod:`.clipping`, :mod:`.per_sample`, :mod:`.sampling` and
:mod:`.accounting`.
"""

from hf_svd_plugins.dp.accounting import PrivacyAccountant, calibrate_noise_multiplier, compute_epsilon
from hf_svd_plugins.dp.config import DPConfig
from hf_svd_plugins.dp.trainer import DPMixin, DPTrainer

__all__ = [
    "DPConfig",
    "DPMixin",
    "DPSFTTrainer",
    "DPTrainer",
    "PrivacyAccountant",
    "calibrate_noise_multiplier",
    "compute_epsilon",
]


def __getattr__(name: str):
    if name == "DPSFTTrainer":
        from hf_svd_plugins.dp.sft import get_dp_sft_trainer_class

        return get_dp_sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
