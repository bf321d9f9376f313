"""Activation matching (Git Re-Basin's data-driven baseline): align hidden units by their activations on data.

Maximise ``sum over probes <Z_A, pi(Z_B)>`` where a probe is the input or output of a Linear / ``Conv1D`` (or the
output of an Embedding), ``Z`` its ``(features, tokens)`` activation matrix on the same tokens for both models, and
the features are factored exactly as the matching weight axis in the spec (so heads and their inner dimensions
are matched by the same machinery as weights). The search is :func:`~hf_svd_plugins.merging.matching.match_states`
run on these activation matrices. Memory: ``2 x tokens x sum of probed features`` floats (``max_tokens`` caps it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from hf_svd_plugins.merging.evaluation import _forward
from hf_svd_plugins.merging.matching import MatchResult, match_states
from hf_svd_plugins.merging.specs import AxisSpec, PermutationSpec, WeightEntry

__all__ = ["activation_matching", "activation_probes", "collect_activations"]


def activation_probes(model: nn.Module, spec: PermutationSpec) -> dict[str, tuple[str, str, AxisSpec, tuple]]:
    """``{probe key: (module name, "in" | "out", feature factors, output slice or ())}`` for every permuted side of
    every Linear, ``Conv1D`` and Embedding weight in ``spec``."""
    modules = dict(model.named_modules())
    probes: dict[str, tuple[str, str, AxisSpec, tuple]] = {}
    for entry in spec.entries:
        module_name, _, kind = entry.param.rpartition(".")
        module = modules.get(module_name)
        if kind != "weight" or module is None or len(entry.axes) != 2:
            continue
        kind_name = type(module).__name__
        if isinstance(module, nn.Linear):
            in_axis, out_axis = 1, 0
        elif kind_name == "Conv1D":  # transformers' GPT-2 layer: weight (in, out)
            in_axis, out_axis = 0, 1
        elif isinstance(module, nn.Embedding):
            in_axis, out_axis = None, 1
        else:
            continue
        sides = [("out", out_axis)] + ([("in", in_axis)] if in_axis is not None else [])
        for side, axis in sides:
            factors = entry.axes[axis]
            if all(p is None for p, _ in factors):
                continue
            piece = ()
            if side == "out" and entry.slice is not None and entry.slice[0] == axis:
                piece = (entry.slice[1], entry.slice[2])
            elif side == "in" and entry.slice is not None and entry.slice[0] == axis:
                continue
            probes.setdefault(f"{module_name}:{side}{list(piece) if piece else ''}", (module_name, side, factors, piece))
    return probes


@torch.no_grad()
def collect_activations(model: nn.Module, batches: Iterable, probes: Mapping[str, tuple],
                        max_tokens: int = 4096) -> dict[str, torch.Tensor]:
    """``{probe key: (features, tokens) float32}`` over the first ``max_tokens`` real (non-padding) tokens (rows
    of a module that sees no batch dimension, such as position embeddings, are kept as they come)."""
    modules = dict(model.named_modules())
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in probes}
    mask: list[torch.Tensor | None] = [None]

    def rows(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1]).float()
        if mask[0] is not None and mask[0].numel() == flat.shape[0]:
            flat = flat[mask[0]]
        return flat

    def make_hook(keys: list[tuple[str, str, tuple]]):
        def hook(module, args, output):
            for key, side, piece in keys:
                t = args[0] if side == "in" else output
                t = rows(t)
                chunks[key].append(t[:, piece[0]:piece[1]] if piece else t)
        return hook

    by_module: dict[str, list[tuple[str, str, tuple]]] = {}
    for key, (module_name, side, _, piece) in probes.items():
        by_module.setdefault(module_name, []).append((key, side, piece))
    handles = [modules[name].register_forward_hook(make_hook(keys)) for name, keys in by_module.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            attention = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            mask[0] = attention.reshape(-1).bool().to(next(model.parameters()).device) if attention is not None else None
            _forward(model, batch, None)
            seen = max(sum(c.shape[0] for c in v) for v in chunks.values())
            if seen >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("activation matching needs data: the batches gave no tokens")
    return {k: torch.cat(v)[:max_tokens].T.contiguous() for k, v in chunks.items()}


def activation_matching(model_a: nn.Module, model_b: nn.Module, batches: Iterable, spec: PermutationSpec,
                        max_tokens: int = 4096, standardize: bool = False, **match_kwargs) -> MatchResult:
    """Permutations aligning ``model_b`` to ``model_a`` from their activations on the same ``batches``.

    Args:
        batches: a few batches (dicts or ``(x, y)`` pairs); re-iterable (read once per model).
        spec: the models' permutation spec; permutations no probe sees stay the identity.
        max_tokens: tokens (rows) kept per probe.
        standardize: match correlations (each feature centred and scaled) instead of raw inner products.
        match_kwargs: passed to :func:`~hf_svd_plugins.merging.matching.match_states`.
    """
    batches = list(batches)
    probes = activation_probes(model_a, spec)
    if not probes:
        raise ValueError("activation matching found no Linear/Conv1D/Embedding probes in the spec")
    acts_a = collect_activations(model_a, batches, probes, max_tokens)
    acts_b = collect_activations(model_b, batches, probes, max_tokens)
    if standardize:
        acts_a, acts_b = ({k: _standardize(v) for k, v in acts.items()} for acts in (acts_a, acts_b))
    entries = tuple(WeightEntry(key, (factors, ((None, acts_a[key].shape[1]),)))
                    for key, (_, _, factors, _) in probes.items())
    probe_spec = PermutationSpec(dict(spec.perms), entries, spec.model_type)
    match_kwargs.setdefault("desc", "activation matching")
    return match_states(acts_a, acts_b, probe_spec, **match_kwargs)


def _standardize(z: torch.Tensor) -> torch.Tensor:
    z = z - z.mean(1, keepdim=True)
    return z / z.std(1, keepdim=True).clamp_min(1e-6)
