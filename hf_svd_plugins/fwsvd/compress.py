"""``fwsvd_compress``: replace Linear layers by pairs of low-rank Linears, weighted by Fisher, activations or nothing.

The adapter around :mod:`hf_svd_plugins.fwsvd.core`: it finds the layers, gathers their statistics (given Fisher
importances, a Fisher pass or whitening Grams on calibration batches), allocates ranks, computes each layer's factors
in float64 one layer at a time, and swaps the modules. Memory beyond the model: one layer's float64 ``W`` and ``M``
(``16 d_out d_in`` bytes: 720 MB for a 7B MLP matrix), the factors of layers not yet swapped (at most the compressed
model's size), and for whitening one chunk of Grams (``memory_gb``).
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_svd_plugins.distributed import broadcast_, is_distributed, process_rank
from hf_svd_plugins.fwsvd import core
from hf_svd_plugins.fwsvd.lowrank import LowRankLinear, low_rank_like, mark_compressed, set_submodule
from hf_svd_plugins.fwsvd.targets import TargetLayer, Targets, select_targets
from hf_svd_plugins.lora import gathered_cpu_copy, is_fsdp1_flattened, is_sharded, merge_lora_adapters, unwrap_model

logger = logging.getLogger(__name__)

METHODS = ("fisher", "svd", "whiten")


@dataclass
class LayerReport:
    """One targeted layer. ``rank`` None: left dense (no rank saves parameters). Parameters include the bias."""

    name: str
    d_out: int
    d_in: int
    rank: int | None
    params_before: int
    params_after: int
    weighted_error: float
    plain_error: float


@dataclass
class CompressionReport:
    """What :func:`fwsvd_compress` did.

    Attributes:
        method: ``fisher``, ``svd`` or ``whiten``.
        layers: one :class:`LayerReport` per targeted layer, in module order.
        model_params_before / model_params_after: every parameter of the model, embeddings included (tied weights
            counted once).
        seconds: wall time of the call.
        model: the compressed model (the merged base model for a PEFT input; under ZeRO-3 and FSDP2 a CPU copy on
            rank 0 and None on the other ranks).

    ``weighted_error`` is ``sqrt(sum_j I_j ||dW_j||^2 / sum_j I_j ||W_j||^2)`` for fisher, ``||dW X^T|| / ||W X^T||``
    on the calibration inputs for whiten, the plain error for svd; ``plain_error`` is ``||W - W'||_F / ||W||_F``.
    """

    method: str
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    seconds: float
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def ranks(self) -> dict[str, int]:
        """``{layer: rank}`` of the layers that were factorized."""
        return {r.name: r.rank for r in self.layers if r.rank is not None}

    @property
    def targeted_params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def targeted_params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def targeted_share(self) -> float:
        """Fraction of the targeted layers' parameters kept (weights and biases)."""
        return self.targeted_params_after / max(self.targeted_params_before, 1)

    @property
    def model_share(self) -> float:
        """Fraction of the whole model's parameters kept (embeddings and heads included)."""
        return self.model_params_after / max(self.model_params_before, 1)

    def summary(self) -> str:
        return (f"{self.method}: {len(self.ranks)}/{len(self.layers)} layers factorized; targeted layers "
                f"{self.targeted_params_before:,} -> {self.targeted_params_after:,} parameters "
                f"({self.targeted_share:.1%} kept); whole model {self.model_params_before:,} -> "
                f"{self.model_params_after:,} ({self.model_share:.1%} kept); {self.seconds:.1f} s")

    def to_markdown(self) -> str:
        lines = ["| layer | shape (out x in) | rank | params before | params after | weighted rel. error | "
                 "plain rel. error |", "|---|---|---|---|---|---|---|"]
        for r in self.layers:
            rank = "dense" if r.rank is None else str(r.rank)
            lines.append(f"| {r.name} | {r.d_out} x {r.d_in} | {rank} | {r.params_before:,} | {r.params_after:,} | "
                         f"{r.weighted_error:.4f} | {r.plain_error:.4f} |")
        return "\n".join(lines + ["", self.summary()])

    def log_metrics(self) -> dict[str, float]:
        return {"fwsvd/targeted_share": self.targeted_share, "fwsvd/model_share": self.model_share,
                "fwsvd/layers_factorized": float(len(self.ranks)), "fwsvd/seconds": self.seconds}


