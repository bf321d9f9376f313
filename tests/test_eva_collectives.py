"""``distributed.all_gather_rows`` (EVA's gather of rows and sketches): real 2-process gloo, uneven and empty parts,
and the tensor handed to the collective sits on the process group's device (NCCL needs CUDA tensors)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launch import free_port

from hf_svd_plugins import distributed as hd

pytestmark = pytest.mark.distributed


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = torch.arange(3 * 4 * (rank + 1), dtype=torch.float64).reshape(3 * (rank + 1), 4) + 100 * rank
        empty = torch.zeros(0, 2, dtype=torch.float32) if rank == 0 else torch.ones(2, 2, dtype=torch.float32)
        out[rank] = (hd.all_gather_rows(rows), hd.all_gather_rows(empty))
    finally:
        dist.destroy_process_group()


def test_all_gather_rows_in_a_real_two_process_group():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
        results = dict(out)
    expected = [torch.arange(12, dtype=torch.float64).reshape(3, 4), torch.arange(24, dtype=torch.float64).reshape(6, 4) + 100]
    for rank in (0, 1):
        gathered, with_empty = results[rank]
        assert len(gathered) == 2 and all(torch.equal(g, e) for g, e in zip(gathered, expected, strict=True))
        assert [t.shape for t in with_empty] == [(0, 2), (2, 2)] and with_empty[1].dtype == torch.float32


def test_all_gather_rows_is_a_no_op_outside_a_process_group():
    t = torch.ones(3, 2)
    assert hd.all_gather_rows(t)[0] is t


def test_all_gather_rows_hands_the_collective_tensors_on_the_group_device(monkeypatch):
    seen = []

    class Handed(Exception):
        pass

    def all_gather(outputs, tensor, group=None):
        seen.append(tensor.device)
        raise Handed

    monkeypatch.setattr(hd, "is_distributed", lambda: True)
    monkeypatch.setattr(hd, "collective_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    with pytest.raises(Handed):
        hd.all_gather_rows(torch.ones(3, 2))
    assert seen == [torch.device("meta")]
