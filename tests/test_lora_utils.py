"""lora.py: finding pairs, reading and writing them (whole, FSDP2 DTensors), refusing what it cannot handle."""

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
from tiny import tiny_batches, tiny_lora_model

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


def test_unknown_adapter_and_fsdp1_are_refused_clearly():
    with pytest.raises(ValueError, match="adapter_name='other' not found"):
        find_lora_pairs(tiny_lora_model("llama"), "other")
    model = tiny_lora_model("llama")
    find_lora_pairs(model)[0].A._fsdp_flattened = True  # what FSDP1's FlatParameter views carry
    with pytest.raises(NotImplementedError, match="flattened by FSDP1.*fsdp_version: 2"):
        find_lora_pairs(model)


@contextlib.contextmanager
def _one_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_dtensor_pairs_read_write_and_optimizer_state_in_one_process():
    """FSDP2 (fully_shard) on a 1-process gloo mesh: LoRA weights are DTensors; reads, writes and optimizer state
    go through full_tensor / distribute_tensor, also after a forward left the root unit gathered."""
    from torch.distributed.fsdp import fully_shard

    from hf_svd_plugins.lora import is_dtensor, read_optimizer_state, write_optimizer_state

    with _one_process_group():
        model = tiny_lora_model("llama", r=4)
        before = read_lora_weights(find_lora_pairs(model))
        layers = model.base_model.model.model.layers
        fully_shard(layers[0])  # layers[1] stays in the root unit, which a forward leaves gathered
        fully_shard(model)
        pairs = find_lora_pairs(model)
        assert all(is_dtensor(p.A) and is_dtensor(p.B) for p in pairs)
        assert pairs[0].fsdp_unit is layers[0] and pairs[-1].fsdp_unit is model
        read = read_lora_weights(pairs)
        assert all(torch.equal(read[n][0], a) and torch.equal(read[n][1], b) for n, (a, b) in before.items())

        batch = {k: v for k, v in tiny_batches(1, 2)[0].items() if k != "labels"}
        with torch.no_grad():
            model(**batch)
        assert not is_dtensor(pairs[-1].A)  # gathered by the forward
        values = {p.name: (torch.full(p.A.shape, 0.5), torch.full(p.B.shape, 0.25)) for p in pairs}
        assign_lora_weights(pairs, values)
        assert is_dtensor(pairs[-1].A)
        read = read_lora_weights(pairs)
        assert all(torch.equal(read[n][0], a) and torch.equal(read[n][1], b) for n, (a, b) in values.items())

        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(**tiny_batches(1, 2)[0]).loss.backward()
        opt.step()
        params = [pairs[0].B, pairs[-1].A]
        states = read_optimizer_state(opt, params)
        assert all(set(s) == {"exp_avg", "exp_avg_sq"} and not is_dtensor(s["exp_avg"]) for s in states)
        assert tuple(states[0]["exp_avg"].shape) == tuple(pairs[0].B.shape)
        write_optimizer_state(opt, params, [{"exp_avg": s["exp_avg"] * 3} for s in states])
        again = read_optimizer_state(opt, params)
        for s, t in zip(states, again, strict=True):
            torch.testing.assert_close(t["exp_avg"], s["exp_avg"] * 3)
            assert torch.equal(t["exp_avg_sq"], s["exp_avg_sq"])