def count_parameters(model: nn.Module) -> int:
    from hf_svd_plugins.lora import full_shape

    return sum(math.prod(full_shape(p)) for p in model.parameters())


# --------------------------------------------------------------------------------------------- validation


def _check_arguments(method, ratio, param_budget, ranks, rank_multiple, damping, importance, calibration) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    given = [name for name, value in (("ratio", ratio), ("param_budget", param_budget), ("ranks", ranks))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of ratio=, param_budget= or ranks= (got {given or 'none'})")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1] (the fraction of each targeted layer's weight parameters kept), "
                         f"got {ratio!r}")
    if param_budget is not None and (isinstance(param_budget, bool) or not isinstance(param_budget, int)
                                     or param_budget < 1):
        raise ValueError(f"param_budget must be a positive int (weight parameters of the targeted layers after "
                         f"compression), got {param_budget!r}")
    if ranks is not None and not isinstance(ranks, Mapping):
        raise TypeError(f"ranks must be a dict {{module name: rank}}, got {type(ranks).__name__}")
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be an int >= 1, got {rank_multiple!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a number >= 0 (relative to trace(G)/d_in), got {damping!r}")
    if method == "whiten" and calibration is None:
        raise ValueError("method='whiten' needs calibration= batches (the layer inputs it whitens)")
    if method == "fisher" and importance is None and calibration is None:
        raise ValueError("method='fisher' needs importance= (estimate_fisher / FisherCallback) or calibration= "
                         "batches with labels to estimate it")
    if importance is not None and method != "fisher":
        raise ValueError(f"importance= is only used by method='fisher', not {method!r}")


def refuse_fsdp1(model: nn.Module) -> None:
    """Raise if FSDP1 has flattened the weights: they cannot be read layer by layer (FSDP2's DTensors can)."""
    if any(is_fsdp1_flattened(p) for p in model.parameters()):
        raise ValueError("FWSVD cannot compress weights flattened by FSDP1 (FullyShardedDataParallel): use FSDP2 "
                         "(`fsdp_version: 2`, see accelerate_configs/fsdp.yaml), DeepSpeed ZeRO-3 or DDP, or compress "
                         "the saved full checkpoint in one process (`hf-svd compress`)")


def _check_importance(importance: Mapping, layers: list[TargetLayer]) -> dict[str, torch.Tensor]:
    missing = [t.name for t in layers if t.name not in importance]
    if missing:
        raise ValueError(f"importance has no entry for {len(missing)} targeted layers, e.g. {missing[:3]}; estimate "
                         "it with the same targets (estimate_fisher(model, data, targets=...))")
    checked = {}
    for t in layers:
        value = torch.as_tensor(importance[t.name])
        if value.shape != (t.shape[1],):
            raise ValueError(f"importance[{t.name!r}] has shape {tuple(value.shape)}, expected ({t.shape[1]},) "
                             "(one value per input feature)")
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise ValueError(f"importance[{t.name!r}] must be finite and non-negative")
        checked[t.name] = value
    dead = sum(int((v == 0).sum()) for v in checked.values())
    if dead:
        warnings.warn(f"{dead} input features have zero Fisher importance (never used by the data); they do not "
                      "steer the factorization and are projected like the others", stacklevel=3)
    return checked


def _check_ranks(ranks: Mapping[str, int], layers: list[TargetLayer]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for t in layers:
        k = ranks[t.name]
        d_out, d_in = t.shape
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(d_out, d_in):
            raise ValueError(f"ranks[{t.name!r}] must be an int in [1, {min(d_out, d_in)}], got {k!r}")
        if not core.pays_off(k, d_out, d_in):
            warnings.warn(f"rank {k} of {t.name} ({d_out} x {d_in}) saves no parameters: the layer stays dense",
                          stacklevel=3)
        out[t.name] = k if core.pays_off(k, d_out, d_in) else None
    return out


def _materialize(calibration: Iterable | None, max_batches: int | None) -> list | None:
    if calibration is None:
        return None
    batches = []
    for batch in calibration:
        if max_batches is not None and len(batches) >= max_batches:
            break
        batches.append(batch)
    if not batches:
        raise ValueError("calibration is empty: pass at least one batch")
    return batches


# --------------------------------------------------------------------------------------------- statistics


class _Matrices:
    """Yields ``(layer, M = W L, gram or None)`` for every layer; ``M`` None on processes that do not compute.

    ``weights`` are the layers of the model whose weights are factorized (merged, or rank 0's gathered copy); the
    whitening Grams are read on ``stats_model`` (the merged model, or the ZeRO-3/FSDP2-sharded original on every rank).
    """

    def __init__(self, method, layers, weights, importance, stats_model, stats_layers, batches, plan, damping):
        self.method, self.layers, self.weights, self.importance = method, layers, weights, importance
        self.stats_model, self.stats_layers, self.batches, self.plan = stats_model, stats_layers, batches, plan
        self.damping = damping
        self._grams: dict | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        if self.method != "whiten":
            for t in self.layers:
                if t.name not in self.weights:
                    yield t.name, None, None
                    continue
                imp = self.importance[t.name] if self.method == "fisher" else None
                yield t.name, core.weighted_matrix(self.weights[t.name].weight(), imp), None
            return
        from hf_svd_plugins.fwsvd.calibration import iter_stream_grams

        if self._grams is not None:  # one chunk held every Gram: a second pass (budget, then factors) reuses them
            grams = self._grams.items()
        else:
            grams = iter_stream_grams(self.stats_model, self.stats_layers, self.batches, self.plan)
            if len(self.plan.chunks) == 1:
                grams = self._grams = dict(grams)
                grams = grams.items()
        for name, gram in grams:
            if name not in self.weights:
                yield name, None, None
                continue
            w = self.weights[name].weight().detach().to(torch.float64)
            yield name, w @ core.whitening_factor(gram.to(w.device), self.damping), gram


def _allocate(matrices: _Matrices, layers: list[TargetLayer], param_budget: int, rank_multiple: int,
              progress: bool) -> dict[str, int | None]:
    """Global budget: spectra of every layer, then :func:`core.allocate_budget` on the computing process; the ranks
    are broadcast so that every process swaps the same layers."""
    from tqdm.auto import tqdm

    energies = {}
    for name, matrix, _ in tqdm(matrices, total=len(matrices), desc=f"{matrices.method} spectra", disable=not progress):
        if matrix is not None:
            energies[name] = core.squared_singular_values(matrix)
    shapes = {t.name: core.LayerShape(*t.shape) for t in layers}
    chosen = core.allocate_budget(energies, shapes, param_budget, rank_multiple) if energies else {}
    if is_distributed():
        encoded = torch.tensor([chosen.get(n) or -1 for n in shapes], dtype=torch.int64)
        broadcast_([encoded], src=0)
        chosen = {n: (None if int(v) < 0 else int(v)) for n, v in zip(shapes, encoded, strict=True)}
    return chosen


# --------------------------------------------------------------------------------------------- the entry point


def fwsvd_compress(model: nn.Module, method: str = "fisher", importance: Mapping[str, torch.Tensor] | None = None,
                   calibration: Iterable[Mapping] | None = None, ratio: float | None = None,
                   param_budget: int | None = None, ranks: Mapping[str, int] | None = None, targets: Targets = None,
                   *, rank_multiple: int = 8, damping: float = 0.01, max_batches: int | None = None,
                   memory_gb: float = 4.0, progress: bool = True) -> CompressionReport:
    """Replace each targeted Linear/Conv1D by a :class:`LowRankLinear` (two Linears, bias on the second), in place.

    Args:
        model: a transformers model, a PEFT model (its adapters are merged first; the merged base model is
            ``report.model``), or any ``nn.Module``. Under DDP every rank calls with its own calibration shard (the
            statistics are all-reduced, rank 0's factors broadcast). Under DeepSpeed ZeRO-3 and FSDP2 (DTensor
            shards) every rank must call; the weights are gathered one at a time (``GatheredParameters`` /
            ``full_tensor()``) and rank 0 gets a compressed CPU copy in ``report.model`` (the sharded model is left
            as it is; other ranks get None). FSDP1's flattened weights are refused.
        method: ``fisher`` (FWSVD: minimise ``sum_j I_j ||W_j - W'_j||^2``), ``svd`` (plain truncated SVD) or
            ``whiten`` (SVD-LLM: minimise ``||(W - W') X^T||`` on the calibration inputs).
        importance: ``{layer: (d_in,)}`` Fisher sums for ``fisher`` (from :func:`estimate_fisher` or
            ``FisherCallback``); if None, estimated on ``calibration``.
        calibration: batches (dicts as the model takes them; with labels for ``fisher``); at most ``max_batches`` are
            read and kept in memory (token ids only).
        ratio: keep this fraction of each targeted layer's weight parameters: ``k = floor(ratio d_in d_out /
            (d_in + d_out))``, rounded down to a multiple of ``rank_multiple``.
        param_budget: total weight parameters of the targeted layers after compression; the rank-1 terms with the
            least estimated loss per parameter are dropped first across all layers.
        ranks: ``{layer: k}`` exactly (these layers are the targets).
        targets: which layers (see :func:`~hf_svd_plugins.fwsvd.targets.select_targets`); default every
            Linear/Conv1D of the repeated blocks.
        rank_multiple: ranks are multiples of it (fast kernels); 1 disables rounding.
        damping: whitening's damping relative to ``trace(G) / d_in``.
        memory_gb: bound on the whitening Grams held at once (more passes over ``calibration`` when exceeded).
        progress: progress bar over layers.

    A layer is replaced only if its rank saves parameters (``k (d_in + d_out) < d_in d_out``); otherwise it stays
    dense. All inputs are checked before any work starts.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    _check_arguments(method, ratio, param_budget, ranks, rank_multiple, damping, importance, calibration)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
    if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)) or not memory_gb > 0:
        raise ValueError(f"memory_gb must be a number > 0, got {memory_gb!r}")
    inner = unwrap_model(model)
    refuse_fsdp1(inner)
    if ranks is not None:
        targets = "|".join(re.escape(name) for name in ranks)
    layers = select_targets(inner, targets)
    if ranks is not None and len(layers) != len(ranks):
        found = {t.name for t in layers}
        raise ValueError(f"ranks names modules the model does not have: {[n for n in ranks if n not in found][:4]}")
    if importance is not None:
        importance = _check_importance(importance, layers)
    chosen = _check_ranks(ranks, layers) if ranks is not None else None
    if param_budget is not None:
        smallest, dense = core.budget_bounds({t.name: core.LayerShape(*t.shape) for t in layers}, rank_multiple)
        if not smallest <= param_budget < dense:
            raise ValueError(f"param_budget={param_budget:,} must be in [{smallest:,}, {dense:,}): {dense:,} is the "
                             f"targeted layers' dense weight size (the whole model has {count_parameters(inner):,} "
                             f"parameters), {smallest:,} what rank {rank_multiple} per layer needs "
                             "(lower rank_multiple to go further)")
    batches = _materialize(calibration, max_batches)

    sharded = any(is_sharded(t.layer.weight) for t in layers)  # ZeRO-3 partitions or FSDP2 DTensor shards
    replicated = is_distributed() and not sharded
    params_before = count_parameters(inner)
    # Statistics are read on the model as it is (PEFT adapters active, or ZeRO-3/FSDP2 shards); weights on the merged one.
    if method == "fisher" and importance is None:
        from hf_svd_plugins.fwsvd.fisher import estimate_fisher

        importance = estimate_fisher(inner, batches, targets=targets)
    plan = None
    if method == "whiten":
        from hf_svd_plugins.fwsvd.calibration import plan_streams

        plan = plan_streams(inner, layers, batches[0], memory_gb)
    if sharded:
        copy = gathered_cpu_copy(inner)
        weights_model = merge_lora_adapters(copy) if copy is not None else None
        stats_model, stats_layers = inner, layers
    else:
        weights_model = stats_model = merge_lora_adapters(inner)
        stats_layers = select_targets(weights_model, targets)
    weight_layers = select_targets(weights_model, targets) if weights_model is not None else []
    computing = {t.name: t for t in weight_layers} if (sharded or process_rank() == 0) else {}
    matrices = _Matrices(method, layers, computing, importance, stats_model, stats_layers, batches, plan, damping)

    if ratio is not None:
        chosen = {t.name: core.uniform_rank(*t.shape, ratio, rank_multiple) for t in layers}
    elif param_budget is not None:
        chosen = _allocate(matrices, layers, param_budget, rank_multiple, progress)

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, tuple[float, float]] = {}
    for name, matrix, gram in tqdm(matrices, total=len(matrices), desc=f"{method} factors", disable=not progress):
        if chosen[name] is None or matrix is None:
            continue
        w = computing[name].weight()
        factors[name] = core.project_low_rank(w, matrix, chosen[name])
        imp = importance[name] if method == "fisher" else None
        errors[name] = core.relative_errors(w, *factors[name], importance=imp, gram=gram)
        del matrix, gram

    reports = []
    for t in weight_layers:
        k = chosen[t.name]
        d_out, d_in = t.shape
        bias = d_out if t.layer.bias is not None else 0
        if k is not None:
            _swap(weights_model, t, k, factors.get(t.name), broadcast=replicated)
        after = (core.low_rank_params(k, d_out, d_in) if k is not None else d_out * d_in) + bias
        weighted, plain = errors.get(t.name, (float("nan"), float("nan"))) if k is not None else (0.0, 0.0)
        reports.append(LayerReport(t.name, d_out, d_in, k, d_out * d_in + bias, after, weighted, plain))
    if weights_model is None:
        return CompressionReport(method, [], params_before, 0, time.perf_counter() - start, None)
    mark_compressed(weights_model, {n: k for n, k in chosen.items() if k is not None}, method)
    report = CompressionReport(method, reports, params_before, count_parameters(weights_model),
                               time.perf_counter() - start, weights_model)
    logger.info("%s", report.summary())
    return report


@torch.no_grad()
def _swap(model: nn.Module, target: TargetLayer, rank: int, factors: tuple[torch.Tensor, torch.Tensor] | None,
          broadcast: bool) -> None:
    """Replace ``target`` by a LowRankLinear holding ``factors``; with ``broadcast``, rank 0's factors everywhere."""
    module = low_rank_like(target.layer, rank)
    if factors is not None:
        module.down.weight.copy_(factors[0])
        module.up.weight.copy_(factors[1])
    if broadcast:
        broadcast_([module.down.weight, module.up.weight], src=0)
    if target.layer.bias is not None:
        module.up.bias.copy_(target.layer.bias)
    module.requires_grad_(target.layer.weight.requires_grad)
    set_submodule(model, target.name, module)


__all__ = ["METHODS", "CompressionReport", "LayerReport", "LowRankLinear", "count_parameters", "fwsvd_compress"]
