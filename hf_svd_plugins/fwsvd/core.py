"""FWSVD's numerical core: weighted and whitened low-rank factorizations, rank allocation, per-example Fisher.

Pure tensors: no Trainer, no PEFT, no module walking. Shapes follow PyTorch: a Linear weight is ``W (d_out, d_in)``;
a factorization is ``down (k, d_in)`` (the first Linear, ``in -> k``) and ``up (d_out, k)`` (the second, ``k -> out``),
with ``W' = up @ down``.

Every method here minimises ``||(W - W') L||_F`` over rank-``k`` matrices ``W'`` for some ``L (d_in, d_in)``:

* plain SVD: ``L = I``;
* Fisher-weighted (FWSVD): ``L = diag(sqrt(I))`` with ``I (d_in,)`` the Fisher importance of each input feature;
* whitened (SVD-LLM): ``L L^T = G = X^T X``, so ``||(W - W') L||_F = ||(W - W') X^T||_F`` is the output error on the
  calibration inputs ``X``.

By Eckart-Young the minimiser is ``W' = U_k U_k^T W`` with ``U_k`` the top-``k`` left singular vectors of ``M = W L``:
``U_k U_k^T M`` is the best rank-``k`` approximation of ``M`` and equals ``W' L``. So ``up = U_k`` (orthonormal columns)
and ``down = U_k^T W``, and the solution never divides by ``L``: no ``D^-1``, no ``L^-1``, no epsilon for zero
importances, and a rank-deficient Gram needs no special case. (The papers' form ``(U_k S_k)(V_k^T L^-1)`` is the same
product when ``L`` is invertible.) The singular values go into ``down``, whose entries are then projections of ``W``'s
columns, bounded by ``||W||``; ``V_k^T D^-1`` would grow as ``1/sqrt(I_j)`` for rarely used features and overflow
float16. The dropped ``sigma_i^2`` of ``M`` are exactly the method's own error (weighted energy for Fisher, output
energy on the calibration data for whitening), which the global budget ranks across layers.

All numerics are float64; factors are returned in the weight's dtype.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

#: default bound on the temporary buffers of :func:`per_example_fisher` (bytes)
DEFAULT_CHUNK_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------- factorizations


def weighted_matrix(weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """``M = W diag(sqrt(importance))`` in float64 (``W`` itself when ``importance`` is None); ``(d_out, d_in)``."""
    w = weight.detach().to(torch.float64)
    if importance is None:
        return w
    imp = importance.detach().to(device=w.device, dtype=torch.float64)
    if imp.shape != (w.shape[1],):
        raise ValueError(f"importance must have shape ({w.shape[1]},) (one value per input feature), got {tuple(imp.shape)}")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError("importance must be finite and non-negative (a Fisher sum of squared gradients)")
    return w * imp.sqrt()


def whitening_factor(gram: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """``L (d_in, d_in)`` with ``L L^T = G + damping * trace(G) / d_in * I``, float64.

    Cholesky when the damped Gram is numerically positive definite; otherwise (``damping=0`` and a rank-deficient
    ``G``, e.g. fewer calibration tokens than features) the eigendecomposition ``G = Q diag(l) Q^T`` with negative
    round-off eigenvalues clipped to zero, ``L = Q diag(sqrt(l))``. Never an explicit inverse.
    """
    g = gram.detach().to(torch.float64)
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be a square (d_in, d_in) matrix, got shape {tuple(g.shape)}")
    if damping < 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite number >= 0 (relative to trace(G)/d_in), got {damping}")
    g = (g + g.T) / 2
    d = g.shape[0]
    scale = float(torch.trace(g)) / d
    if scale <= 0:
        raise ValueError("gram is zero: the calibration data never reached this layer (empty or all padding)")
    if damping > 0:
        g = g + (damping * scale) * torch.eye(d, dtype=g.dtype, device=g.device)
        factor, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            return factor
    eigenvalues, eigenvectors = torch.linalg.eigh(g)
    return eigenvectors * eigenvalues.clamp_min(0).sqrt()


def top_left_singular(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_k (d_out, k), sigma^2 (min(d_out, d_in),))`` of a float64 matrix: top-``k`` left singular vectors and
    every squared singular value, descending."""
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s.square()


