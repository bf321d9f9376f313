"""Learning permutations with a straight-through estimator (Git Re-Basin, section 3.3).

Keep free weights ``W~`` for the B endpoint, initialised at model A (so the first projection is exactly the weight
matching alignment). Each step projects ``W~`` onto the permutations of B (``pi = weight matching of B onto W~``,
warm-started from the last ``pi``), evaluates the midpoint ``(A + pi(B)) / 2`` on a batch with
``W~ + stopgrad(pi(B) - W~)`` in place of ``pi(B)`` (the forward sees ``pi(B)``, the gradient flows to ``W~``), and
takes an SGD-with-momentum step on ``W~``. As in the reference code (git-re-basin ``mnist_mlp_ste2``), the result is
the permutation with the lowest midpoint batch loss seen. Each step costs one forward/backward of the model plus one
warm-started weight matching.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_svd_plugins.merging.evaluation import LossFn, batch_loss
from hf_svd_plugins.merging.inputs import model_state
from hf_svd_plugins.merging.matching import MatchResult, match_states
from hf_svd_plugins.merging.permute import permute_state
from hf_svd_plugins.merging.specs import PermutationSpec

__all__ = ["SteResult", "ste_matching"]


@dataclass
class SteResult(MatchResult):
    """A :class:`MatchResult` (``perms``: the best permutation seen) with the midpoint batch loss of every step."""

    losses: list[float] = field(default_factory=list)


def ste_matching(model_a: nn.Module, model_b: nn.Module, batches: Iterable, spec: PermutationSpec,
                 steps: int = 100, lr: float = 1e-2, momentum: float = 0.9,
                 init: Mapping[str, torch.Tensor] | None = None, loss_fn: LossFn | None = None,
                 projection_passes: int = 10, seed: int = 0, progress: bool = False,
                 compute_dtype: torch.dtype = torch.float32) -> SteResult:
    """Permutations aligning ``model_b`` to ``model_a`` that lower the loss of their midpoint.

    Args:
        batches: training batches (dicts with ``labels``, or ``(x, y)`` pairs), cycled for ``steps`` steps.
        spec: the permutation spec.
        steps, lr, momentum: SGD steps on ``W~``, their learning rate and momentum.
        init: permutations to start the first projection from (default identity).
        loss_fn: ``loss_fn(model, batch, params) -> scalar``; default the model's own loss / cross-entropy.
        projection_passes: passes of each warm-started projection.
    """
    import time

    batches = list(batches)
    if not batches:
        raise ValueError("ste_matching needs at least one batch of data")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    start = time.perf_counter()
    loss_fn = loss_fn or batch_loss
    state_a = {k: v.float() for k, v in model_state(model_a).items()}
    state_b = {k: v.float() for k, v in model_state(model_b).items()}
    perms = dict(init) if init else None  # None: the first projection is weight matching with its warm start
    free = {k: v.clone().requires_grad_(True) for k, v in state_a.items()}
    optimizer = torch.optim.SGD(list(free.values()), lr=lr, momentum=momentum)
    result = SteResult(perms=dict(perms or {}))
    best_loss = float("inf")
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="STE")
    was_training = model_a.training
    model_a.eval()
    try:
        for step in iterator:
            with torch.no_grad():
                projection = match_states({k: v.detach() for k, v in free.items()}, state_b, spec, init=perms,
                                          max_passes=projection_passes, seed=seed + step,
                                          compute_dtype=compute_dtype)
                perms = projection.perms
                aligned = permute_state(state_b, spec, perms)
                if step == 0:
                    result.perms = perms  # weight matching of B onto A
            params = {k: 0.5 * (state_a[k] + free[k] + (aligned[k] - free[k]).detach()) for k in free}
            loss = loss_fn(model_a, batches[step % len(batches)], params)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.losses.append(float(loss.detach()))
            if result.losses[-1] < best_loss:
                best_loss, result.perms = result.losses[-1], perms
            result.cost_seconds += projection.cost_seconds
            result.assignment_seconds += projection.assignment_seconds
    finally:
        model_a.train(was_training)
    result.passes, result.converged = steps, True
    result.objective = [_objective(state_a, permute_state(state_b, spec, result.perms))]
    result.seconds = time.perf_counter() - start
    return result


def _objective(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return float(sum(torch.dot(a[k].reshape(-1).double(), b[k].reshape(-1).double()) for k in a))
