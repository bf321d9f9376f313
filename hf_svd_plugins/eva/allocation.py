"""EVA's decision: which LoRA pairs, how many ranks each module gets, its A matrix, alpha and scale.

:func:`compute_eva` validates the model, runs the collection pass (:mod:`hf_svd_plugins.eva.collection`) and turns
the streams' principal components into an :class:`EvaResult`; nothing is written to the model here.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_svd_plugins.distributed import broadcast_
from hf_svd_plugins.eva.collection import collect, module_ranks
from hf_svd_plugins.eva.config import EvaConfig
from hf_svd_plugins.eva.core import eva_matrix
from hf_svd_plugins.eva.layout import configured_rank_and_alpha, max_rank, scale_divisor, uses_rslora
from hf_svd_plugins.eva.sketch import captured_variance_lower_bound
from hf_svd_plugins.lora import LoraPair, find_lora_pairs, unwrap_peft_model


@dataclass
class EvaResult:
    """What EVA decided.

    Attributes:
        ranks: ``{module: r_m}`` (0 = no adapter).
        alphas: ``{module: alpha_m}`` to save in ``alpha_pattern``.
        scalings: ``{module: s_m}``, the LoRA scale to use with ``r_m`` ranks.
        matrices: ``{module: A (r_m, d_in)}`` float64 on CPU.
        batches_used: minibatches read (globally empty ones excluded).
        converged: ``{module: bool}``.
        seconds: wall time of the computation.
        statistics: ``{module: "exact" | "sketch"}``, what its input stream kept.
        variance_bounds: ``{module: b}`` with ``b`` a guaranteed lower bound on the share of the optimal
            ``r_m``-dimensional subspace's variance (over the rows read) that its A rows capture; 1 for exact.
        communication: ``{module: how its input's statistics crossed ranks}`` under data parallelism
            (``all_reduce_statistics``, ``all_gather_rows`` or ``all_gather_sketches``); empty in one process.
        batches_read: ``{module: indices of the used batches its statistics took in}`` (an input stops collecting
            once converged, and resumes if the rank it needs grows).
    """

    ranks: dict[str, int]
    alphas: dict[str, float]
    scalings: dict[str, float]
    matrices: dict[str, torch.Tensor] = field(repr=False)
    batches_used: int
    converged: dict[str, bool]
    seconds: float
    statistics: dict[str, str] = field(default_factory=dict)
    variance_bounds: dict[str, float] = field(default_factory=dict, repr=False)
    communication: dict[str, str] = field(default_factory=dict, repr=False)
    batches_read: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def log_metrics(self) -> dict[str, float]:
        """Flat numbers for the Trainer's log (TensorBoard/W&B): per-module ranks and totals."""
        metrics = {
            "eva/batches_used": float(self.batches_used),
            "eva/seconds": round(self.seconds, 3),
            "eva/rank_total": float(sum(self.ranks.values())),
            "eva/modules_converged": float(sum(self.converged.values())),
            "eva/modules_without_adapter": float(sum(r == 0 for r in self.ranks.values())),
            "eva/modules_sketched": float(sum(k == "sketch" for k in self.statistics.values())),
        }
        metrics.update({f"eva/rank/{name}": float(r) for name, r in self.ranks.items()})
        return metrics


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
    offloaded = [p.name for p in pairs if _on_meta(getattr(p.base_layer, "weight", None))]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} LoRA-targeted layer(s) are offloaded, their weights on the meta device "
            f"({offloaded[0]}, ...): PEFT places their LoRA weights there too, so nothing EVA writes would be kept. "
            "Keep the LoRA-targeted layers on a real device (offload only other modules in the device_map), or "
            "restrict LoraConfig.target_modules to layers that are not offloaded"
        )
    return pairs


def _on_meta(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.device.type == "meta"


def compute_eva(
    model: nn.Module,
    dataloader: Iterable,
    config: EvaConfig,
    pairs: list[LoraPair] | None = None,
) -> EvaResult:
    """Run EVA's forward passes on ``dataloader`` and decide ranks and A matrices (nothing is written to the model).

    All ranks of a distributed run must call this together; every rank reaches the same decision after the same
    number of batches (rank 0's ranks are broadcast to make sure).
    """
    start = time.perf_counter()
    peft_model = unwrap_peft_model(model)
    pairs = pairs if pairs is not None else eva_pairs(peft_model, config)
    rslora = uses_rslora(peft_model, pairs[0].adapter)
    configured = {p.name: configured_rank_and_alpha(peft_model, p) for p in pairs}
    r_max = {p.name: max_rank(peft_model, p, config) for p in pairs}
    budget = sum(r for r, _ in configured.values())

    estimates = collect(peft_model, dataloader, config, pairs, r_max, budget)
    ranks = _same_ranks_on_every_rank(module_ranks(estimates.components, estimates.members, r_max, budget), pairs)
    stream_of = {m: s for s, names in estimates.members.items() for m in names}
    not_converged = sorted(m for m in ranks if stream_of[m] not in estimates.converged and ranks[m] > 0)
    if not_converged:
        warnings.warn(
            f"EVA stopped at max_batches={config.max_batches} before {len(not_converged)} module(s) converged "
            f"(tau={config.tau}): {not_converged[:5]}{' ...' if len(not_converged) > 5 else ''}; their A uses all "
            "batches read. Raise max_batches or lower tau for a tighter estimate.",
            stacklevel=2,
        )
    matrices, alphas, scalings, bounds = {}, {}, {}, {}
    for pair in pairs:
        r_m, stream = ranks[pair.name], stream_of[pair.name]
        comps = estimates.components[stream]
        matrices[pair.name] = eva_matrix(comps, r_m, r_m, whiten=config.whiten).cpu()
        bounds[pair.name] = captured_variance_lower_bound(comps.singular_values, estimates.shrinkage[stream], r_m)
        r0, alpha0 = configured[pair.name]
        s0 = alpha0 / scale_divisor(r0, rslora)
        if config.adjust_scaling_factors:
            alphas[pair.name], scalings[pair.name] = s0 * scale_divisor(r_m, rslora), s0
        else:
            alphas[pair.name] = alpha0
            scalings[pair.name] = alpha0 / scale_divisor(r_m, rslora) if r_m > 0 else s0
    return EvaResult(
        ranks=ranks,
        alphas=alphas,
        scalings=scalings,
        matrices=matrices,
        batches_used=estimates.batches_used,
        converged={m: stream_of[m] in estimates.converged for m in ranks},
        seconds=time.perf_counter() - start,
        statistics={m: estimates.kinds[stream_of[m]] for m in ranks},
        variance_bounds=bounds,
        communication={m: estimates.routes[stream_of[m]] for m in ranks if stream_of[m] in estimates.routes},
        batches_read={m: list(estimates.batches_read[stream_of[m]]) for m in ranks},
    )


def _same_ranks_on_every_rank(ranks: dict[str, int], pairs: list[LoraPair]) -> dict[str, int]:
    values = torch.tensor([ranks[p.name] for p in pairs], dtype=torch.int64)
    broadcast_([values], src=0)
    return {p.name: int(v) for p, v in zip(pairs, values.tolist(), strict=True)}
