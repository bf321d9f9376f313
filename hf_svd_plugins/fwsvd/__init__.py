"""FWSVD: compress Linear layers after training by Fisher-weighted (or plain, or activation-whitened) SVD.

``from hf_svd_plugins import FisherCallback, fwsvd_compress, load_compressed``; the pure-tensor core is
:mod:`hf_svd_plugins.fwsvd.core`. Importing this package registers the low-rank checkpoint format with transformers,
so ``AutoModelFor*.from_pretrained(dir)`` loads a compressed model.
"""

from hf_svd_plugins.fwsvd.callback import FisherCallback
from hf_svd_plugins.fwsvd.compress import METHODS, CompressionReport, LayerReport, fwsvd_compress
from hf_svd_plugins.fwsvd.core import weighted_low_rank, whitened_low_rank
from hf_svd_plugins.fwsvd.fisher import estimate_fisher
from hf_svd_plugins.fwsvd.lowrank import LowRankConfig, LowRankHfQuantizer, LowRankLinear, load_compressed
from hf_svd_plugins.fwsvd.targets import select_targets

__all__ = [
    "METHODS",
    "CompressionReport",
    "FisherCallback",
    "LayerReport",
    "LowRankConfig",
    "LowRankHfQuantizer",
    "LowRankLinear",
    "estimate_fisher",
    "fwsvd_compress",
    "load_compressed",
    "select_targets",
    "weighted_low_rank",
    "whitened_low_rank",
]
