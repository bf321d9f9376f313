"""One place that knows PEFT's LoRA internals and how to read/write them when weights are distributed.

Every adapter of this suite (EVA, FedSVD, DP, ...) finds LoRA pairs through :func:`find_lora_pairs` and writes them
through :func:`assign_lora_weights`, so sharding and replication are handled once:

* DDP, DeepSpeed ZeRO-1/2: weights are whole on every rank; writes are broadcast from rank 0.
* DeepSpeed ZeRO-3: weights are partitioned; reads and writes gather them (``deepspeed.zero.GatheredParameters``).
* FSDP2 (``fully_shard``, accelerate's ``fsdp_version: 2``): weights are ``DTensor`` shards; reads use
  ``full_tensor()``, writes ``distribute_tensor(value, mesh, placements, src_data_rank=0)`` into the local shard.
* DeepSpeed keeps fp32 master weights and optimizer state in flat partitions: writes set the masters of exactly the
  written parameters (``deepspeed.utils.safe_set_full_fp32_param``) from the full-precision values, and
  :func:`read_optimizer_state` / :func:`write_optimizer_state` reach per-parameter optimizer state under every layout.
* Saving: :func:`save_full_adapter` writes the whole adapter (frozen adapter weights included) from gathered values;
  transformers' ZeRO-3 save drops frozen weights.

Shapes follow PyTorch: LoRA adds ``scaling * B @ A`` with ``A (r, d_in)`` and ``B (d_out, r)``.
"""

from hf_svd_plugins.lora.layers import (
    gathered_cpu_copy,
    loss_module,
    merge_lora_adapters,
    named_base_layers,
)
from hf_svd_plugins.lora.optimizer_state import (
    base_optimizer,
    has_fp32_fragment,
    master_weights_optimizer,
    optimizer_chain,
    read_optimizer_state,
    reset_optimizer_state,
    write_master_weights,
    write_optimizer_state,
)
from hf_svd_plugins.lora.pairs import (
    LoraPair,
    assign_lora_weights,
    base_module_name,
    find_lora_pairs,
    read_lora_weights,
    unwrap_model,
    unwrap_peft_model,
)
from hf_svd_plugins.lora.saving import (
    adapter_tensors,
    gathered_adapter_state_dict,
    gathered_cpu_state,
    save_full_adapter,
)
from hf_svd_plugins.lora.sharding import (
    full_shape,
    full_value,
    gathered_parameters,
    is_dtensor,
    is_fsdp1_flattened,
    is_sharded,
    is_zero3_param,
    wide_dtype,
    write_full_value,
)

__all__ = [
    "LoraPair",
    "adapter_tensors",
    "assign_lora_weights",
    "base_module_name",
    "base_optimizer",
    "find_lora_pairs",
    "full_shape",
    "full_value",
    "gathered_adapter_state_dict",
    "gathered_cpu_copy",
    "gathered_cpu_state",
    "gathered_parameters",
    "has_fp32_fragment",
    "is_dtensor",
    "is_fsdp1_flattened",
    "is_sharded",
    "is_zero3_param",
    "loss_module",
    "master_weights_optimizer",
    "merge_lora_adapters",
    "named_base_layers",
    "optimizer_chain",
    "read_lora_weights",
    "read_optimizer_state",
    "reset_optimizer_state",
    "save_full_adapter",
    "unwrap_model",
    "unwrap_peft_model",
    "wide_dtype",
    "write_full_value",
    "write_master_weights",
    "write_optimizer_state",
]
