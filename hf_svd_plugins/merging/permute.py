"""Apply named permutations to tensors and models (pure indexing: the function is preserved exactly).

``perms`` maps a permutation name to an int64 index tensor: ``(size,)``, or ``(parent size, size)`` for a nested
permutation. Along a plain factor ``pi(B)[i] = B[perm[i]]``; along a nested one ``pi(B)[a, i] = B[q[a], c[q[a], i]]``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from hf_svd_plugins.merging.specs import AxisSpec, PermutationSpec, WeightEntry, check_not_peft, named_weights

__all__ = [
    "apply_permutations",
    "check_permutations",
    "entry_view",
    "identity_permutations",
    "invert_permutation",
    "permute_entry",
    "permute_state",
    "random_permutations",
    "reindex_factor",
    "split_axis",
]


def identity_permutations(spec: PermutationSpec, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Every permutation of ``spec`` as the identity."""
    out = {}
    for name in spec.perms:
        shape = spec.perm_shape(name)
        out[name] = torch.arange(shape[-1], device=device).expand(shape).clone()
    return out


def random_permutations(spec: PermutationSpec, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A uniformly random valid permutation for every name of ``spec`` (nested ones: one per parent unit)."""
    out = {}
    for name in spec.perms:
        shape = spec.perm_shape(name)
        rows = [torch.randperm(shape[-1], generator=generator) for _ in range(shape[0] if len(shape) == 2 else 1)]
        out[name] = torch.stack(rows) if len(shape) == 2 else rows[0]
    return out


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The inverse of each permutation along the last dimension."""
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm).contiguous())
    return inv


def check_permutations(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validated copy of ``perms`` (missing names filled with the identity).

    Raises:
        ValueError: an unknown name, a wrong shape, or a row that is not a permutation of ``0..size-1``.
    """
    unknown = sorted(set(perms) - set(spec.perms))
    if unknown:
        raise ValueError(f"perms: unknown permutation name(s) {unknown[:5]}; the spec has {sorted(spec.perms)[:8]}...")
    out = identity_permutations(spec)
    for name, perm in perms.items():
        perm = torch.as_tensor(perm).long().cpu()
        shape = spec.perm_shape(name)
        if tuple(perm.shape) != shape:
            raise ValueError(f"perms[{name!r}] has shape {tuple(perm.shape)}, expected {shape}")
        if not torch.equal(perm.sort(-1).values, torch.arange(shape[-1]).expand(shape)):
            raise ValueError(f"perms[{name!r}] is not a permutation of 0..{shape[-1] - 1}")
        out[name] = perm
    return out


def entry_view(tensor: torch.Tensor, entry: WeightEntry) -> torch.Tensor:
    """The part of a parameter that ``entry`` describes (a view)."""
    if entry.slice is None:
        return tensor
    axis, start, stop = entry.slice
    return tensor.narrow(axis, start, stop - start)


def split_axis(t: torch.Tensor, axis: int, factors: AxisSpec) -> torch.Tensor:
    """``t`` with axis ``axis`` reshaped into its factors."""
    return t.reshape(t.shape[:axis] + tuple(n for _, n in factors) + t.shape[axis + 1:])


def _index_nested(split: torch.Tensor, parent_dim: int, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``out[.., a, .., i, ..] = split[.., a, .., index[a, i], ..]`` (``index`` of shape ``(parent, n)``)."""
    moved = split.movedim((parent_dim, dim), (0, 1))
    moved = moved[torch.arange(index.shape[0], device=split.device)[:, None], index.to(split.device)]
    return moved.movedim((0, 1), (parent_dim, dim))


def reindex_factor(t: torch.Tensor, entry: WeightEntry, axis: int, factor: int, index: torch.Tensor,
                   spec: PermutationSpec) -> torch.Tensor:
    """``t`` re-indexed along one factor: ``index`` is ``(n,)``, or ``(parent, n)`` for a nested factor (rows in
    ``t``'s current parent order)."""
    factors = entry.axes[axis]
    parent = spec.perms[factors[factor][0]].parent
    if parent is None and len(factors) == 1:
        return t.index_select(axis, index.to(t.device))
    split = split_axis(t, axis, factors)
    if parent is None:
        split = split.index_select(axis + factor, index.to(t.device))
    else:
        parent_index = next(k for k, (p, _) in enumerate(factors) if p == parent)
        split = _index_nested(split, axis + parent_index, axis + factor, index)
    return split.reshape(t.shape)


def permute_entry(t: torch.Tensor, entry: WeightEntry, spec: PermutationSpec,
                  perms: Mapping[str, torch.Tensor], skip: tuple[str, ...] = ()) -> torch.Tensor:
    """``pi(t)`` for a tensor shaped like ``entry`` (every permutation except those in ``skip`` applied).

    Returns a new tensor.
    """
    out = t
    for axis in reversed(range(len(entry.axes))):  # last axis first: splitting it does not shift earlier axes
        factors = entry.axes[axis]
        active = [(k, p) for k, (p, _) in enumerate(factors) if p is not None and p not in skip]
        if not active:
            continue
        shape = out.shape
        out = split_axis(out, axis, factors)
        position = {p: k for k, (p, _) in enumerate(factors) if p is not None}
        for k, p in active:  # nested first: they are indexed by B's own parent units
            parent = spec.perms[p].parent
            if parent is not None:
                out = _index_nested(out, axis + position[parent], axis + k, perms[p])
        for k, p in active:
            if spec.perms[p].parent is None:
                out = out.index_select(axis + k, perms[p].to(out.device))
        out = out.reshape(shape)
    return out if out is not t else t.clone()


def permute_state(state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                  perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``pi(state)``: a new ``{name: tensor}`` with every entry of ``spec`` permuted."""
    out = {name: t.clone() for name, t in state.items()}
    for entry in spec.entries:
        view = entry_view(out[entry.param], entry)
        view.copy_(permute_entry(entry_view(state[entry.param], entry), entry, spec, perms))
    return out


@torch.no_grad()
def apply_permutations(model: nn.Module, perms: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None,
                       inplace: bool = False) -> nn.Module:
    """``pi(model)``: the same function with hidden units permuted (tied parameters stay one tensor).

    Args:
        model: a supported transformers model or ``nn.Sequential`` MLP (or any model with a ``spec``).
        perms: ``{name: index tensor}`` (e.g. ``weight_matching(...).perms``); missing names mean identity.
        spec: default :func:`~hf_svd_plugins.merging.specs.permutation_spec` of ``model``.
        inplace: write into ``model`` instead of a deep copy.
    """
    from hf_svd_plugins.merging.specs import permutation_spec

    check_not_peft(model)
    spec = spec or permutation_spec(model)
    perms = check_permutations(spec, perms)
    target = model if inplace else copy.deepcopy(model)
    weights = named_weights(target)
    spec.check_shapes({n: tuple(p.shape) for n, p in weights.items()})
    permuted = permute_state({n: p.detach() for n, p in weights.items()}, spec, perms)
    for name, param in weights.items():
        param.copy_(permuted[name])
    return target
