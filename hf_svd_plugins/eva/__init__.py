"""EVA: LoRA initialised from the SVD of activations, ranks redistributed by explained variance."""

from hf_svd_plugins.eva.callback import EvaCallback
from hf_svd_plugins.eva.config import EvaConfig
from hf_svd_plugins.eva.init import eva_init
from hf_svd_plugins.eva.model import EvaResult, compute_eva

__all__ = ["EvaCallback", "EvaConfig", "EvaResult", "compute_eva", "eva_init"]
