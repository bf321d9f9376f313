"""EVA's model glue: collect LoRA-layer inputs with forward hooks, run the core, write A/B back into a PEFT model.

Two ways to apply the result:
- *masked* (inside a running Trainer): every module keeps ``r_max`` rows/columns; ranks beyond ``r_m`` are zero in A
  and B, so their gradients stay exactly zero. Saving truncates to ``r_m`` (``rank_pattern``/``alpha_pattern``).
- *resized* (``eva_init`` before a Trainer exists): LoRA layers are rebuilt with ``r_m`` ranks through PEFT's
  ``update_layer``; rank-0 modules get their LoRA layer removed, as PEFT's own EVA does.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_svd_plugins.distributed import all_reduce_sum_, broadcast_flag, is_distributed, process_rank
from hf_svd_plugins.eva.config import EvaConfig
from hf_svd_plugins.eva.core import (
    ActivationStats,
    Components,
    allocate_ranks,
    eva_matrix,
    group_identical_streams,
    principal_components,
    subspace_similarity,
)
from hf_svd_plugins.lora import (
    LoraPair,
    assign_lora_weights,
    find_lora_pairs,
    full_shape,
    unwrap_peft_model,
)

logger = logging.getLogger(__name__)

_FINGERPRINT_PROBES = 4


@dataclass
class EvaResult:
    """What EVA decided.

    Attributes:
        ranks: ``{module: r_m}`` (0 = no adapter).
        alphas: ``{module: alpha_m}`` to save in ``alpha_pattern``.
        scalings: ``{module: s_m}``, the LoRA scale to use with ``r_m`` ranks.
        matrices: ``{module: A (r_m, d_in)}`` float64 on CPU.
        batches_used: minibatches read.
        converged: ``{module: bool}``.
        seconds: wall time of the computation.
    """

    ranks: dict[str, int]
    alphas: dict[str, float]
    scalings: dict[str, float]
    matrices: dict[str, torch.Tensor] = field(repr=False)
    batches_used: int
    converged: dict[str, bool]
    seconds: float

    def log_metrics(self) -> dict[str, float]:
        """Flat numbers for the Trainer's log (TensorBoard/W&B): per-module ranks and totals."""
        metrics = {
            "eva/batches_used": float(self.batches_used),
            "eva/seconds": round(self.seconds, 3),
            "eva/rank_total": float(sum(self.ranks.values())),
            "eva/modules_converged": float(sum(self.converged.values())),
            "eva/modules_without_adapter": float(sum(r == 0 for r in self.ranks.values())),
        }
        metrics.update({f"eva/rank/{name}": float(r) for name, r in self.ranks.items()})
        return metrics


# ------------------------------------------------------------------------------------------------ validation


def eva_pairs(model: nn.Module, config: EvaConfig) -> list[LoraPair]:
    """The LoRA pairs EVA will initialise, with every input problem reported before any forward pass."""
    peft_model = unwrap_peft_model(model)
    pairs = find_lora_pairs(peft_model, config.adapter_name)
    if not pairs:
        raise ValueError(
            "model has no LoRA Linear layers to initialise with EVA; check LoraConfig.target_modules "
            "(EVA supports nn.Linear and GPT-2 Conv1D targets, not embeddings or convolutions)"
        )
    for pair in pairs:
        if pair.r > pair.in_features:
            raise ValueError(
                f"rank {pair.r} exceeds in_features {pair.in_features} of {pair.name}; EVA's A rows are directions in "
                f"the input space, so lower r (or rank_pattern for this module) to <= {pair.in_features}"
            )
    return pairs


def base_rank_and_alpha(model: nn.Module, pair: LoraPair) -> tuple[int, float]:
    """The rank ``r`` and ``alpha`` the user configured for this module (``rank_pattern``/``alpha_pattern`` aware)."""
    from peft.utils.other import get_pattern_key

    config = unwrap_peft_model(model).peft_config[pair.adapter]
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), pair.name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), pair.name), config.lora_alpha)
    return int(r), float(alpha)


def max_rank(model: nn.Module, pair: LoraPair, config: EvaConfig) -> int:
    """``r_max`` of a module: ``round(rho * r)`` of its configured rank, capped at its input width."""
    return min(config.max_components(base_rank_and_alpha(model, pair)[0]), pair.in_features)


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ------------------------------------------------------------------------------------------------ collection


