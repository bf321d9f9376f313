"""EVA's numerical core: streaming activation statistics, their principal components, and the global rank budget.

Pure tensors: no Trainer, no PEFT. Shapes: a layer input stream is ``x (n_tokens, d_in)``.

For layers of moderate width the core keeps the exact sufficient statistics of the stacked inputs (count, column
sums and the ``d_in x d_in`` Gram matrix, in float64). Their top eigenvectors *are* the top right singular vectors of
the (optionally centred) stacked activations, so the result equals a float64 SVD of everything seen. Wide layers keep
a bounded sketch instead (:mod:`hf_svd_plugins.eva.sketch`). Also here: the stop rule's subspace similarity, the
global rank budget and EVA's A matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

# A full eigendecomposition is used when the subspace-iteration block would be at least half the width anyway.
_FULL_EIGH_BLOCK_FRACTION = 0.5


@dataclass
class ActivationStats:
    """Running sufficient statistics of the rows ``x`` of one layer-input stream (float64).

    Attributes:
        count: number of rows seen.
        total: ``(d,)`` column sums.
        gram: ``(d, d)`` sum of outer products ``x^T x``.
    """

    count: torch.Tensor
    total: torch.Tensor
    gram: torch.Tensor

    @classmethod
    def zeros(cls, dim: int, device: torch.device | str = "cpu") -> ActivationStats:
        return cls(
            count=torch.zeros((), dtype=torch.float64, device=device),
            total=torch.zeros(dim, dtype=torch.float64, device=device),
            gram=torch.zeros(dim, dim, dtype=torch.float64, device=device),
        )

    @classmethod
    def of(cls, x: torch.Tensor, product_dtype: torch.dtype = torch.float64) -> ActivationStats:
        """Statistics of one block of rows ``x (n, d)``; sums are float64.

        The ``n d^2`` product ``X^T X`` dominates EVA's cost. It is formed as ``X_c^T X_c + n m m^T`` with ``X_c`` the
        rows centred by their float64 mean ``m``, so computing it in ``product_dtype=float32`` (twice as fast) loses
        precision only relative to the activations' spread, never to their offset.
        """
        x = x.detach().reshape(-1, x.shape[-1])
        n = x.shape[0]
        total = x.sum(0, dtype=torch.float64)
        if n == 0:
            return cls(torch.zeros((), dtype=torch.float64, device=x.device), total,
                       torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device))
        mean = total / n
        centred = x.to(product_dtype) - mean.to(product_dtype)
        # X^T X = C^T C + m s^T + s m^T - n m m^T for C = X - 1 m^T, with s the exact float64 column sums of C
        s = total - n * mean if product_dtype == torch.float64 else centred.sum(0, dtype=torch.float64)
        m = mean.to(product_dtype).to(torch.float64)
        gram = (centred.T @ centred).to(torch.float64) + torch.outer(m, s) + torch.outer(s, m) + n * torch.outer(m, m)
        return cls(count=torch.tensor(float(n), dtype=torch.float64, device=x.device), total=total, gram=gram)

    def add_(self, other: ActivationStats) -> ActivationStats:
        self.count += other.count.to(self.count.device)
        self.total += other.total.to(self.total.device)
        self.gram += other.gram.to(self.gram.device)
        return self

    def covariance(self, center: bool = True) -> torch.Tensor:
        """``(d, d)`` scatter matrix ``X_c^T X_c`` of the stacked rows (centred by the column mean if ``center``)."""
        if not center:
            return self.gram.clone()
        mean = self.total / self.count.clamp_min(1.0)
        return self.gram - self.count * torch.outer(mean, mean)


@dataclass
class Components:
    """Top principal directions of a stream.

    Attributes:
        vectors: ``(k, d)`` orthonormal rows, largest first (the right singular vectors of the stacked inputs).
        singular_values: ``(k,)`` singular values of the stacked (centred) inputs, ``sqrt`` of the scatter eigenvalues.
        explained_variance_ratio: ``(k,)`` share of the total variance (trace) each direction explains.
    """

    vectors: torch.Tensor
    singular_values: torch.Tensor
    explained_variance_ratio: torch.Tensor


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row so its largest-magnitude entry is positive (the sign of a singular vector is arbitrary)."""
    idx = vectors.abs().argmax(dim=1)
    signs = torch.sign(vectors.gather(1, idx[:, None]))
    signs[signs == 0] = 1.0
    return vectors * signs


