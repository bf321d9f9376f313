"""EVA's collection pass: read minibatches, keep one statistic per distinct layer input, stop once spans settle.

Forward hooks on the LoRA layers see each layer's input tensor. Layers fed the *same tensor object* (q/k/v, gate/up)
form one stream, decided inside the first forward pass before any statistic exists, so only one statistic per
distinct input is ever formed. Each stream keeps either exact statistics (:class:`~hf_svd_plugins.eva.core.ActivationStats`)
or, above a width, a bounded sketch (:class:`~hf_svd_plugins.eva.sketch.FrequentDirections`); see
:class:`~hf_svd_plugins.eva.config.EvaConfig` ``statistics``.

In one process the statistic is updated inside the hook, so a batch's rows never outlive their layer. Under data
parallelism each stream's per-batch contribution is combined after the forward, in a fixed order on every rank, by
whichever is smaller for its width: all-reducing exact statistics (``8 (d^2 + d + 1)`` bytes), all-gathering the rows
(``W n d b``) or all-gathering per-rank sketches (``W (b l d + 8 (d + 3))``), with ``W`` ranks, ``n`` valid tokens per
rank (estimated on the first batch) and ``b`` bytes per product element. Every rank then holds the same statistics and
takes the same decisions; rank 0's stop decisions are broadcast so all ranks run the same number of collectives.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_svd_plugins.distributed import (
    all_gather_rows,
    all_reduce_sum_,
    broadcast_,
    is_distributed,
    process_rank,
    world_size,
)
from hf_svd_plugins.eva.batches import (
    as_mapping,
    cycle_batches,
    eva_forward_kwargs,
    execution_device,
    global_token_counts,
    move_batch,
    select_rows,
    token_mask,
)
from hf_svd_plugins.eva.config import EvaConfig
from hf_svd_plugins.eva.core import (
    ActivationStats,
    Components,
    allocate_ranks,
    principal_components,
    subspace_similarity,
)
from hf_svd_plugins.eva.sketch import FrequentDirections, exact_bytes, sketch_bytes
from hf_svd_plugins.lora import LoraPair

REDUCE, GATHER_ROWS, GATHER_SKETCH = "all_reduce_statistics", "all_gather_rows", "all_gather_sketches"


# ------------------------------------------------------------------------------------------------ streams


class _ExactStream:
    """Exact float64 statistics; combined across ranks by all-reduce or by gathering rows."""

    kind = "exact"

    def __init__(self, dim: int, config: EvaConfig, route: str, device: torch.device):
        self.stats = ActivationStats.zeros(dim, device)
        self.center, self.route = config.center, route
        self.product_dtype = getattr(torch, config.product_dtype)
        self.capacity = dim
        self.shrinkage = 0.0

    def add_rows(self, rows: torch.Tensor) -> int:
        self.stats.add_(ActivationStats.of(rows, self.product_dtype))
        return rows.shape[0]

    def local_part(self, rows: torch.Tensor, part: object | None = None) -> object:
        """This rank's batch contribution, ``rows`` added to ``part`` (a layer called twice in one forward)."""
        if self.route == GATHER_ROWS:
            rows = rows.to(self.product_dtype)
            return rows if part is None else torch.cat([part, rows])
        stats = ActivationStats.of(rows, self.product_dtype)
        return stats if part is None else part.add_(stats)

    def empty_part(self) -> object:
        dim = self.stats.total.shape[0]
        if self.route == GATHER_ROWS:
            return torch.zeros(0, dim, dtype=self.product_dtype, device=self.stats.gram.device)
        return ActivationStats.zeros(dim, self.stats.gram.device)

    def combine(self, part: object) -> int:
        if self.route == GATHER_ROWS:
            return sum(self.add_rows(rows) for rows in all_gather_rows(part))
        all_reduce_sum_([part.count.reshape(1), part.total, part.gram])
        self.stats.add_(part)
        return int(part.count)

    def components(self, k: int, previous: Components | None, final: bool) -> Components:
        # Between batches a few warm-started iterations track the estimate (it only has to stop moving, as judged
        # by tau); the final pass solves to full precision (full eigh for narrow layers: exact float64).
        init = None if previous is None else previous.vectors
        if final:
            return principal_components(self.stats, k, self.center, init=init, tol=1e-10)
        return principal_components(self.stats, k, self.center, init=init, tol=1e-6, max_iters=3)


