"""hf_svd_plugins: SVD-centred research methods as Hugging Face Trainer plugins."""

from hf_svd_plugins.dp import DPConfig, DPMixin, DPTrainer
from hf_svd_plugins.eva import EvaCallback, EvaConfig, eva_init
from hf_svd_plugins.fedsvd import FedSVDCallback
from hf_svd_plugins.fwsvd import FisherCallback, fwsvd_compress, load_compressed
from hf_svd_plugins.merging.callback import PermutationMergeCallback

__all__ = [
    "DPConfig",
    "DPMixin",
    "DPTrainer",
    "EvaCallback",
    "EvaConfig",
    "FedSVDCallback",
    "FisherCallback",
    "PermutationMergeCallback",
    "eva_init",
    "fwsvd_compress",
    "load_compressed",
]
