"""The collective helpers: device choice per backend (NCCL needs CUDA tensors) and real 2-process gloo results."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launch import free_port

from hf_svd_plugins import distributed as hd


def test_device_for_backend_matches_what_each_backend_accepts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert hd.device_for_backend("gloo") == torch.device("cpu")
    assert hd.device_for_backend("mpi") == torch.device("cpu")
    assert hd.device_for_backend("cpu:gloo,cuda:nccl") == torch.device("cpu")
    assert hd.device_for_backend("nccl") == torch.device("cuda", 3)


def test_helpers_are_no_ops_outside_a_process_group():
    t = torch.arange(4.0)
    hd.all_reduce_sum_([t])
    hd.broadcast_([t])
    assert torch.equal(t, torch.arange(4.0))
    assert hd.broadcast_int(7) == 7 and hd.broadcast_flag(True) is True
    assert hd.process_rank() == 0 and hd.world_size() == 1 and hd.collective_device() == torch.device("cpu")


class _Handed(Exception):
    pass


@pytest.mark.parametrize("call", ["all_reduce", "broadcast"])
def test_cpu_tensors_are_moved_to_the_group_device_before_the_collective(monkeypatch, call):
    """Under NCCL the group device is CUDA; here a stand-in device (meta) shows the tensor handed over is moved."""
    seen = []

    def collective(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Handed

    monkeypatch.setattr(hd, "is_distributed", lambda: True)
    monkeypatch.setattr(hd, "collective_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, call, collective)
    with pytest.raises(_Handed):
        if call == "all_reduce":
            hd.all_reduce_sum_([torch.ones(3), torch.ones(2, 2)])
        else:
            hd.broadcast_int(5)
    assert seen == [torch.device("meta")]


def test_all_reduce_refuses_mixed_dtypes(monkeypatch):
    monkeypatch.setattr(hd, "is_distributed", lambda: True)
    with pytest.raises(TypeError, match="one dtype"):
        hd.all_reduce_sum_([torch.ones(2), torch.ones(2, dtype=torch.float64)])


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        a = torch.full((2, 3), float(rank + 1), dtype=torch.float64)
        b = torch.tensor([10.0 * (rank + 1)], dtype=torch.float64)
        hd.all_reduce_sum_([a, b])
        seed = hd.broadcast_int(1000 + rank, src=0)
        flag = hd.broadcast_flag(rank == 1, src=1)
        w = torch.full((4,), float(rank), dtype=torch.float32)
        hd.broadcast_([w], src=1)
        out[rank] = (a.clone(), b.clone(), seed, flag, w.clone(), hd.process_rank(), hd.world_size())
    finally:
        dist.destroy_process_group()


def test_real_two_process_gloo_results():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
        results = dict(out)
    for rank, (a, b, seed, flag, w, r, ws) in results.items():
        assert torch.equal(a, torch.full((2, 3), 3.0, dtype=torch.float64))
        assert torch.equal(b, torch.tensor([30.0], dtype=torch.float64))
        assert seed == 1000 and flag is True and torch.equal(w, torch.ones(4))
        assert (r, ws) == (rank, 2)


def test_lora_writes_reach_collectives_only_through_the_helper_on_the_group_device(monkeypatch):
    """hf_svd_plugins.lora's broadcasts (replicated LoRA weights, optimizer state) hand the collective a tensor on the group's
    device (a stand-in for CUDA under NCCL), never the CPU tensor they hold."""
    from tiny import tiny_lora_model

    from hf_svd_plugins.lora import assign_lora_weights, find_lora_pairs, write_optimizer_state

    seen = []

    def collective(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Handed

    pairs = find_lora_pairs(tiny_lora_model("llama"))
    opt = torch.optim.SGD([pairs[0].B], lr=0.1, momentum=0.9)
    pairs[0].B.grad = torch.ones_like(pairs[0].B)
    opt.step()
    monkeypatch.setattr(hd, "is_distributed", lambda: True)
    monkeypatch.setattr(hd, "collective_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, "broadcast", collective)
    with pytest.raises(_Handed):
        assign_lora_weights(pairs[:1], {pairs[0].name: (torch.zeros(pairs[0].A.shape), None)})
    with pytest.raises(_Handed):
        write_optimizer_state(opt, [pairs[0].B], [{"momentum_buffer": torch.zeros(pairs[0].B.shape)}])
    assert seen == [torch.device("meta")] * 2