class _SketchStream:
    """A Frequent Directions sketch; combined across ranks by gathering rows or per-rank sketches."""

    kind = "sketch"

    def __init__(self, dim: int, capacity: int, config: EvaConfig, route: str, device: torch.device):
        self.center, self.route = config.center, route
        self.sketch = FrequentDirections.empty(dim, capacity, getattr(torch, config.product_dtype), device)

    @property
    def capacity(self) -> int:
        return self.sketch.capacity

    @property
    def shrinkage(self) -> float:
        return float(self.sketch.shrinkage)

    def add_rows(self, rows: torch.Tensor) -> int:
        self.sketch.update_(rows, self.center)
        return rows.shape[0]

    def local_part(self, rows: torch.Tensor, part: object | None = None) -> object:
        """This rank's batch contribution, ``rows`` added to ``part`` (a layer called twice in one forward)."""
        if self.route == GATHER_ROWS:
            rows = rows.to(self.sketch.rows.dtype)
            return rows if part is None else torch.cat([part, rows])
        if part is None:
            return FrequentDirections.of(rows, self.capacity, self.center, self.sketch.rows.dtype)
        return part.update_(rows, self.center)

    def empty_part(self) -> object:
        if self.route == GATHER_ROWS:
            return self.sketch.rows.new_zeros(0, self.sketch.rows.shape[1])
        return FrequentDirections.empty(self.sketch.rows.shape[1], self.capacity, self.sketch.rows.dtype,
                                        self.sketch.rows.device)

    def combine(self, part: object) -> int:
        if self.route == GATHER_ROWS:
            return sum(self.add_rows(rows) for rows in all_gather_rows(part))
        meta = torch.cat([part.count.reshape(1), part.scatter_trace.reshape(1), part.shrinkage.reshape(1), part.mean])
        metas = all_gather_rows(meta[None])
        rows = all_gather_rows(part.rows)
        parts = [FrequentDirections(m[0, 0], m[0, 3:], m[0, 1], r, m[0, 2], self.capacity)
                 for m, r in zip(metas, rows, strict=True)]
        self.sketch.merge_(parts, self.center)
        return int(sum(float(p.count) for p in parts))

    def components(self, k: int, previous: Components | None, final: bool) -> Components:
        return self.sketch.components(k)


def route_bytes(kind: str, dim: int, capacity: int, rows_per_rank: int | None, n_ranks: int,
                row_bytes: int) -> dict[str, int]:
    """Bytes each rank receives per batch for one stream, for every way its contribution may cross ranks.

    ``rows_per_rank`` is the largest number of valid tokens a rank holds (None when unknown: rows are not an option).
    """
    candidates = {REDUCE: exact_bytes(dim)} if kind == "exact" else {GATHER_SKETCH: n_ranks * sketch_bytes(dim, capacity)}
    if rows_per_rank is not None:
        candidates[GATHER_ROWS] = n_ranks * rows_per_rank * dim * row_bytes
    return candidates


def choose_route(kind: str, dim: int, capacity: int, rows_per_rank: int | None, n_ranks: int, row_bytes: int) -> str:
    """How a stream's batch contribution crosses ranks: whichever candidate of :func:`route_bytes` is smallest."""
    candidates = route_bytes(kind, dim, capacity, rows_per_rank, n_ranks, row_bytes)
    return min(candidates, key=candidates.get)


# ------------------------------------------------------------------------------------------------ the pass


@dataclass
class StreamEstimates:
    """What the collection pass found.

    Attributes:
        members: ``{stream: [modules]}``; a stream is named after its first module, every module is in one stream.
        components: ``{stream: Components}`` with ``k = max r_max`` of its members, final precision.
        converged: streams whose needed span settled (``tau``).
        batches_used: minibatches forwarded (globally empty ones are skipped and not counted).
        kinds: ``{stream: "exact" | "sketch"}``.
        shrinkage: ``{stream: Delta}`` of its sketch (0 for exact statistics).
        routes: ``{stream: how batches crossed ranks}`` (only under data parallelism).
        batches_read: ``{stream: indices of the used batches whose rows it took in}`` (it stops once converged).
    """

    members: dict[str, list[str]]
    components: dict[str, Components]
    converged: set[str]
    batches_used: int
    kinds: dict[str, str] = field(default_factory=dict)
    shrinkage: dict[str, float] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)
    batches_read: dict[str, list[int]] = field(default_factory=dict)


def module_ranks(components: Mapping[str, Components], members: Mapping[str, list[str]], r_max: Mapping[str, int],
                 budget: int) -> dict[str, int]:
    """EVA's rank allocation over modules (members of a stream share its explained-variance ratios)."""
    ratios = {m: components[s].explained_variance_ratio[: r_max[m]] for s in members for m in members[s]}
    return allocate_ranks(ratios, budget)


