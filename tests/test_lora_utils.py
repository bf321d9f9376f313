"""lora.py: finding pairs, refusing what it cannot handle."""

import os
import socket

import pytest
import torch.distributed as dist
from tiny import tiny_lora_model

from hf_svd_plugins.lora import assign_lora_weights, find_lora_pairs, read_lora_weights


def test_find_lora_pairs_shapes_and_scaling(kind):
    pairs = find_lora_pairs(tiny_lora_model(kind, r=4, lora_alpha=8))
    assert pairs and all(p.A.shape[0] == 4 and p.B.shape[1] == 4 and p.scaling == 2.0 for p in pairs)
    assert all(p.A.shape[1] == p.in_features and p.B.shape[0] == p.out_features for p in pairs)


def test_assign_and_read_round_trip():
    model = tiny_lora_model("gpt2")
    pairs = find_lora_pairs(model)
    values = {p.name: (p.A.detach() + 1.0, None) for p in pairs}
    assign_lora_weights(pairs, values)
    read = read_lora_weights(pairs)
    assert all((read[p.name][0] == values[p.name][0]).all() for p in pairs)
    with pytest.raises(ValueError, match="does not fit"):
        assign_lora_weights(pairs[:1], {pairs[0].name: (pairs[0].A.detach()[:1], None)})


def test_unknown_adapter_and_fsdp_are_refused_clearly():
    with pytest.raises(ValueError, match="adapter_name='other' not found"):
        find_lora_pairs(tiny_lora_model("llama"), "other")
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = tiny_lora_model("llama")
        fully_shard(model)
        with pytest.raises(NotImplementedError, match="FSDP are not supported"):
            find_lora_pairs(model)
    finally:
        dist.destroy_process_group()
