"""A bounded-memory summary of one wide layer-input stream: Frequent Directions with exact means.

Pure tensors: no Trainer, no PEFT. Rows ``x (n, d)`` arrive batch by batch. The sketch keeps ``S (m, d)`` with
``m <= l`` (its capacity) plus the exact row count, mean and total variance ``tr C``, where ``C`` is the centred
scatter ``sum (x - mean)(x - mean)^T`` of every row seen. Means are merged exactly, as incremental PCA does: a block
with its own mean adds the rows ``sqrt(n_p) (mean_p - mean)`` of the between-block scatter, so ``S`` sketches ``C``
itself, not the raw second moment.

Compression is Parameterized Frequent Directions (Desai, Ghashami & Phillips, "Improved practical matrix sketching
with guarantees", 2016) with half the rows shrunk: when ``S`` and new rows exceed ``l`` rows, take the eigenpairs
``w_1 >= w_2 >= ...`` of their row Gram, keep the top ``l``, subtract ``delta = w_{l+1}`` from the lower
``ceil(l / 2)`` of them, leave the upper half untouched, and add ``delta`` to the running shrinkage ``Delta``. Each
step removes a matrix ``0 <= E <= delta I`` of trace at least ``(ceil(l / 2) + 1) delta``, hence for every
``j <= ceil(l / 2)``

    0 <= C - S^T S <= Delta I,        Delta <= sum_{i>j} lambda_i(C) / (ceil(l / 2) + 1 - j),

and the top-``j`` directions ``V_j`` of ``S`` capture ``tr(V_j^T C V_j) >= sum_{i<=j} lambda_i(C) - j Delta``.
Shrinking only the lower half keeps the upper directions unbiased (plain FD shrinks all rows, which on real
activations misplaces the trailing ones of the top ``r_max``). Sketches of disjoint blocks merge with the same bound
(the error matrices add, and so do their traces), which is how data-parallel ranks combine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hf_svd_plugins.eva.core import Components, canonical_signs


@dataclass
class FrequentDirections:
    """The sketch of a stream of rows of width ``d`` (see the module docstring for the guarantee).

    Attributes:
        count: ``()`` float64, rows seen.
        mean: ``(d,)`` float64, their mean (zeros when not centring).
        scatter_trace: ``()`` float64, ``tr C``, the exact total variance.
        rows: ``(m, d)`` the sketch ``S``, ``m <= capacity`` (an un-compressed block may hold more, see :meth:`block`).
        shrinkage: ``()`` float64, ``Delta``.
        capacity: ``l``, the most rows kept.
    """

    count: torch.Tensor
    mean: torch.Tensor
    scatter_trace: torch.Tensor
    rows: torch.Tensor
    shrinkage: torch.Tensor
    capacity: int

    @classmethod
    def empty(cls, dim: int, capacity: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> FrequentDirections:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return cls(zero.clone(), torch.zeros(dim, dtype=torch.float64, device=device), zero.clone(),
                   torch.zeros(0, dim, dtype=dtype, device=device), zero.clone(), int(capacity))

    @classmethod
    def block(cls, x: torch.Tensor, capacity: int, center: bool = True,
              dtype: torch.dtype = torch.float32) -> FrequentDirections:
        """Rows ``x (n, d)`` as an exact, not yet compressed, summary (its rows are ``x`` minus their mean)."""
        x = x.detach().reshape(-1, x.shape[-1])
        n = x.shape[0]
        total = x.sum(0, dtype=torch.float64)
        mean = total / n if center and n else torch.zeros_like(total)
        rows = x.to(dtype) - mean.to(dtype) if center and n else x.to(dtype)
        trace = torch.sum(rows * rows, dtype=torch.float64)  # accumulated in float64
        count = torch.tensor(float(n), dtype=torch.float64, device=x.device)
        return cls(count, mean, trace, rows, total.new_zeros(()), int(capacity))

    @classmethod
    def of(cls, x: torch.Tensor, capacity: int, center: bool = True,
           dtype: torch.dtype = torch.float32) -> FrequentDirections:
        """The sketch of the rows ``x (n, d)`` alone."""
        sketch = cls.empty(x.shape[-1], capacity, dtype, x.device)
        return sketch.merge_([cls.block(x, capacity, center, dtype)], center)

    def update_(self, x: torch.Tensor, center: bool = True) -> FrequentDirections:
        """Fold the rows ``x (n, d)`` into the sketch, in place."""
        return self.merge_([type(self).block(x, self.capacity, center, self.rows.dtype)], center)

    def merge_(self, others: Sequence[FrequentDirections], center: bool = True) -> FrequentDirections:
        """Fold other summaries (sketches of disjoint rows, or :meth:`block`s) into this one, in place, in order."""
        others = [o for o in others if float(o.count) > 0]
        if not others:
            return self
        device = self.rows.device
        parts = [p for p in (self, *others) if float(p.count) > 0]
        counts = torch.stack([p.count.to(device) for p in parts])
        means = torch.stack([p.mean.to(device) for p in parts])
        count = counts.sum()
        mean = (counts[:, None] * means).sum(0) / count if center else torch.zeros_like(self.mean)
        between = counts[:, None].sqrt() * (means - mean)  # rows of the between-block scatter
        trace = sum(p.scatter_trace.to(device) for p in parts) + between.square().sum()
        extra = [o.rows.to(device=device, dtype=self.rows.dtype) for o in others]
        if center and len(parts) > 1:
            extra.append(between.to(self.rows.dtype))
        self.rows, delta = compress(self.rows, torch.cat(extra), self.capacity)
        self.shrinkage = self.shrinkage + delta + sum(o.shrinkage.to(device) for o in others)
        self.count, self.mean, self.scatter_trace = count, mean, trace
        return self

    def components(self, k: int) -> Components:
        """Top-``k`` principal directions of the sketch (float64, canonical signs).

        Explained-variance ratios are ``sigma_i(S)^2 / tr C``; they under-estimate the true ones by at most
        ``Delta / tr C``. If the sketch holds fewer than ``k`` directions, the rest are zero-variance directions
        orthogonal to them.
        """
        rows = self.rows.to(torch.float64)
        values = rows.new_zeros(0)
        keep = 0
        if rows.shape[0]:
            # S has (nearly) orthogonal rows by construction, so its row Gram is well conditioned
            values, small = torch.linalg.eigh(rows @ rows.T)
            values, small = values.flip(0).clamp_min(0.0), small.flip(1)
            keep = min(k, int((values > 1e-12 * values[0]).sum())) if values[0] > 0 else 0
        vectors = (small[:, :keep].T @ rows) / values[:keep].sqrt()[:, None] if keep else rows.new_zeros(0, rows.shape[1])
        if keep < k:
            vectors = torch.cat([vectors, _orthogonal_completion(vectors, k - keep)])
        values = torch.cat([values[:keep], values.new_zeros(k - keep)])
        total = self.scatter_trace.clamp_min(torch.finfo(torch.float64).tiny)
        return Components(vectors=canonical_signs(vectors), singular_values=values.sqrt(),
                          explained_variance_ratio=values / total)


def compress(sketch: torch.Tensor, extra: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold rows ``extra (p, d)`` into ``sketch (m, d)``, ``capacity`` rows at a time (the cheapest block size: each
    step costs one ``(m + capacity)^2`` eigen-solve and ``O(capacity^2 d)`` products). Returns ``(S, delta_sum)``."""
    delta = torch.zeros((), dtype=torch.float64, device=sketch.device)
    step = max(1, capacity)
    for start in range(0, extra.shape[0], step):
        sketch = torch.cat([sketch, extra[start : start + step]])
        if sketch.shape[0] > capacity:
            sketch, shrunk = _shrink(sketch, capacity)
            delta = delta + shrunk
    return sketch, delta