class _Collector:
    """Forward hooks that group LoRA layers by input identity and feed the streams."""

    def __init__(self, pairs: list[LoraPair], r_max: Mapping[str, int], config: EvaConfig):
        self.pairs = {p.name: p for p in pairs}
        self.order = [p.name for p in pairs]
        self.r_max, self.config = r_max, config
        self.distributed = is_distributed()
        self.row_bytes = torch.finfo(getattr(torch, config.product_dtype)).bits // 8
        self.rows_per_rank: int | None = None
        self.mask: torch.Tensor | None = None
        self.stream_of: dict[str, str] = {}
        self.members: dict[str, list[str]] = {}
        self.streams: dict[str, _ExactStream | _SketchStream] = {}
        self.active: set[str] = set()
        self.discovering = True
        self.rows_added: dict[str, int] = {}
        self.pending: dict[str, object] = {}
        self._inputs_seen: list[tuple[weakref.ref, int, str]] = []  # (input, its version then, stream)
        self._handles = []

    def __enter__(self) -> _Collector:
        for pair in self.pairs.values():
            self._handles.append(pair.module.register_forward_hook(partial(self._hook, pair.name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _new_stream(self, name: str, device: torch.device) -> None:
        dim, k = self.pairs[name].in_features, self.r_max[name]
        capacity = self.config.sketch_rows(dim, k)
        kind = "sketch" if self.config.uses_sketch(dim, k) else "exact"
        route = choose_route(kind, dim, capacity, self.rows_per_rank, world_size(), self.row_bytes)
        self.streams[name] = (_SketchStream(dim, capacity, self.config, route, device) if kind == "sketch"
                              else _ExactStream(dim, self.config, route, device))
        self.stream_of[name] = name
        self.members[name] = [name]
        self.active.add(name)

    def _join(self, name: str, stream: str) -> None:
        self.stream_of[name] = stream
        self.members[stream].append(name)
        statistic = self.streams[stream]
        if isinstance(statistic, _SketchStream):  # the stream must hold enough rows for its largest member
            dim = self.pairs[name].in_features
            statistic.sketch.capacity = max(statistic.capacity, self.config.sketch_rows(dim, self.r_max[name]))

    def end_discovery(self) -> None:
        """After the first forward: layers that did not run get their own stream; check every rank agrees."""
        for name in self.order:
            if name not in self.stream_of:
                pair = self.pairs[name]
                self._new_stream(name, pair.A.device)
        self._inputs_seen.clear()
        self.discovering = False
        if self.distributed:
            self._check_same_streams_on_every_rank()

    def _check_same_streams_on_every_rank(self) -> None:
        index = {n: i for i, n in enumerate(self.order)}
        local = torch.tensor([index[self.stream_of[n]] for n in self.order], dtype=torch.int64)
        reference = local.clone()
        broadcast_([reference], src=0)
        mismatch = torch.tensor([float(not torch.equal(local, reference))], dtype=torch.float64)
        all_reduce_sum_([mismatch])
        if mismatch.item() > 0:
            raise RuntimeError(
                "EVA grouped LoRA layers by input differently on different ranks (the model must run the same "
                "layers in the same order on every rank); pass statistics computed on one process via eva_init"
            )

    @torch.no_grad()
    def _hook(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        x = args[0] if isinstance(args, tuple) else args
        if self.discovering and name not in self.stream_of:
            # the same tensor object, not modified in place since: the same rows (a weak reference cannot be
            # fooled by a freed tensor's id being reused)
            same = next((s for ref, version, s in self._inputs_seen if ref() is x and x._version == version), None)
            if same is not None:
                self._join(name, same)
                return
            self._new_stream(name, x.device)
            self._inputs_seen.append((weakref.ref(x), x._version, name))
        stream = self.stream_of.get(name)
        if stream != name or stream not in self.active:
            return
        rows = select_rows(x, self.mask)
        statistic = self.streams[stream]
        if self.distributed:
            self.pending[stream] = statistic.local_part(rows, self.pending.get(stream))
        elif rows.shape[0]:
            self.rows_added[stream] = self.rows_added.get(stream, 0) + statistic.add_rows(rows)

    def forward(self, model: nn.Module, batch: Mapping, rows_per_rank: int | None) -> None:
        """One forward pass over ``batch``; afterwards ``rows_added[stream]`` says how many rows each stream took in
        (over all ranks). ``rows_per_rank`` (the largest valid-token count of a rank) decides routes on the first."""
        if self.discovering:
            self.rows_per_rank = rows_per_rank
        self.rows_added = {}
        model(**eva_forward_kwargs(model, batch))
        if self.discovering:
            self.end_discovery()
        if self.distributed:
            self.combine_across_ranks()

    def combine_across_ranks(self) -> None:
        """Distributed runs: fold every active stream's batch contribution in, one stream at a time, fixed order."""
        for stream in sorted(self.active, key=self.order.index):
            statistic = self.streams[stream]
            part = self.pending.pop(stream, None)
            self.rows_added[stream] = statistic.combine(statistic.empty_part() if part is None else part)
        self.pending.clear()


class _Estimates:
    """Each stream's current directions and those before its last update (what the stop rule compares)."""

    def __init__(self, collector: _Collector, r_max: Mapping[str, int]):
        self.collector, self.r_max = collector, r_max
        self.components: dict[str, Components] = {}
        self.previous: dict[str, torch.Tensor] = {}
        self.batches_read: dict[str, list[int]] = {}

    def width(self, stream: str) -> int:
        return max(self.r_max[m] for m in self.collector.members[stream])

    def update(self, batch_index: int = -1, final: bool = False) -> None:
        """Re-estimate the streams that received rows in batch ``batch_index`` (every stream if ``final``)."""
        streams = self.collector.streams if final else [s for s, n in self.collector.rows_added.items() if n]
        for stream in streams:
            if not final:
                self.batches_read.setdefault(stream, []).append(batch_index)
            previous = self.components.get(stream)
            self.components[stream] = self.collector.streams[stream].components(self.width(stream), previous, final)
            if previous is not None and not final:
                self.previous[stream] = previous.vectors

    def settled(self, ranks: Mapping[str, int], tau: float) -> set[str]:
        """Streams whose needed span (top ``max r_m`` of its members) moved less than ``tau`` in its last update."""
        members = self.collector.members
        return {s for s in members if s in self.previous and subspace_similarity(
            self.previous[s], self.components[s].vectors, max(ranks[m] for m in members[s])) >= tau}

    def with_empty(self) -> dict[str, Components]:
        """All streams' components; those without rows so far explain nothing."""
        out = dict(self.components)
        for stream in self.collector.members:
            if stream not in out:
                k, dim = self.width(stream), self.collector.pairs[stream].in_features
                zeros = torch.zeros(k, dtype=torch.float64)
                out[stream] = Components(torch.zeros(k, dim, dtype=torch.float64), zeros, zeros)
        return out


def collect(model: nn.Module, dataloader: Iterable, config: EvaConfig, pairs: list[LoraPair],
            r_max: Mapping[str, int], budget: int) -> StreamEstimates:
    """Forward minibatches (adapters disabled, no grad, eval mode) until every stream's needed span settles.

    A stream's needed span is the top ``max r_m`` of its members under the current rank allocation; it has settled
    when its smallest principal-angle cosine to the previous batch's is ``>= tau``. All ranks of a distributed run
    must call this together.
    """
    collector = _Collector(pairs, r_max, config)
    estimates = _Estimates(collector, r_max)
    device = execution_device(model)
    converged: set[str] = set()
    batches_used = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=config.max_batches, desc="EVA", leave=False,
               disable=not (config.show_progress_bar and process_rank() == 0))
    disable_adapter = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    batches = cycle_batches(dataloader)
    try:
        batch = next(batches)
        with torch.no_grad(), disable_adapter, collector:
            while True:
                batch = move_batch(as_mapping(batch), device)
                collector.mask = token_mask(batch, config)
                counts = global_token_counts(collector.mask)
                if counts is not None and sum(counts) == 0:  # nothing to read on any rank: skip, do not count
                    batch = batches.send(0)
                    continue
                collector.forward(model, batch, None if counts is None else max(counts))
                estimates.update(batches_used)
                batches_used += 1
                ranks = module_ranks(estimates.with_empty(), collector.members, r_max, budget)
                converged = estimates.settled(ranks, config.tau)
                collector.active = _same_on_every_rank(set(collector.members) - converged, collector.order)
                bar.update(1)
                bar.set_postfix_str(f"{len(converged)}/{len(collector.members)} inputs converged")
                if batches_used >= config.max_batches or (batches_used >= config.min_batches and not collector.active):
                    break
                batch = batches.send(1)
    finally:
        batches.close()
        bar.close()
        model.train(was_training)

    estimates.update(final=True)
    return StreamEstimates(
        members=collector.members, components=estimates.components, converged=converged, batches_used=batches_used,
        kinds={s: st.kind for s, st in collector.streams.items()},
        shrinkage={s: st.shrinkage for s, st in collector.streams.items()},
        routes={s: st.route for s, st in collector.streams.items()} if collector.distributed else {},
        batches_read={s: estimates.batches_read.get(s, []) for s in collector.members},
    )


def _same_on_every_rank(active: set[str], order: list[str]) -> set[str]:
    """Rank 0's set of still-collecting streams, so every rank runs the same collectives."""
    if not is_distributed():
        return active
    flags = torch.tensor([name in active for name in order], dtype=torch.uint8)
    broadcast_([flags], src=0)
    return {name for name, flag in zip(order, flags.tolist(), strict=True) if flag}