def top_eigenpairs(
    sym: torch.Tensor, k: int, init: torch.Tensor | None = None, max_iters: int = 300, tol: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of a symmetric PSD matrix ``sym (d, d)``: ``(values (k,), vectors (k, d))``, descending.

    Small matrices use a full ``eigh``. Wide ones use block subspace iteration with Rayleigh-Ritz, warm-started from
    ``init (k', d)`` (e.g. the previous batch's estimate), until the Ritz values stop moving (relative ``tol``).
    """
    d = sym.shape[0]
    if k + 8 >= _FULL_EIGH_BLOCK_FRACTION * d:
        values, vectors = torch.linalg.eigh(sym)
        return values.flip(0)[:k], vectors.flip(1)[:, :k].T
    block = min(d, k + 8)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(d, block, generator=gen, dtype=sym.dtype).to(sym.device)
    if init is not None:
        m = min(block, init.shape[0])
        q[:, :m] = init[:m].T.to(sym.dtype)
    q, _ = torch.linalg.qr(q)
    previous = None
    for _ in range(max_iters):
        z = sym @ q
        ritz = torch.linalg.eigvalsh(q.T @ z).flip(0)[:k]
        if previous is not None and torch.all((ritz - previous).abs() <= tol * ritz[0].abs().clamp_min(1e-300)):
            break
        previous = ritz
        q, _ = torch.linalg.qr(z)
    values, small = torch.linalg.eigh(q.T @ sym @ q)
    vectors = (q @ small).flip(1)[:, :k].T
    return values.flip(0)[:k], vectors


def principal_components(
    stats: ActivationStats, k: int, center: bool = True, init: torch.Tensor | None = None, tol: float = 1e-8,
    max_iters: int = 300,
) -> Components:
    """Top-``k`` principal directions of the rows summarised by ``stats`` (float64, canonical signs).

    ``init (k', d)`` warm-starts the iterative solver for wide layers; ``tol`` is its relative eigenvalue tolerance
    and ``max_iters`` its iteration cap (a few iterations per batch suffice to track a slowly changing estimate).
    """
    scatter = stats.covariance(center)
    values, vectors = top_eigenpairs(scatter, k, init=init, tol=tol, max_iters=max_iters)
    values = values.clamp_min(0.0)
    total = torch.diagonal(scatter).sum().clamp_min(torch.finfo(torch.float64).tiny)
    return Components(
        vectors=canonical_signs(vectors),
        singular_values=values.sqrt(),
        explained_variance_ratio=values / total,
    )


def subspace_similarity(previous: torch.Tensor, current: torch.Tensor, n: int) -> float:
    """Smallest cosine of the principal angles between the spans of the first ``n`` rows of two orthonormal
    ``(k, d)`` direction sets (1.0 for ``n = 0``).

    EVA's convergence test: LoRA with ``B = 0`` trains the same whatever basis of the span ``A`` holds, so only the
    span of the directions a module receives has to settle, not each vector (near-equal singular values let
    individual vectors rotate inside a stable span for many batches).
    """
    if n == 0:
        return 1.0
    overlap = previous[:n].to(torch.float64) @ current[:n].to(torch.float64).T
    return float(torch.linalg.svdvals(overlap).min().clamp(max=1.0))


def allocate_ranks(explained_variance_ratios: Mapping[str, torch.Tensor], budget: int) -> dict[str, int]:
    """Global rank budget: keep the ``budget`` largest explained-variance ratios over all modules.

    Args:
        explained_variance_ratios: ``{module: (r_max_m,) ratios, descending}`` in a fixed module order.
        budget: total rank ``R`` to distribute (``r * n_modules`` for EVA).

    Returns:
        ``{module: r_m}``, the number of that module's components among the kept ones (0 = no adapter). Ties are
        broken by module order, then component index, so every rank of a distributed run gets the same answer.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    names = list(explained_variance_ratios)
    entries = [
        (-float(v), order, j)
        for order, name in enumerate(names)
        for j, v in enumerate(explained_variance_ratios[name].tolist())
    ]
    entries.sort()
    ranks = dict.fromkeys(names, 0)
    for _, order, _ in entries[:budget]:
        ranks[names[order]] += 1
    return ranks


def eva_matrix(components: Components, rank: int, width: int, whiten: bool = False) -> torch.Tensor:
    """EVA's ``A (width, d_in)``: the top ``rank`` directions as rows, zero rows after (unused ranks).

    With ``whiten``, row ``i`` is divided by ``sqrt(singular_value_i)`` (PEFT EVA's ``whiten=True``).
    """
    vectors = components.vectors[:rank]
    if rank > vectors.shape[0]:
        raise ValueError(f"rank {rank} exceeds the {vectors.shape[0]} components that were estimated")
    if whiten:
        vectors = vectors / components.singular_values[:rank].clamp_min(1e-12).sqrt()[:, None]
    out = torch.zeros(width, vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    out[:rank] = vectors
    return out
