"""Align N models into one basis and average them: ``merge_models`` (and ``align_models`` for the permutations).

Methods:
* ``"weight_matching"``: Git Re-Basin weight matching; for N >= 3, MergeMany (each model aligned to the mean of the
  others until a round changes nothing).
* ``"activation"``: activation matching on a few batches (each model aligned to the reference).
* ``"ste"``: straight-through estimator on a few batches, initialised from weight matching (each to the reference).
* ``"orthogonal"``: Llama family with an untied head: norm gains folded, weight matching plus an orthogonal map of
  the residual stream (orthogonal Procrustes; see :mod:`hf_svd_plugins.merging.orthogonal`), each to the reference.
* ``"naive"``: no alignment (plain weight averaging, the baseline).
The merge is ``sum_k w_k pi_k(model_k)`` in the ``reference`` model's basis, accumulated in float32 and cast back to
each parameter's dtype. Memory: every model's weights, their aligned copies and the float32 sum.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hf_svd_plugins.merging.inputs import check_models, mixing_weights, model_state
from hf_svd_plugins.merging.matching import MatchResult, match_states, merge_many_states
from hf_svd_plugins.merging.permute import check_permutations, permute_state
from hf_svd_plugins.merging.specs import PermutationSpec, named_weights, permutation_spec

__all__ = ["METHODS", "Alignment", "align_models", "average_states", "load_state_into", "merge_models"]

METHODS = ("weight_matching", "naive", "ste", "activation", "orthogonal")


@dataclass
class Alignment:
    """One permutation dict per model (identity for the reference) and the search result behind each.

    ``states`` holds the aligned states when they are more than permutations (``"orthogonal"``: folded gains and a
    rotated residual stream, the reference folded too).
    """

    perms: list[dict[str, torch.Tensor]]
    results: list[MatchResult | None]
    spec: PermutationSpec
    method: str
    reference: int
    states: list[dict[str, torch.Tensor]] | None = None

    def aligned_states(self, models: Sequence[nn.Module]) -> list[dict[str, torch.Tensor]]:
        """``pi_k(model_k)`` for every model, as ``{name: tensor}``."""
        if self.states is not None:
            return self.states
        return [permute_state(model_state(m), self.spec, p) for m, p in zip(models, self.perms, strict=True)]


def _check_call(models: Sequence[nn.Module], method: str, reference: int, data: Iterable | None) -> None:
    check_models(models)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if not -len(models) <= reference < len(models):
        raise ValueError(f"reference={reference} is out of range for {len(models)} models")
    if method in ("ste", "activation") and data is None:
        raise ValueError(f"method={method!r} needs data=[a few batches] (dicts with labels, or (x, y) pairs)")


def align_models(models: Sequence[nn.Module], method: str = "weight_matching", reference: int = 0,
                 spec: PermutationSpec | None = None, data: Iterable | None = None, seed: int = 0,
                 progress: bool = False, max_passes: int = 100, ste_steps: int = 100, ste_lr: float = 1e-2,
                 max_tokens: int = 4096, **match_kwargs) -> Alignment:
    """The permutations that bring every model into ``models[reference]``'s basis (see :func:`merge_models`)."""
    _check_call(models, method, reference, data)
    reference %= len(models)
    spec = spec or permutation_spec(models[reference])
    identity = check_permutations(spec, {})
    perms: list[dict[str, torch.Tensor]] = [dict(identity) for _ in models]
    results: list[MatchResult | None] = [None] * len(models)
    if method == "naive":
        return Alignment(perms, results, spec, method, reference)
    states = [model_state(m) for m in models]
    if method == "weight_matching" and len(models) > 2:
        perms, many = merge_many_states(states, spec, reference=reference, seed=seed, progress=progress,
                                        max_passes=max_passes, **match_kwargs)
        results = [None if i == reference else r for i, r in enumerate(many)]
        return Alignment(perms, results, spec, method, reference)
    if method == "orthogonal":
        return _align_orthogonal(models, reference, spec, perms, seed, max_passes, match_kwargs)
    data = list(data) if data is not None else None
    for i, model in enumerate(models):
        if i == reference:
            continue
        if method == "weight_matching":
            res = match_states(states[reference], states[i], spec, max_passes=max_passes, seed=seed,
                               progress=progress, desc=f"weight matching model {i}", **match_kwargs)
        elif method == "activation":
            from hf_svd_plugins.merging.activation import activation_matching

            res = activation_matching(models[reference], model, data, spec, max_tokens=max_tokens,
                                      max_passes=max_passes, seed=seed, progress=progress, **match_kwargs)
        else:
            from hf_svd_plugins.merging.ste import ste_matching

            res = ste_matching(models[reference], model, data, spec, steps=ste_steps, lr=ste_lr, seed=seed,
                               progress=progress, **match_kwargs)
        perms[i], results[i] = res.perms, res
    return Alignment(perms, results, spec, method, reference)


