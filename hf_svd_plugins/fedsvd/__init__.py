"""FedSVD: SVD refactorization of LoRA pairs (single-node callback, in-process federation, Flower).

``from hf_svd_plugins.fedsvd import refactorize, Federation``; the Flower strategy and client app live in
``hf_svd_plugins.fedsvd.flower`` (extra ``[flower]``).
"""

from __future__ import annotations

from hf_svd_plugins.fedsvd.callback import (
    LORA_A_FILE,
    OPTIMIZER_STATE_POLICIES,
    FedSVDCallback,
    freeze_lora_A,
    refactorize_lora_model,
    reset_optimizer_state,
)
from hf_svd_plugins.fedsvd.core import (
    METHODS,
    aggregate_lora,
    aggregate_weighted,
    refactorize,
)
from hf_svd_plugins.fedsvd.federation import Federation, accuracy_metrics
from hf_svd_plugins.fedsvd.partition import partition_dirichlet, partition_iid
from hf_svd_plugins.lora.saving import save_full_adapter  # the final save under ZeRO-3 (see FedSVDCallback)

__all__ = [
    "LORA_A_FILE",
    "METHODS",
    "OPTIMIZER_STATE_POLICIES",
    "FedSVDCallback",
    "Federation",
    "accuracy_metrics",
    "aggregate_lora",
    "aggregate_weighted",
    "freeze_lora_A",
    "partition_dirichlet",
    "partition_iid",
    "refactorize",
    "refactorize_lora_model",
    "reset_optimizer_state",
    "save_full_adapter",
]
