"""Beyond permutations: orthogonal alignment of the residual stream of pre-norm RMSNorm models (Llama family).

Fold every RMSNorm gain into the Linears that read it (``W diag(g)``, gain set to 1); the function is unchanged.
``RMSNorm(x O^T) = RMSNorm(x) O^T`` for any orthogonal ``O`` once the gains are 1, so the residual stream is then
symmetric under ``O``: embeddings and weights that read the stream become ``W O^T``, weights that write it ``O W``.
With the other permutations fixed, ``max_O <O, C>`` over orthogonal ``O`` (``C`` the residual cost of weight matching)
is orthogonal Procrustes: ``C = U S V^T``, ``O = U V^T``. Alternating it with weight matching of the remaining
permutations (started from weight matching, whose residual permutation is one orthogonal ``O``) never lowers the
objective. Needs an untied ``lm_head`` (folding the final norm into a tied head would untie it). Costs one
``d x d`` SVD per round on top of weight matching; memory as weight matching plus a folded copy of A.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_svd_plugins.merging.inputs import check_models, model_state
from hf_svd_plugins.merging.matching import match_states
from hf_svd_plugins.merging.permute import entry_view, permute_state
from hf_svd_plugins.merging.specs import PermutationSpec, WeightEntry, permutation_spec

__all__ = ["OrthogonalResult", "fold_norm_gains", "orthogonal_alignment", "rotate_residual"]

_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
# norm -> the Linears reading its output (same layer prefix)
_READERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
_HEADS = ("lm_head", "score", "classifier", "qa_outputs")


def _check_family(model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _LLAMA_FAMILY:
        raise ValueError(f"orthogonal alignment needs a pre-norm RMSNorm model {_LLAMA_FAMILY}, got {model_type!r}")
    names = {n for n, _ in model.named_parameters(remove_duplicate=True)}
    if not any(n.split(".")[0] in _HEADS for n in names):
        raise ValueError("orthogonal alignment needs an untied output head (tie_word_embeddings=False): folding the "
                         "final norm into a head tied to the embeddings would untie them")


def fold_norm_gains(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A Llama-family state with every RMSNorm gain folded into its readers (gains set to 1), float32.

    Returns the new state and the names of the folded gains.
    """
    out = {k: v.float().clone() for k, v in state.items()}
    folded = set()
    for name in state:
        match = re.fullmatch(r"(.*\.)?(input_layernorm|post_attention_layernorm)\.weight", name)
        if match:
            prefix = match[1] or ""
            readers = [f"{prefix}{r}.weight" for r in _READERS[match[2]]]
        elif re.fullmatch(r"(.*\.)?norm\.weight", name):
            readers = [n for n in state if n.split(".")[0] in _HEADS and n.endswith(".weight")]
        else:
            continue
        for reader in readers:
            out[reader] = out[reader] * out[name]
        out[name] = torch.ones_like(out[name])
        folded.add(name)
    return out, folded


def _residual_entries(spec: PermutationSpec, folded: set[str]) -> list[tuple[int, int]]:
    """``(entry index, axis)`` of every weight axis on the residual stream, except the (now unit) norm gains."""
    out = []
    for index, entry in enumerate(spec.entries):
        if entry.param in folded:
            continue
        for axis, factors in enumerate(entry.axes):
            if factors == (("res", factors[0][1]),):
                out.append((index, axis))
    return out


def rotate_residual(state: Mapping[str, torch.Tensor], rotation: torch.Tensor, spec: PermutationSpec,
                    folded: set[str]) -> dict[str, torch.Tensor]:
    """``state`` with the residual stream mapped by ``rotation`` (``d x d`` orthogonal): ``x -> rotation x``."""
    out = {k: v.clone() for k, v in state.items()}
    for index, axis in _residual_entries(spec, folded):
        entry = spec.entries[index]
        view = entry_view(out[entry.param], entry)
        rotated = torch.tensordot(rotation.to(view.dtype), view.movedim(axis, 0), dims=1).movedim(0, axis)
        view.copy_(rotated)
    return out


def _without_residual(spec: PermutationSpec) -> PermutationSpec:
    entries = tuple(WeightEntry(e.param, tuple(tuple((None if p == "res" else p, n) for p, n in axis)
                                               for axis in e.axes), e.slice) for e in spec.entries)
    return PermutationSpec({n: p for n, p in spec.perms.items() if n != "res"}, entries, spec.model_type)


@dataclass
class OrthogonalResult:
    """The folded A, the aligned (folded, permuted, rotated) B, the rotation, the permutations, the objective."""

    state_a: dict[str, torch.Tensor]
    state_b: dict[str, torch.Tensor]
    rotation: torch.Tensor
    perms: dict[str, torch.Tensor]
    objective: list[float] = field(default_factory=list)


def orthogonal_alignment(model_a: nn.Module, model_b: nn.Module, rounds: int = 10, seed: int = 0,
                         tol: float = 1e-7, **match_kwargs) -> OrthogonalResult:
    """Align ``model_b`` to ``model_a`` by permutations plus an orthogonal map of the residual stream.

    Both models are returned with their norm gains folded (the merge of the two states is a valid model of the same
    class whose norm gains are all 1).
    """
    check_models([model_a, model_b], "(model_a, model_b)")
    _check_family(model_a)
    spec = permutation_spec(model_a)
    state_a, folded = fold_norm_gains(model_state(model_a))
    state_b, _ = fold_norm_gains(model_state(model_b))
    perms = match_states(state_a, state_b, spec, seed=seed, **match_kwargs).perms
    d = spec.perms["res"].size
    rotation = torch.zeros(d, d)
    rotation[torch.arange(d), perms.pop("res")] = 1.0  # the permutation as an orthogonal map
    inner_spec = _without_residual(spec)
    residual = _residual_entries(spec, folded)
    objective: list[float] = []
    for round_index in range(rounds):
        inner = match_states(state_a, rotate_residual(state_b, rotation, spec, folded), inner_spec,
                             init=perms, seed=seed + round_index, **match_kwargs)
        perms = inner.perms
        permuted = permute_state(state_b, inner_spec, perms)
        cost = torch.zeros(d, d, dtype=torch.float64)  # C[i, j] = <A's unit i, B's unit j> on the stream
        for index, axis in residual:
            entry = spec.entries[index]
            a = entry_view(state_a[entry.param], entry).movedim(axis, 0).reshape(d, -1).double()
            b = entry_view(permuted[entry.param], entry).movedim(axis, 0).reshape(d, -1).double()
            cost += a @ b.T
        u, s, vh = torch.linalg.svd(cost)
        rotation = (u @ vh).float()
        objective.append(float(s.sum()) + _fixed_part(state_a, permuted, residual, spec))
        if len(objective) > 1 and objective[-1] - objective[-2] <= tol * abs(objective[-2]):
            break
    aligned = rotate_residual(permute_state(state_b, inner_spec, perms), rotation, spec, folded)
    return OrthogonalResult(state_a, aligned, rotation, perms, objective)


def _fixed_part(state_a, state_b, residual, spec: PermutationSpec) -> float:
    """The objective of the entries the rotation does not touch."""
    rotated = {spec.entries[i].key for i, _ in residual}
    return float(sum(torch.dot(entry_view(state_a[e.param], e).reshape(-1).double(),
                               entry_view(state_b[e.param], e).reshape(-1).double())
                     for e in spec.entries if e.key not in rotated))
