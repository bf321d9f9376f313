"""EVA: LoRA initialised from the SVD of activations, ranks redistributed by explained variance.

``collection`` reads the minibatches (``batches``: what the forward gets) and keeps one statistic per distinct layer
input, exact or a ``sketch`` for wide layers; ``allocation`` decides ranks and A matrices; ``layout`` writes them into
the PEFT model; ``core`` and ``sketch`` are the pure-tensor numerics. Details, formulas and measurements: docs/eva.md.
"""

from hf_svd_plugins.eva.allocation import EvaResult, compute_eva
from hf_svd_plugins.eva.callback import EvaCallback
from hf_svd_plugins.eva.config import EvaConfig
from hf_svd_plugins.eva.init import eva_init

__all__ = ["EvaCallback", "EvaConfig", "EvaResult", "compute_eva", "eva_init"]
