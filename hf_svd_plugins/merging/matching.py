"""Weight matching (Git Re-Basin): coordinate descent over named permutations with exact assignment steps.

Maximise ``sum over weights <W_A, pi(W_B)>``. For one permutation ``p`` with every other one fixed, the objective is
linear in ``p``: ``sum_i C[i, p[i]]`` with ``C = sum over weights touching p of A_(axis) . pi_{-p}(B)_(axis)^T``,
solved exactly by ``scipy.optimize.linear_sum_assignment``. Model B is kept once in its aligned form ``pi(B)``; the
cost is built from that copy and its columns re-indexed by ``p^-1`` (``pi_{-p}(B)[j] = pi(B)[p^-1[j]]``), so no
permuted copy is made per candidate. A nested permutation (one per parent unit) gives a batch of small problems,
built with one ``bmm``. An update is kept only if the exact objective of the weights it touches does not fall, so the
objective never decreases; the search stops after a pass in which no permutation changed.

Cost of one pass: ``O(sum over weights of numel x factor size)`` multiply-adds (about ``2 x d_model`` per parameter
for the residual stream, ``2 x d_ffn`` per FFN parameter) plus one assignment per permutation (``O(n^3)``); memory:
one aligned copy of B (B's dtype) plus one weight at a time in ``compute_dtype``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from hf_svd_plugins.merging.inputs import check_models, model_state
from hf_svd_plugins.merging.permute import (
    check_permutations,
    entry_view,
    invert_permutation,
    permute_entry,
    permute_state,
    reindex_factor,
    split_axis,
)
from hf_svd_plugins.merging.specs import PermutationSpec, WeightEntry, permutation_spec

__all__ = ["MatchResult", "match_states", "merge_many_states", "weight_matching"]


@dataclass
class MatchResult:
    """Permutations aligning model B to model A, and how the search went.

    Attributes:
        perms: ``{name: int64 index tensor}`` (CPU): ``(size,)`` or ``(parent size, size)``.
        objective: ``sum <W_A, pi(W_B)>`` at the start and after each pass (float64, never decreasing).
        passes: passes run (the last one changed nothing unless ``max_passes`` was hit).
        converged: whether the last pass changed nothing.
        cost_seconds: building costs and updating the aligned copy of B.
        assignment_seconds: inside ``linear_sum_assignment``.
        seconds: wall time of the whole search.
    """

    perms: dict[str, torch.Tensor]
    objective: list[float] = field(default_factory=list)
    passes: int = 0
    converged: bool = False
    cost_seconds: float = 0.0
    assignment_seconds: float = 0.0
    seconds: float = 0.0


def factor_matrix(t: torch.Tensor, entry: WeightEntry, axis: int, factor: int,
                  spec: PermutationSpec) -> torch.Tensor:
    """``t`` as ``(n, -1)`` with the units of factor ``(axis, factor)`` as rows; ``(P, n, -1)`` for a nested factor
    (parent units first). A view when possible."""
    factors = entry.axes[axis]
    name, n = factors[factor]
    parent = spec.perms[name].parent
    if parent is None and len(factors) == 1:
        if t.dim() == 1:
            return t[:, None]
        if t.dim() == 2:
            return t if axis == 0 else t.T
    split = split_axis(t, axis, factors)
    if parent is None:
        return split.movedim(axis + factor, 0).reshape(n, -1)
    parent_index = next(k for k, (p, _) in enumerate(factors) if p == parent)
    return split.movedim((axis + parent_index, axis + factor), (0, 1)).reshape(factors[parent_index][1], n, -1)


class _Matcher:
    """Holds A, B and the aligned copy ``pi(B)`` while the permutations change."""

    def __init__(self, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                 spec: PermutationSpec, perms: dict[str, torch.Tensor], compute_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.spec, self.perms, self.dtype, self.device = spec, perms, compute_dtype, device
        self.a = [entry_view(state_a[e.param], e).detach().to(device) for e in spec.entries]
        self.b = [entry_view(state_b[e.param], e).detach().to(device) for e in spec.entries]
        # steps replace aligned tensors, never write into them: at the identity, pi(B) can share B's storage
        identity = all(torch.equal(p, torch.arange(p.shape[-1]).expand_as(p)) for p in perms.values())
        self.aligned = list(self.b) if identity else [permute_entry(b, e, spec, perms)
                                                      for b, e in zip(self.b, spec.entries, strict=True)]
        # a permutation on two axes of one weight (BERT's MLM transform: residual -> residual) is quadratic there
        self.twice = {n for n in spec.perms if len({t[0] for t in spec.touching(n)}) < len(spec.touching(n))}
        self.children: dict[str, list[str]] = {}
        for perm in spec.perms.values():
            if perm.parent is not None and perm.size > 1 and perm.parent not in self.twice:
                self.children.setdefault(perm.parent, []).append(perm.name)
        entries_of = {n: {t[0] for t in spec.touching(n)} for n in spec.perms}
        self.neighbours = {n: {m for m in spec.perms if entries_of[n] & entries_of[m]} for n in spec.perms}
        self.fresh: set[str] = set()  # solved since anything sharing a weight with them last changed
        self.value = self._dot(range(len(self.a)))  # the objective, kept up to date by every accepted step

    def _dot(self, indices: Sequence[int]) -> float:
        return float(sum(float(torch.dot(self.a[i].reshape(-1).to(self.dtype), self.aligned[i].reshape(-1).to(self.dtype)))
                         for i in indices))

    def cost(self, name: str, only: set[int] | None = None) -> torch.Tensor:
        """``C[i, j]`` (or ``C[a, i, j]``): gain of giving A's unit ``i`` model B's unit ``j``, others fixed
        (from the entries in ``only``, default all that ``name`` touches)."""
        spec, perm = self.spec, self.spec.perms[name]
        shape = spec.perm_shape(name)
        shape = shape + (shape[-1],)
        by_aligned = torch.zeros(shape, dtype=self.dtype, device=self.device)  # columns in aligned order
        by_unit = torch.zeros(shape, dtype=self.dtype, device=self.device) if name in self.twice else None
        inverse = invert_permutation(self.perms[name]).to(self.device)
        for entry_index, axis, factor in spec.touching(name):
            if only is not None and entry_index not in only:
                continue
            entry = spec.entries[entry_index]
            a = factor_matrix(self.a[entry_index], entry, axis, factor, spec).to(self.dtype)
            b = factor_matrix(self.aligned[entry_index], entry, axis, factor, spec).to(self.dtype)
            if by_unit is None:
                by_aligned += a @ b.mT
            elif perm.parent is None:  # undo p on this axis only; the other axis keeps the current p
                by_unit += a @ b.index_select(0, inverse).mT
            else:
                raise ValueError(f"{entry.key}: nested permutation {name!r} on two axes is not supported")
        if perm.parent is None:
            cost = by_aligned[:, inverse]
        else:
            rows = inverse[self.perms[perm.parent].to(self.device)]  # A's parent unit a holds B's unit parent[a]
            cost = torch.gather(by_aligned, 2, rows[:, None, :].expand(shape))
        return cost if by_unit is None else cost + by_unit

    def assign(self, name: str, cost: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """The best permutation for ``cost``, its gain over the current one and the current value (float64)."""
        perm = self.spec.perms[name]
        matrix = cost.double().cpu().numpy()
        if perm.parent is None:
            new = linear_sum_assignment(matrix, maximize=True)[1]
            rows = np.arange(len(new))
            current = matrix[rows, self.perms[name].numpy()].sum()
            return torch.from_numpy(new).long(), float(matrix[rows, new].sum() - current), float(current)
        parent = self.perms[perm.parent]
        current = self.perms[name][parent].numpy()  # rows in A's parent order
        solved = np.stack([linear_sum_assignment(m, maximize=True)[1] for m in matrix])
        rows = np.arange(solved.shape[1])
        value = sum(m[rows, c].sum() for m, c in zip(matrix, current, strict=True))
        gain = sum(m[rows, s].sum() for m, s in zip(matrix, solved, strict=True)) - value
        new = self.perms[name].clone()
        new[parent] = torch.from_numpy(solved).long()
        return new, float(gain), float(value)

    def joint(self, name: str, timing: MatchResult) -> dict[str, torch.Tensor]:
        """A parent permutation together with its nested children ("Hungarian in Hungarian").

        For every pair (A's unit ``i``, B's unit ``j``) each child's best inner order is solved first, and the parent
        assignment uses those optimal pair values, so heads are matched by their best inner alignment rather than by
        the current one (coordinate steps on heads alone stall in poor local optima). Entries carrying two children
        (``o_proj`` columns: query head and value dimension) enter each child's pair value with the other child at
        its current order; the update is kept only if the exact objective does not fall.
        """
        spec = self.spec
        size = spec.perms[name].size
        kids = self.children[name]
        base = torch.zeros(size, size, dtype=self.dtype, device=self.device)
        flat = {c: torch.zeros(size * spec.perms[c].size, size * spec.perms[c].size, dtype=self.dtype,
                               device=self.device) for c in kids}
        for entry_index, axis, factor in spec.touching(name):
            entry = spec.entries[entry_index]
            a_full, b_full = self.a[entry_index], self.b[entry_index]
            on_axis = [(k, p) for k, (p, _) in enumerate(entry.axes[axis]) if p in flat]
            if not on_axis:
                b = permute_entry(b_full, entry, spec, self.perms, skip=(name,))
                base += (factor_matrix(a_full, entry, axis, factor, spec).to(self.dtype)
                         @ factor_matrix(b, entry, axis, factor, spec).to(self.dtype).mT)
            for k, child in on_axis:
                b = permute_entry(b_full, entry, spec, self.perms, skip=(name, child))
                a = factor_matrix(a_full, entry, axis, k, spec).to(self.dtype)
                b = factor_matrix(b, entry, axis, k, spec).to(self.dtype)
                flat[child] += a.reshape(-1, a.shape[-1]) @ b.reshape(-1, b.shape[-1]).mT
        value = base.double().cpu().numpy()
        t0 = time.perf_counter()
        inner: dict[str, np.ndarray] = {}
        for child, matrix in flat.items():
            n = spec.perms[child].size
            blocks = matrix.reshape(size, n, size, n).permute(0, 2, 1, 3).double().cpu().numpy()
            inner[child] = np.empty((size, size, n), dtype=np.int64)
            for i in range(size):
                for j in range(size):
                    rows, cols = linear_sum_assignment(blocks[i, j], maximize=True)
                    value[i, j] += blocks[i, j][rows, cols].sum()
                    inner[child][i, j] = cols
        parent = linear_sum_assignment(value, maximize=True)[1]
        new = {name: torch.from_numpy(parent).long()}
        for child, orders in inner.items():
            perm = torch.empty(size, orders.shape[-1], dtype=torch.long)
            perm[torch.from_numpy(parent)] = torch.from_numpy(orders[np.arange(size), parent])
            new[child] = perm
        timing.assignment_seconds += time.perf_counter() - t0
        return new

    def _reindex(self, name: str, new: torch.Tensor) -> None:
        """Bring the aligned copy from the current ``name`` to ``new`` (one gather per touched weight)."""
        inverse = invert_permutation(self.perms[name])
        parent = self.spec.perms[name].parent
        if parent is None:
            delta = inverse[new]
        else:
            order = self.perms[parent]
            delta = torch.gather(inverse[order], 1, new[order])
        for entry_index, axis, factor in self.spec.touching(name):
            self.aligned[entry_index] = reindex_factor(self.aligned[entry_index], self.spec.entries[entry_index],
                                                       axis, factor, delta, self.spec)
        self.perms[name] = new

    def update(self, new: Mapping[str, torch.Tensor], tol: float,
               linear: tuple[float, float] | None = None) -> bool:
        """Switch to the ``new`` permutations if the objective rises by more than ``tol`` (relative).

        ``linear = (gain, current value)`` of a single linear step, exact from its cost matrix; otherwise the
        touched weights' objective is recomputed before and after. Returns whether the change was kept.
        """
        new = {n: p for n, p in new.items() if not torch.equal(p, self.perms[n])}
        if not new:
            return False
        touched = sorted({t[0] for n in new for t in self.spec.touching(n)})
        if linear is not None:
            if linear[0] <= tol * max(1.0, abs(linear[1])):
                return False
            ((name, perm),) = new.items()
            self._reindex(name, perm)
            self.value += linear[0]
            return True
        old_perms = {n: self.perms[n] for n in new}
        old_aligned = [self.aligned[i] for i in touched]
        before = self._dot(touched)
        self.perms.update(new)
        for i in touched:
            self.aligned[i] = permute_entry(self.b[i], self.spec.entries[i], self.spec, self.perms)
        gain = self._dot(touched) - before
        if gain > tol * max(1.0, abs(before)):
            self.value += gain
            return True
        self.perms.update(old_perms)
        for i, aligned in zip(touched, old_aligned, strict=True):
            self.aligned[i] = aligned
        return False

    def warm_start(self, anchored: Mapping[str, set[int]], others: Sequence[str], tol: float,
                   timing: MatchResult) -> None:
        """Solve each anchored permutation from its anchored weights alone, then every other one given them.

        From the identity, the first cost of a hub such as the residual stream sums every weight it touches, nearly
        all of them still in their unaligned order: that noise outweighs the embeddings' signal and the search
        settles in a poor optimum (tiny GPT-2 on Hamlet, d_model 128: barrier 2.59 nats, worse than naive's 2.33,
        vs 1.21 from this start). The anchored cost has rank at most the anchored rows (vocabulary + positions): when
        d_model exceeds them (character-level GPT-2, d_model 256: rank 130), part of the residual stream is matched
        arbitrarily here and the barrier can end above naive's (docs/merging.md, "Why the language-model cut is small").
        """
        for name, entries in anchored.items():
            t0 = time.perf_counter()
            cost = self.cost(name, entries)
            t1 = time.perf_counter()
            perm, _, _ = self.assign(name, cost)
            t2 = time.perf_counter()
            if not torch.equal(perm, self.perms[name]):
                self._reindex(name, perm)
            timing.cost_seconds += (t1 - t0) + (time.perf_counter() - t2)
            timing.assignment_seconds += t2 - t1
        self.value = self._dot(range(len(self.a)))
        for name in others:
            self.step(name, tol, timing)

    def step(self, name: str, tol: float, timing: MatchResult) -> bool:
        """One coordinate step on ``name`` (joint with its children if it has any). Returns whether it changed."""
        if name in self.fresh:
            return False
        t0 = time.perf_counter()
        if self.children.get(name):
            before = timing.assignment_seconds
            new, linear = self.joint(name, timing), None
            t2 = time.perf_counter()
            timing.cost_seconds += (t2 - t0) - (timing.assignment_seconds - before)
        else:
            cost = self.cost(name)
            t1 = time.perf_counter()
            perm, gain, value = self.assign(name, cost)
            new, linear = {name: perm}, (None if name in self.twice else (gain, value))
            t2 = time.perf_counter()
            timing.assignment_seconds += t2 - t1
            timing.cost_seconds += t1 - t0
        changed = self.update(new, tol, linear)
        if changed:
            for n in new:
                self.fresh -= self.neighbours[n]
        if not changed or linear is not None:  # a linear step's cost does not depend on its own current value
            self.fresh.add(name)
        timing.cost_seconds += time.perf_counter() - t2
        return changed


def match_states(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], spec: PermutationSpec,
                 max_passes: int = 100, seed: int = 0, init: Mapping[str, torch.Tensor] | None = None,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 progress: bool = False, desc: str = "weight matching", tol: float | None = None,
                 warm_start: bool = True) -> MatchResult:
    """Weight matching on ``{name: tensor}`` states (the tensor core of :func:`weight_matching`).

    Args:
        state_a, state_b: parameters of the two models (same names and shapes; every spec entry present).
        spec: the permutation spec.
        max_passes: upper bound on passes over all permutations (each in a fresh random order).
        seed: seeds the visiting order.
        init: starting permutations (default identity), e.g. a previous result.
        compute_dtype: dtype of the cost matrices (float32, or float64 for exact ties on tiny models).
        device: where costs are built (default: the device of ``state_a``'s first tensor).
        progress: a tqdm bar per pass.
        tol: relative gain below which an update counts as no change (default 1e-9 in float64, 1e-6 otherwise).
        warm_start: without ``init``, first solve the anchored permutations (those acting on a weight whose other
            axes are fixed: embeddings, an MLP's first and last layer) from those weights alone, then every other
            permutation given them (see ``_Matcher.warm_start``); ``objective[0]`` is the value after it.
    """
    if max_passes < 1:
        raise ValueError(f"max_passes must be >= 1, got {max_passes}")
    start = time.perf_counter()
    tol = tol if tol is not None else (1e-9 if compute_dtype == torch.float64 else 1e-6)
    device = torch.device(device) if device is not None else next(iter(state_a.values())).device
    perms = check_permutations(spec, init or {})
    matcher = _Matcher(state_a, state_b, spec, perms, compute_dtype, device)
    result = MatchResult(perms=perms)
    result.cost_seconds = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    names = [n for n in spec.perms if spec.perms[n].size > 1 and spec.touching(n)]
    anchored = {n: e for n, e in _anchored(spec).items() if n in names}
    if warm_start and init is None and anchored:
        others = [names[k] for k in rng.permutation(len(names)) if names[k] not in anchored]
        matcher.warm_start(anchored, others, tol, result)
    result.objective.append(matcher.value)
    for pass_index in range(max_passes):
        changed = False
        order = [names[k] for k in rng.permutation(len(names))]
        order.sort(key=lambda n: n not in anchored)  # anchored permutations first (see _anchored)
        bar = _progress(order, progress, f"{desc} pass {pass_index + 1}")
        for name in bar:
            changed |= matcher.step(name, tol, result)
        result.objective.append(matcher.value)
        result.passes = pass_index + 1
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(objective=f"{result.objective[-1]:.6g}")
            bar.close()
        if not changed:
            result.converged = True
            break
    result.perms = {n: p.cpu() for n, p in matcher.perms.items()}
    result.seconds = time.perf_counter() - start
    return result


def weight_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec | None = None,
                    max_passes: int = 100, seed: int = 0, progress: bool = False, **match_kwargs) -> MatchResult:
    """Permutations that align ``model_b`` to ``model_a`` by weight matching.

    ``apply_permutations(model_b, result.perms)`` is then in ``model_a``'s basis. ``match_kwargs`` go to
    :func:`~hf_svd_plugins.merging.matching.match_states` (``init``, ``compute_dtype``, ``device``, ``tol``).
    """
    check_models([model_a, model_b], "(model_a, model_b)")
    spec = spec or permutation_spec(model_a)
    return match_states(model_state(model_a), model_state(model_b), spec, max_passes=max_passes, seed=seed,
                        progress=progress, **match_kwargs)


def _anchored(spec: PermutationSpec) -> dict[str, set[int]]:
    """``{permutation: its anchored entries}``: top-level permutations acting alone on a 2-D weight whose other axes
    are fixed (an embedding's residual columns, an MLP's first hidden layer), with every such entry (and the 1-D
    ones, which depend on nothing else either). Their cost from those entries does not depend on any other
    permutation's guess. Each pass also visits them first, which leaves the rest fresh for the next pass."""
    out: dict[str, set[int]] = {}
    alone: dict[str, set[int]] = {}
    for index, entry in enumerate(spec.entries):
        permuted = [k for k, axis in enumerate(entry.axes) if any(p is not None for p, _ in axis)]
        names = {p for k in permuted for p, _ in entry.axes[k] if p is not None}
        if len(permuted) == 1 and len(names) == 1:
            (name,) = names
            if spec.perms[name].parent is None:
                alone.setdefault(name, set()).add(index)
                if len(entry.axes) > 1:
                    out[name] = alone[name]
    return out


def _progress(items: Sequence[str], enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=True)


def merge_many_states(states: Sequence[Mapping[str, torch.Tensor]], spec: PermutationSpec, reference: int = 0,
                      max_rounds: int = 20, seed: int = 0, progress: bool = False,
                      **match_kwargs) -> tuple[list[dict[str, torch.Tensor]], list[MatchResult]]:
    """MergeMany (Git Re-Basin, N >= 2): align each model to the mean of the others, until a round changes nothing.

    The ``reference`` model keeps its own basis (identity permutations). Every other model starts aligned to the
    reference alone (pairwise weight matching): from the identity, N - 1 copies of one model in another basis
    outvote the reference and settle in their own consensus basis. Returns one permutation dict per model and the
    last match result of each model (the reference's is empty). Memory: the N states, their aligned copies and a
    float32 running sum.
    """
    n = len(states)
    rng = np.random.default_rng(seed)
    perms = [check_permutations(spec, {}) for _ in range(n)]
    results: list[MatchResult] = [MatchResult(perms=perms[i]) for i in range(n)]
    for i in range(n):
        if i != reference:
            results[i] = match_states(states[reference], states[i], spec, seed=seed, progress=progress,
                                      desc=f"MergeMany start model {i}", **match_kwargs)
            perms[i] = results[i].perms
    aligned = [permute_state(s, spec, p) for s, p in zip(states, perms, strict=True)]
    total = {k: sum(s[k].detach().float() for s in aligned) for k in states[0]}
    for round_index in range(max_rounds):
        changed = False
        for i in rng.permutation(n):
            if i == reference:
                continue
            others = {k: (total[k] - aligned[i][k].float()) / (n - 1) for k in total}
            res = match_states(others, states[i], spec, init=perms[i], seed=seed + round_index, progress=progress,
                               desc=f"MergeMany round {round_index + 1} model {i}", **match_kwargs)
            results[i] = res
            if any(not torch.equal(res.perms[k], perms[i][k]) for k in perms[i]):
                changed = True
                new = permute_state(states[i], spec, res.perms)
                for k in total:
                    total[k] += new[k].float() - aligned[i][k].float()
                aligned[i], perms[i] = new, res.perms
        if not changed:
            break
    return perms, results