def _shrink(stack: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, d)`` rows -> ``(<= capacity, d)``: the top ``capacity`` of the row space, the lower ``ceil(l/2)``
    shrunk by ``delta = w_{l+1}`` (squared singular values ``w``). Returns ``(S, delta)``."""
    # The row Gram is formed in the sketch's dtype; an eigen-solve in that dtype adds no error beyond its rounding.
    values, vectors = torch.linalg.eigh(stack @ stack.T)
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    delta = values[capacity].to(torch.float64)
    kept = values[:capacity].clone()
    kept[capacity // 2 :] = (kept[capacity // 2 :] - values[capacity]).clamp_min(0.0)
    nonzero = int((kept > 0).sum())
    scale = (kept[:nonzero] / values[:nonzero]).sqrt()
    return (vectors[:, :nonzero] * scale).T @ stack, delta


def _orthogonal_completion(vectors: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` orthonormal rows orthogonal to the orthonormal rows of ``vectors (m, d)`` (fixed seed)."""
    d = vectors.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    extra = torch.randn(d, n, generator=gen, dtype=torch.float64).to(vectors.device)
    if vectors.shape[0]:
        extra = extra - vectors.T @ (vectors @ extra)
    q, _ = torch.linalg.qr(extra)
    if vectors.shape[0]:
        q = q - vectors.T @ (vectors @ q)
        q, _ = torch.linalg.qr(q)
    return q.T


def captured_variance_lower_bound(singular_values: torch.Tensor, shrinkage: float, k: int) -> float:
    """A guaranteed lower bound on ``tr(V_k^T C V_k) / sum_{i<=k} lambda_i(C)`` for the sketch's top-``k``
    directions: ``sum sigma_i^2 / (sum sigma_i^2 + k Delta)`` (both sides of ``0 <= C - S^T S <= Delta I``).
    It is a worst case; the captured share is usually far closer to 1 (see docs/eva.md)."""
    if k <= 0:
        return 1.0
    head = float(singular_values[:k].square().sum())
    denominator = head + k * float(shrinkage)
    return head / denominator if denominator > 0 else 1.0


def sketch_bytes(dim: int, capacity: int, dtype: torch.dtype = torch.float32) -> int:
    """Memory of one sketch: ``b l d + 8 (d + 3)`` bytes."""
    return capacity * dim * torch.finfo(dtype).bits // 8 + 8 * (dim + 3)


def exact_bytes(dim: int) -> int:
    """Memory of one exact statistic: ``8 (d^2 + d + 1)`` bytes."""
    return 8 * (dim * dim + dim + 1)