def token_mask(batch: Mapping, config: EvaConfig) -> torch.Tensor | None:
    """``(batch, seq)`` bool mask of tokens whose activations count: not padding, and (optionally) not label-masked."""
    ids = batch.get("input_ids")
    mask = batch.get("attention_mask")
    if mask is None and ids is None:
        return None
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    if config.use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != config.label_mask_value)
    return mask


def select_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows ``(n, d)`` of a layer input ``x (..., d)``: masked tokens if ``x`` is per token, all rows otherwise."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def model_forward_kwargs(model: nn.Module, batch: Mapping) -> dict:
    """``batch`` as keyword arguments the model's ``forward`` accepts (dicts and ``BatchEncoding`` alike)."""
    params = inspect.signature(model.forward).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in batch.items() if accepts_any or k in params}


def _as_mapping(batch: object) -> Mapping:
    if isinstance(batch, Mapping):
        return batch
    if hasattr(batch, "keys") and hasattr(batch, "__getitem__"):  # BatchEncoding, UserDict
        return {k: batch[k] for k in batch.keys()}
    raise TypeError(
        f"EVA needs dict-like batches (input_ids, attention_mask, labels ...), got {type(batch).__name__}; "
        "use a collator that returns a dict or a BatchEncoding"
    )


def _move(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _all_reduce_stats(stats: ActivationStats) -> ActivationStats:
    total = ActivationStats(stats.count.clone(), stats.total.clone(), stats.gram.clone())
    all_reduce_sum_([total.count.reshape(1), total.total, total.gram])
    return total


class _InputCollector:
    """Forward hooks on LoRA layers that accumulate one batch of input statistics per stream."""

    def __init__(self, pairs: list[LoraPair], product_dtype: torch.dtype = torch.float32):
        self.pairs = pairs
        self.product_dtype = product_dtype
        self.mask: torch.Tensor | None = None
        self.stream_of: dict[str, str] | None = None  # None while fingerprinting the first batch
        self.active: set[str] = set()
        self.batch_stats: dict[str, ActivationStats] = {}
        # Single process: fold each layer's batch statistics into the running ones inside the hook, so one batch's
        # d x d products are never all alive at once. Distributed runs keep them until the per-batch all-reduce.
        self.fold_into: dict[str, ActivationStats] | None = None
        self.fingerprints: dict[str, torch.Tensor] = {}
        self._probe: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> _InputCollector:
        for pair in self.pairs:
            self._handles.append(pair.module.register_forward_hook(partial(self._hook, pair.name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def _hook(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        x = args[0] if isinstance(args, tuple) else args
        rows = select_rows(x, self.mask)
        if self.stream_of is None:
            if self._probe is None or self._probe.shape[0] < rows.shape[1]:
                gen = torch.Generator().manual_seed(1234)
                self._probe = torch.randn(rows.shape[1], _FINGERPRINT_PROBES, generator=gen, dtype=torch.float64)
            self.fingerprints[name] = rows.to(torch.float64) @ self._probe[: rows.shape[1]].to(rows.device)
            self.batch_stats[name] = ActivationStats.of(rows, self.product_dtype)
            return
        stream = self.stream_of[name]
        if stream != name or stream not in self.active:
            return
        if self.fold_into is not None:
            self.fold_into[stream].add_(ActivationStats.of(rows, self.product_dtype))
            return
        self.batch_stats[name] = ActivationStats.of(rows, self.product_dtype)


def compute_eva(
    model: nn.Module,
    dataloader: Iterable,
    config: EvaConfig,
    pairs: list[LoraPair] | None = None,
) -> EvaResult:
    """Run EVA's forward passes on ``dataloader`` and decide ranks and A matrices (nothing is written to the model).

    All ranks of a distributed run must call this together; statistics are all-reduced every batch, so every rank
    reaches the same decision after the same number of batches.
    """
    start = time.perf_counter()
    peft_model = unwrap_peft_model(model)
    pairs = pairs if pairs is not None else eva_pairs(peft_model, config)
    use_rslora = bool(getattr(peft_model.peft_config[pairs[0].adapter], "use_rslora", False))
    base = {p.name: base_rank_and_alpha(peft_model, p) for p in pairs}
    r_max = {p.name: max_rank(peft_model, p, config) for p in pairs}
    budget = sum(r for r, _ in base.values())
    device = next(p for p in peft_model.parameters()).device

    stats: dict[str, ActivationStats] = {}
    components: dict[str, Components] = {}
    previous_vectors: dict[str, torch.Tensor] = {}
    collector = _InputCollector(pairs, getattr(torch, config.product_dtype))
    ranks = dict(r_max)
    converged_streams: set[str] = set()
    batches_used = 0
    members: dict[str, list[str]] = {}

    was_training = peft_model.training
    peft_model.eval()
    show_bar = config.show_progress_bar and process_rank() == 0
    bar = tqdm(total=config.max_batches, desc="EVA", disable=not show_bar, leave=False)
    disable_adapter = peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else nullcontext()
    try:
        with torch.no_grad(), disable_adapter, collector:
            while batches_used < config.max_batches:
                progressed = False
                for batch in dataloader:
                    batch = _move(_as_mapping(batch), device)
                    collector.mask = token_mask(batch, config)
                    collector.batch_stats = {}
                    peft_model(**model_forward_kwargs(peft_model, batch))
                    progressed = True
                    batches_used += 1
                    if collector.stream_of is None:
                        collector.stream_of = group_identical_streams(list(collector.fingerprints.items()))
                        collector.fingerprints.clear()
                        for name, stream in collector.stream_of.items():
                            members.setdefault(stream, []).append(name)
                        collector.active = set(members)
                        collector.batch_stats = {s: collector.batch_stats[s] for s in members}
                        if not is_distributed():
                            collector.fold_into = stats
                    for stream in sorted(collector.active):
                        if collector.fold_into is None or stream not in stats:
                            local = collector.batch_stats.get(stream)
                            if local is None:
                                dim = next(p.in_features for p in pairs if p.name == stream)
                                local = ActivationStats.zeros(dim)
                            batch_total = _all_reduce_stats(ActivationStats(
                                local.count.cpu(), local.total.cpu(), local.gram.cpu()))
                            stats.setdefault(stream, ActivationStats.zeros(batch_total.total.shape[0]))
                            stats[stream].add_(batch_total)
                        k = max(r_max[m] for m in members[stream])
                        previous = components.get(stream)
                        # Between batches a few warm-started iterations track the estimate (it only has to stop
                        # moving, as judged by tau); the final pass below solves to full precision.
                        current = principal_components(stats[stream], k, config.center, tol=1e-6, max_iters=3,
                                                       init=None if previous is None else previous.vectors)
                        if previous is not None:
                            previous_vectors[stream] = previous.vectors
                        components[stream] = current
                    ranks = _allocate(components, members, r_max, budget)
                    converged_streams = {
                        s for s in members
                        if s in previous_vectors and subspace_similarity(
                            previous_vectors[s], components[s].vectors, _needed(s, members, ranks)) >= config.tau
                    }
                    collector.active = set(members) - converged_streams
                    bar.update(1)
                    bar.set_postfix_str(f"{len(converged_streams)}/{len(members)} inputs converged")
                    done = batches_used >= config.min_batches and not collector.active
                    if broadcast_flag(done or batches_used >= config.max_batches):
                        break
                else:
                    if not progressed:
                        raise ValueError("EVA's dataloader is empty; pass the training dataloader (or a non-empty one)")
                    continue
                break
    finally:
        bar.close()
        peft_model.train(was_training)

    # Final directions with a tighter solver tolerance (full eigh for narrow layers: exact float64).
    final = {s: principal_components(stats[s], max(r_max[m] for m in members[s]), config.center,
                                     init=components[s].vectors, tol=1e-10) for s in members}
    ranks = _allocate(final, members, r_max, budget)
    not_converged = sorted(m for s in members for m in members[s] if s not in converged_streams and ranks[m] > 0)
    if not_converged:
        warnings.warn(
            f"EVA stopped at max_batches={config.max_batches} before {len(not_converged)} module(s) converged "
            f"(tau={config.tau}): {not_converged[:5]}{' ...' if len(not_converged) > 5 else ''}; their A uses all "
            "batches read. Raise max_batches or lower tau for a tighter estimate.",
            stacklevel=2,
        )
    stream_of = collector.stream_of or {}
    matrices, alphas, scalings = {}, {}, {}
    for pair in pairs:
        r_m = ranks[pair.name]
        comps = final[stream_of[pair.name]]
        matrices[pair.name] = eva_matrix(comps, r_m, r_m, whiten=config.whiten)
        r0, alpha0 = base[pair.name]
        s0 = lora_scale(alpha0, r0, use_rslora)
        if config.adjust_scaling_factors:
            alphas[pair.name] = s0 * (math.sqrt(r_m) if use_rslora else r_m)
            scalings[pair.name] = s0
        else:
            alphas[pair.name] = alpha0
            scalings[pair.name] = lora_scale(alpha0, r_m, use_rslora) if r_m > 0 else s0
    return EvaResult(
        ranks=ranks,
        alphas=alphas,
        scalings=scalings,
        matrices=matrices,
        batches_used=batches_used,
        converged={m: stream_of.get(m) in converged_streams for m in ranks},
        seconds=time.perf_counter() - start,
    )


def _needed(stream: str, members: dict[str, list[str]], ranks: dict[str, int]) -> int:
    return max(ranks[m] for m in members[stream])


def _allocate(components: dict[str, Components], members: dict[str, list[str]], r_max: dict[str, int],
              budget: int) -> dict[str, int]:
    ordered = [m for s in members for m in members[s]]
    stream_of = {m: s for s in members for m in members[s]}
    ratios = {m: components[stream_of[m]].explained_variance_ratio[: r_max[m]] for m in ordered}
    return allocate_ranks(ratios, budget)


# ------------------------------------------------------------------------------------------------ writing back


def grow_to_max_rank(model: nn.Module, pairs: list[LoraPair], config: EvaConfig) -> None:
    """Give every LoRA layer ``r_max = round(rho * r)`` ranks (same scale ``alpha / r``) so EVA can redistribute
    ranks later without changing shapes. Call before the optimizer exists."""
    from copy import copy

    peft_model = unwrap_peft_model(model)
    for pair in pairs:
        r0, alpha0 = base_rank_and_alpha(peft_model, pair)
        r_max = max_rank(peft_model, pair, config)
        if pair.r == r_max:
            continue
        layer_config = copy(peft_model.peft_config[pair.adapter])
        layer_config.init_lora_weights = True
        use_rslora = bool(getattr(layer_config, "use_rslora", False))
        s0 = lora_scale(alpha0, r0, use_rslora)
        alpha_max = s0 * (math.sqrt(r_max) if use_rslora else r_max)
        pair.module.update_layer(pair.adapter, r=r_max, lora_alpha=alpha_max, config=layer_config)


@torch.no_grad()
def apply_masked(pairs: list[LoraPair], result: EvaResult, optimizer: object | None = None) -> None:
    """Write EVA into fixed-width LoRA layers: ``A[:r_m] = V_m``, other rows 0, ``B = 0``; set the scales.

    Every rank ends with rank 0's values (see :func:`hf_svd_plugins.lora.assign_lora_weights`).
    """
    values = {}
    for pair in pairs:
        a = torch.zeros(full_shape(pair.A), dtype=torch.float64)
        a[: result.ranks[pair.name]] = result.matrices[pair.name]
        values[pair.name] = (a, torch.zeros(full_shape(pair.B)))
        pair.module.scaling[pair.adapter] = result.scalings[pair.name]
    assign_lora_weights(pairs, values, optimizer=optimizer)


@torch.no_grad()
def zero_unused_ranks(pairs: list[LoraPair], ranks: Mapping[str, int], scalings: Mapping[str, float],
                      optimizer: object | None = None) -> None:
    """Re-impose EVA's mask on fixed-width layers (after a resume): zero A rows and B columns beyond ``r_m``."""
    from hf_svd_plugins.lora import read_lora_weights

    current = read_lora_weights(pairs)
    values = {}
    for pair in pairs:
        a, b = current[pair.name]
        r_m = ranks[pair.name]
        a, b = a.clone(), b.clone()
        a[r_m:] = 0
        b[:, r_m:] = 0
        values[pair.name] = (a, b)
        pair.module.scaling[pair.adapter] = scalings[pair.name]
    assign_lora_weights(pairs, values, optimizer=optimizer)


def update_saved_layout(model: nn.Module, pairs: list[LoraPair], result_ranks: Mapping[str, int],
                        result_alphas: Mapping[str, float]) -> None:
    """Record EVA's ranks in the PEFT config so saved adapters are standard (``rank_pattern``/``alpha_pattern``,
    rank-0 modules dropped from ``target_modules``)."""
    peft_model = unwrap_peft_model(model)
    adapter = pairs[0].adapter
    config = peft_model.peft_config[adapter]
    config.rank_pattern = {n: int(r) for n, r in result_ranks.items() if r > 0 and r != config.r}
    config.alpha_pattern = {n: float(a) for n, a in result_alphas.items()
                            if result_ranks[n] > 0 and a != config.lora_alpha}
    if any(r == 0 for r in result_ranks.values()):
        config.target_modules = {n for n, r in result_ranks.items() if r > 0}


class SavedRankLayout:
    """State-dict hooks that make a fixed-width (masked) EVA model save and load as a standard truncated adapter.

    Saving slices A to its first ``r_m`` rows and B to its first ``r_m`` columns (and drops rank-0 modules); loading
    a truncated adapter zero-pads back to the live width, so Trainer checkpoints resume into the masked layout.
    """

    def __init__(self, pairs: list[LoraPair], widths: Mapping[str, int]):
        self.widths = dict(widths)
        self.ranks: dict[str, int] | None = None
        self._handles = []
        for pair in pairs:
            for sub, axis in ((pair.module.lora_A[pair.adapter], 0), (pair.module.lora_B[pair.adapter], 1)):
                self._handles.append(sub.register_state_dict_post_hook(partial(self._truncate, pair.name, axis)))
                self._handles.append(sub.register_load_state_dict_pre_hook(partial(self._pad, pair.name, axis)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _truncate(self, name, axis, module, state_dict, prefix, local_metadata) -> None:
        if self.ranks is None or name not in self.ranks:
            return
        key = prefix + "weight"
        t = state_dict.get(key)
        if t is None or t.dim() != 2 or t.shape[axis] != self.widths[name]:
            return  # e.g. a ZeRO-3 shard: leave it alone
        r_m = self.ranks[name]
        if r_m == 0:
            del state_dict[key]
        else:
            state_dict[key] = t.narrow(axis, 0, r_m).clone()

    def _pad(self, name, axis, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "weight"
        t = state_dict.get(key)
        width = self.widths[name]
        if t is None or t.dim() != 2 or t.shape[axis] >= width:
            return
        shape = list(t.shape)
        shape[axis] = width - t.shape[axis]
        state_dict[key] = torch.cat([t, t.new_zeros(shape)], dim=axis)


@torch.no_grad()
def apply_resized(model: nn.Module, pairs: list[LoraPair], result: EvaResult) -> None:
    """Rebuild each LoRA layer with ``r_m`` ranks (PEFT ``update_layer``), A = EVA directions, B = 0; rank-0 layers
    are replaced by their base layer. Only before an optimizer holds the old parameters."""
    from copy import copy

    from peft.utils.other import _get_submodules

    peft_model = unwrap_peft_model(model)
    layer_config = copy(peft_model.peft_config[pairs[0].adapter])
    layer_config.init_lora_weights = True
    for pair in pairs:
        r_m = result.ranks[pair.name]
        if r_m == 0:
            full_name = next(n for n, m in peft_model.named_modules() if m is pair.module)
            parent, _, target_name = _get_submodules(peft_model, full_name)
            setattr(parent, target_name, pair.module.get_base_layer())
            continue
        pair.module.update_layer(pair.adapter, r=r_m, lora_alpha=result.alphas[pair.name], config=layer_config)
        pair.module.scaling[pair.adapter] = result.scalings[pair.name]
    kept = [p for p in pairs if result.ranks[p.name] > 0]
    assign_lora_weights(kept, {p.name: (result.matrices[p.name], torch.zeros(p.B.shape)) for p in kept})
    update_saved_layout(peft_model, pairs, result.ranks, result.alphas)