def _align_orthogonal(models, reference, spec, perms, seed, max_passes, match_kwargs) -> Alignment:
    from hf_svd_plugins.merging.orthogonal import orthogonal_alignment

    states: list = [None] * len(models)
    results: list[MatchResult | None] = [None] * len(models)
    for i, model in enumerate(models):
        if i == reference:
            continue
        res = orthogonal_alignment(models[reference], model, seed=seed, max_passes=max_passes, **match_kwargs)
        states[reference], states[i], perms[i] = res.state_a, res.state_b, {**perms[i], **res.perms}
        results[i] = MatchResult(perms=perms[i], objective=res.objective, passes=len(res.objective))
    return Alignment(perms, results, spec, "orthogonal", reference, states)


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_k weights[k] * states[k]`` in float32 (the caller casts back)."""
    return {k: sum(w * s[k].float() for w, s in zip(weights, states, strict=True)) for k in states[0]}


@torch.no_grad()
def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` into ``model``'s parameters in place (each cast to the parameter's dtype; ties kept)."""
    for name, param in named_weights(model).items():
        param.copy_(state[name].to(param.dtype))
    return model


def merge_models(models: Sequence[nn.Module], method: str = "weight_matching", weights: Sequence[float] | None = None,
                 reference: int = 0, spec: PermutationSpec | None = None, data: Iterable | None = None,
                 return_alignment: bool = False, **align_kwargs) -> nn.Module | tuple[nn.Module, Alignment]:
    """Align ``models`` into ``models[reference]``'s basis and average them.

    Args:
        models: 2 or more models of one architecture and config (plain models: ``merge_and_unload()`` PEFT ones).
        method: ``"weight_matching"`` (MergeMany for N >= 3), ``"activation"``, ``"ste"``, ``"orthogonal"``
            (Llama family) or ``"naive"``.
        weights: mixing weights, one per model (normalised to sum to 1; default uniform).
        reference: the model whose basis (and config, buffers, class) the merge keeps.
        spec: permutation spec (default: built from ``config.model_type`` or the ``nn.Sequential``).
        data: a few batches, needed by ``"activation"`` and ``"ste"``.
        return_alignment: also return the :class:`Alignment`.
        align_kwargs: ``seed``, ``progress``, ``max_passes``, ``ste_steps``, ``ste_lr``, ``max_tokens``,
            ``compute_dtype``, ``device`` (see :func:`align_models`).

    Returns:
        A new model (a copy of the reference with the merged weights), and the alignment if asked.
    """
    _check_call(models, method, reference, data)
    mix = mixing_weights(weights, len(models))
    alignment = align_models(models, method, reference, spec, data, **align_kwargs)
    merged_state = average_states(alignment.aligned_states(models), mix)
    merged = load_state_into(copy.deepcopy(models[alignment.reference]), merged_state)
    return (merged, alignment) if return_alignment else merged