def squared_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All ``sigma_i^2`` of a float64 matrix, descending (the per-term error estimates of the global budget)."""
    return torch.linalg.svdvals(matrix).square()


def project_low_rank(weight: torch.Tensor, matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` minimiser of ``||(W - W') L||_F`` given ``M = W L``: ``(down = U_k^T W, up = U_k)``.

    ``weight (d_out, d_in)``, ``matrix (d_out, d_in)`` float64; returns ``down (rank, d_in)``, ``up (d_out, rank)`` in
    ``weight.dtype``.
    """
    _check_rank(rank, weight.shape)
    u_k, _ = top_left_singular(matrix, rank)
    down = u_k.T @ weight.detach().to(torch.float64)
    return down.to(weight.dtype), u_k.to(weight.dtype)


def weighted_low_rank(weight: torch.Tensor, importance: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fisher-weighted SVD: ``(down (rank, d_in), up (d_out, rank))`` minimising
    ``sum_j importance_j * ||weight[:, j] - (up @ down)[:, j]||^2``.

    ``importance (d_in,)`` per input feature (None: plain truncated SVD). Features with zero importance do not steer the
    subspace; their columns are projected onto it like all others. ``up`` has orthonormal columns, ``down = up^T W``.
    """
    return project_low_rank(weight, weighted_matrix(weight, importance), rank)


def whitened_low_rank(weight: torch.Tensor, gram: torch.Tensor, rank: int, damping: float = 0.01
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware (truncation-aware whitening, SVD-LLM): ``(down (rank, d_in), up (d_out, rank))`` minimising
    ``||(weight - up @ down) X^T||_F`` for calibration inputs ``X`` with ``gram = X^T X (d_in, d_in)``.

    ``damping`` (relative to ``trace(G)/d_in``) adds ``damping * ||W - W'||_F^2 * trace(G)/d_in`` to the objective,
    which keeps directions the calibration data never excited from being discarded blindly; 0 gives the pure output
    error, also for a singular ``G``.
    """
    w = weight.detach().to(torch.float64)
    return project_low_rank(weight, w @ whitening_factor(gram, damping).to(w.device), rank)


def relative_errors(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, importance: torch.Tensor | None = None,
                    gram: torch.Tensor | None = None) -> tuple[float, float]:
    """``(weighted, plain)`` relative errors of ``W' = up @ down``.

    plain: ``||W - W'||_F / ||W||_F``; weighted: ``sqrt(sum_j I_j ||dW_j||^2 / sum_j I_j ||W_j||^2)`` with
    ``importance``, ``||dW X^T||_F / ||W X^T||_F`` with ``gram`` (undamped), else the plain error.
    """
    w = weight.detach().to(torch.float64)
    delta = w - up.detach().to(torch.float64) @ down.detach().to(torch.float64)
    plain = float(delta.norm() / w.norm().clamp_min(1e-300))
    if gram is not None:
        g = gram.detach().to(device=w.device, dtype=torch.float64)
        num, den = ((delta @ g) * delta).sum(), ((w @ g) * w).sum()
    elif importance is not None:
        imp = importance.detach().to(device=w.device, dtype=torch.float64)
        num, den = (delta.square() * imp).sum(), (w.square() * imp).sum()
    else:
        return plain, plain
    return float((num.clamp_min(0) / den.clamp_min(1e-300)).sqrt()), plain


def _check_rank(rank: int, shape: tuple[int, ...]) -> None:
    full = min(int(shape[0]), int(shape[1]))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(f"rank must be an int in [1, {full}] for a weight of shape {tuple(shape)}, got {rank!r}")


# --------------------------------------------------------------------------------------------- rank allocation


def low_rank_params(rank: int, d_out: int, d_in: int) -> int:
    """Weight parameters of the two factors, ``k (d_in + d_out)``."""
    return rank * (d_in + d_out)


def pays_off(rank: int, d_out: int, d_in: int) -> bool:
    """Whether rank ``k`` saves parameters: ``k (d_in + d_out) < d_in d_out``."""
    return low_rank_params(rank, d_out, d_in) < d_out * d_in


def round_rank(rank: float, rank_multiple: int) -> int:
    """Round a rank down to a multiple of ``rank_multiple`` (fast kernels); ranks below one multiple stay at
    ``max(1, floor(rank))``."""
    k = int(math.floor(rank + 1e-9))
    if k >= rank_multiple:
        return k - k % rank_multiple
    return max(1, k)


def uniform_rank(d_out: int, d_in: int, ratio: float, rank_multiple: int = 8) -> int | None:
    """The rank keeping ``ratio`` of a ``(d_out, d_in)`` weight's parameters, ``floor(ratio d_in d_out / (d_in +
    d_out))`` rounded by :func:`round_rank`; None when that saves nothing (the layer stays dense)."""
    k = min(round_rank(ratio * d_in * d_out / (d_in + d_out), rank_multiple), min(d_out, d_in))
    return k if pays_off(k, d_out, d_in) else None


@dataclass(frozen=True)
class LayerShape:
    d_out: int
    d_in: int

    @property
    def dense(self) -> int:
        return self.d_out * self.d_in

    def cost(self, rank: int | None) -> int:
        """Weight parameters at ``rank`` (None: dense); a rank that does not pay off is stored dense."""
        if rank is None or not pays_off(rank, self.d_out, self.d_in):
            return self.dense
        return low_rank_params(rank, self.d_out, self.d_in)


def budget_bounds(shapes: Mapping[str, LayerShape], rank_multiple: int) -> tuple[int, int]:
    """``(smallest, dense)`` weight-parameter totals a budget can reach: every layer at its minimum rank
    ``min(rank_multiple, d_out, d_in)``, and every layer dense."""
    smallest = sum(s.cost(min(rank_multiple, s.d_out, s.d_in)) for s in shapes.values())
    return smallest, sum(s.dense for s in shapes.values())


def allocate_budget(energies: Mapping[str, torch.Tensor], shapes: Mapping[str, LayerShape], param_budget: int,
                    rank_multiple: int = 8) -> dict[str, int | None]:
    """Global rank allocation: drop the rank-1 terms with the least estimated loss per parameter saved first,
    across all layers, until the layers' weights fit in ``param_budget`` parameters.

    Args:
        energies: ``{layer: sigma^2 (min(d_out, d_in),)}`` descending, the loss of dropping each term
            (:func:`squared_singular_values` of that layer's ``M``).
        shapes: ``{layer: LayerShape}``.
        param_budget: total weight parameters of these layers after compression.
        rank_multiple: terms are dropped in groups that keep ranks multiples of it; no layer goes below
            ``min(rank_multiple, d_out, d_in)``.

    Returns:
        ``{layer: rank}``, or None for a layer that stays dense (its rank would not save parameters).

    A term of a ``(d_out, d_in)`` layer costs ``d_in + d_out`` parameters, so the greedy order is
    ``sigma^2 / (d_in + d_out)`` (a knapsack's loss per unit of weight). Within a layer the last group always has the
    smallest loss, so each layer shrinks from the tail.
    """
    smallest, dense = budget_bounds(shapes, rank_multiple)
    if not smallest <= param_budget < dense:
        raise ValueError(
            f"param_budget={param_budget} must be in [{smallest}, {dense}) for these layers: {dense} is their dense "
            f"size, {smallest} what one group of rank_multiple={rank_multiple} ranks per layer needs"
        )
    ranks = {name: min(s.d_out, s.d_in) for name, s in shapes.items()}
    floors = {name: min(rank_multiple, s.d_out, s.d_in) for name, s in shapes.items()}
    prefix = {name: torch.cat([torch.zeros(1, dtype=torch.float64), e.detach().double().cpu().cumsum(0)])
              for name, e in energies.items()}
    total = sum(s.cost(ranks[n]) for n, s in shapes.items())
    order = {name: i for i, name in enumerate(shapes)}

    def next_unit(name: str):
        k = ranks[name]
        if k <= floors[name]:
            return None
        new_k = max(floors[name], k - (k % rank_multiple or rank_multiple))
        loss = float(prefix[name][k] - prefix[name][new_k])
        saved = (k - new_k) * (shapes[name].d_in + shapes[name].d_out)
        return (loss / saved, order[name], name, new_k)

    heap = [unit for unit in map(next_unit, shapes) if unit is not None]
    heapq.heapify(heap)
    while total > param_budget and heap:
        _, _, name, new_k = heapq.heappop(heap)
        total += shapes[name].cost(new_k) - shapes[name].cost(ranks[name])
        ranks[name] = new_k
        unit = next_unit(name)
        if unit is not None:
            heapq.heappush(heap, unit)
    return {name: (k if pays_off(k, shapes[name].d_out, shapes[name].d_in) else None) for name, k in ranks.items()}


# --------------------------------------------------------------------------------------------- Fisher


def per_example_fisher(x: torch.Tensor, g: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """``sum_n ((g_n^T x_n)^2).sum(0)``: the per-input-feature sum of squared per-example weight gradients, ``(d_in,)``
    float64, without a Python loop over examples.

    ``x (B, T, d_in)`` are a layer's inputs and ``g (B, T, d_out)`` the gradients of example ``n``'s own loss at the
    layer's output (zero at padding), so ``g_n^T x_n (d_out, d_in)`` is ``dL_n/dW``. Two exact routes, the cheaper
    chosen per call:

    * direct: ``G_n = g_n^T x_n``; ``T d_out d_in`` flops per example, buffer ``c d_out d_in`` floats for ``c``
      examples at a time;
    * Gram ("ghost") route: ``sum_i G_n[i, j]^2 = x_n[:, j]^T (g_n g_n^T) x_n[:, j]``; ``T^2 (d_out + d_in)`` flops,
      buffer ``c (T^2 + T d_in)`` floats; cheaper whenever ``T (d_in + d_out) < d_in d_out`` (at 7B, d_in 4096 and
      d_out 11008, any sequence shorter than ~3000 tokens).

    ``c`` is chosen so that the float32 buffers stay under ``chunk_bytes`` (direct route: also chunked over output
    rows, so one 7B MLP example needs ``chunk_bytes``, not 180 MB). Products are float32, sums float64.
    """
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"x (B, T, d_in) and g (B, T, d_out) must share B and T, got {tuple(x.shape)}, {tuple(g.shape)}")
    batch, tokens, d_in = x.shape
    d_out = g.shape[-1]
    out = torch.zeros(d_in, dtype=torch.float64, device=x.device)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else x.dtype
    if tokens * (d_in + d_out) < d_in * d_out:
        per_example = 4 * (tokens * tokens + 2 * tokens * d_in + tokens * d_out)
        step = max(1, chunk_bytes // per_example)
        for start in range(0, batch, step):
            xc = x[start:start + step].to(compute)
            gc = g[start:start + step].to(compute)
            kernel = gc @ gc.transpose(1, 2)  # (c, T, T)
            out += ((kernel @ xc) * xc).sum((0, 1), dtype=torch.float64)
        return out
    rows = max(1, min(d_out, chunk_bytes // (4 * d_in)))
    for n in range(batch):
        xn = x[n].to(compute)
        for r0 in range(0, d_out, rows):
            grad = g[n, :, r0:r0 + rows].to(compute).T @ xn  # (rows, d_in)
            out += grad.square().sum(0, dtype=torch.float64)
    return out


def batch_fisher(x: torch.Tensor, g: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """``((sum_n g_n^T x_n)^2).sum(0)``, ``(d_in,)`` float64: the squared gradient of the whole batch's loss (the
    cheaper mini-batch estimator). ``x (B, T, d_in)``, ``g (B, T, d_out)``; chunked over output rows."""
    xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
    gf = g.reshape(-1, g.shape[-1]).to(torch.float32)
    d_in, d_out = xf.shape[1], gf.shape[1]
    out = torch.zeros(d_in, dtype=torch.float64, device=x.device)
    rows = max(1, min(d_out, chunk_bytes // (4 * d_in)))
    for r0 in range(0, d_out, rows):
        out += (gf[:, r0:r0 + rows].T @ xf).square().sum(0, dtype=torch.float64)
    return out
