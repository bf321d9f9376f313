"""Gram matrices ``G = X^T X`` of layer inputs on calibration data, for whitening, within a memory bound.

Layers fed the same input tensor (q/k/v, gate/up) form one *stream* and share one Gram. A float64 ``d_in x d_in``
Gram per stream is ``8 d_in^2`` bytes: at 7B (hidden 4096, intermediate 11008, 4 streams per layer) ~1.4 GB per layer,
44 GB for 32 layers. Streams are therefore collected in chunks of at most ``memory_gb``: one pass over the
calibration batches per chunk, each pass stopped right after the chunk's last layer has read its input (so pass ``i``
costs a fraction of a forward). All passes run on the unchanged model, so every layer is calibrated on the dense
model's activations. Padding rows (``attention_mask == 0``) are left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_svd_plugins.distributed import all_reduce_sum_, is_distributed
from hf_svd_plugins.fwsvd.targets import TargetLayer
from hf_svd_plugins.lora import is_zero3_param


class _StopForward(Exception):
    """Raised by a hook once every stream of the current chunk has read its input."""


@dataclass
class Stream:
    """Layers reading one input tensor; ``d_in`` features."""

    layers: list[str]
    d_in: int

    @property
    def gram_bytes(self) -> int:
        return 8 * self.d_in * self.d_in


@dataclass
class GramPlan:
    streams: list[Stream]
    chunks: list[list[int]] = field(default_factory=list)  # stream indices per chunk

    def stream_of(self, layer: str) -> int:
        return next(i for i, s in enumerate(self.streams) if layer in s.layers)


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(torch.bool)]
    return x.reshape(-1, x.shape[-1])


def plan_streams(model: nn.Module, layers: Sequence[TargetLayer], batch: Mapping, memory_gb: float) -> GramPlan:
    """Find which layers share an input (one forward on ``batch``) and cut the streams into chunks of ``memory_gb``."""
    seen: dict[str, torch.Tensor] = {}  # the tensors themselves: ids of freed tensors are reused

    def record(name: str):
        def hook(module, args, output):
            seen.setdefault(name, args[0])

        return hook

    handles = [t.outer.register_forward_hook(record(t.name)) for t in layers]
    try:
        with torch.no_grad():
            model(**_to_device(batch, next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    missing = [t.name for t in layers if t.name not in seen]
    if missing:
        raise ValueError(f"calibration batches never reach {missing[:4]}: whitening needs their inputs")
    streams: list[Stream] = []
    by_input: dict[int, Stream] = {}
    for t in layers:
        key = id(seen[t.name])
        if key not in by_input:
            by_input[key] = Stream([], t.shape[1])
            streams.append(by_input[key])
        by_input[key].layers.append(t.name)
    plan = GramPlan(streams)
    budget, current, used = memory_gb * 2**30, [], 0
    for i, stream in enumerate(streams):
        if current and used + stream.gram_bytes > budget:
            plan.chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += stream.gram_bytes
    plan.chunks.append(current)
    return plan


def collect_grams(model: nn.Module, layers: Sequence[TargetLayer], batches: Sequence[Mapping], plan: GramPlan,
                  chunk: Sequence[int]) -> dict[int, torch.Tensor]:
    """``{stream index: G (d_in, d_in) float64}`` for the streams of one chunk, over all ``batches``; summed over
    ranks under data parallelism (every rank must call with its own batches, the same number of them)."""
    outer = {t.name: t.outer for t in layers}
    device = next(model.parameters()).device
    grams = {i: torch.zeros(plan.streams[i].d_in, plan.streams[i].d_in, dtype=torch.float64, device=device)
             for i in chunk}
    # a raised exception would leave ZeRO-3's parameter fetching mid-forward: run whole forwards there
    early_stop = not any(is_zero3_param(p) for p in model.parameters())
    state: dict = {"done": set(), "mask": None}

    def hook(module, args, output, stream: int):
        if stream in state["done"]:
            return
        x = _rows(args[0].detach(), state["mask"]).to(torch.float64)
        grams[stream].addmm_(x.T, x)
        state["done"].add(stream)
        if early_stop and len(state["done"]) == len(grams):
            raise _StopForward

    handles = [outer[name].register_forward_hook(lambda m, a, o, s=i: hook(m, a, o, s))
               for i in chunk for name in plan.streams[i].layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = _to_device(batch, device)
                state["done"], state["mask"] = set(), batch.get("attention_mask")
                try:
                    model(**batch)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if is_distributed():
        all_reduce_sum_(list(grams.values()))
    return grams


def iter_stream_grams(model: nn.Module, layers: Sequence[TargetLayer], batches: Sequence[Mapping], plan: GramPlan
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(layer name, its stream's Gram)`` for every layer, chunk by chunk (one chunk's Grams alive at a time)."""
    for chunk in plan.chunks:
        grams = collect_grams(model, layers, batches, plan, chunk)
        for i in chunk:
            for name in plan.streams[i].layers:
                yield name, grams[i]
        del grams
