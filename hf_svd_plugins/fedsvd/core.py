"""FedSVD numerics on plain tensors: SVD refactorization of a LoRA pair and weighted aggregation.

No Trainer, no PEFT: everything here takes and returns ``torch.Tensor`` objects. The maths is in docs/fedsvd.md.

Shapes follow PyTorch: LoRA adds ``s * B @ A`` with ``A (r, d_in)`` and ``B (d_out, r)``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import overload

import torch

__all__ = [
    "FIRST_MOMENT_KEYS",
    "METHODS",
    "SECOND_MOMENT_KEYS",
    "aggregate_lora",
    "basis_change",
    "aggregate_weighted",
    "check_method",
    "is_finite_update",
    "refactorize",
    "transform_moments",
]

METHODS = ("fedsvd", "ffa_lora", "fedavg_lora")
"""Server aggregation rules: ``fedsvd`` (FFA-LoRA + SVD refactorization every round), ``ffa_lora`` (A frozen, B
averaged), ``fedavg_lora`` (A and B averaged separately)."""

LoraWeights = Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]

PairList = Sequence[torch.Tensor]


def _check_pair(b: torch.Tensor, a: torch.Tensor, where: str = "") -> None:
    if not isinstance(b, torch.Tensor) or not isinstance(a, torch.Tensor):
        raise TypeError(f"B and A{where} must be torch.Tensor, got {type(b).__name__} and {type(a).__name__}")
    if b.dim() < 2 or a.dim() < 2:
        raise ValueError(
            f"B{where} must be (..., d_out, r) and A{where} (..., r, d_in); got shapes {tuple(b.shape)} and "
            f"{tuple(a.shape)}: pass matrices (or stacks of matrices)"
        )
    if b.shape[-1] != a.shape[-2]:
        raise ValueError(
            f"rank mismatch: B{where} has r={b.shape[-1]} columns but A{where} has r={a.shape[-2]} rows; "
            "pass B as (d_out, r) and A as (r, d_in) of the same LoRA pair"
        )
    if b.shape[:-2] != a.shape[:-2]:
        raise ValueError(
            f"batch shapes differ: B{where} {tuple(b.shape[:-2])} vs A{where} {tuple(a.shape[:-2])}; stack the same "
            "number of B and A matrices"
        )
    if not (b.is_floating_point() and a.is_floating_point()):
        raise TypeError(f"B and A{where} must be floating point, got {b.dtype} and {a.dtype}")
    if b.numel() and not bool(torch.isfinite(b).all()):
        raise ValueError(f"B{where} contains NaN or Inf; refactorize only finite weights (check the training run)")
    if a.numel() and not bool(torch.isfinite(a).all()):
        raise ValueError(f"A{where} contains NaN or Inf; refactorize only finite weights (check the training run)")


def _refactorize_stacked(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Core of :func:`refactorize` on already validated (possibly batched) tensors.

    Args:
        b: ``(..., d_out, r)``.
        a: ``(..., r, d_in)``.

    Returns:
        ``B' (..., d_out, r)``, ``A' (..., r, d_in)`` in the input dtypes, singular values ``S (..., k)`` in float64
        with ``k = min(d_out, d_in, r)``.
    """
    d_out, r = b.shape[-2], b.shape[-1]
    d_in = a.shape[-1]
    k = min(d_out, d_in, r)
    b64 = b.to(torch.float64)
    a64 = a.to(torch.float64)
    # B = Q_b R_b with Q_b (d_out, k_b), R_b (k_b, r);  A^T = Q_a R_a with Q_a (d_in, k_a), R_a (k_a, r).
    q_b, r_b = torch.linalg.qr(b64, mode="reduced")
    q_a, r_a = torch.linalg.qr(a64.transpose(-1, -2), mode="reduced")
    k_a = q_a.shape[-1]  # min(d_in, r)
    # B A = Q_b (R_b R_a^T) Q_a^T; SVD of the small (k_b, k_a) core. full_matrices gives V' (k_a, k_a), so A' gets
    # min(r, d_in) orthonormal rows even when the product has lower rank (the extra rows pair with zero B columns).
    core = r_b @ r_a.transpose(-1, -2)
    u, s, vh = torch.linalg.svd(core, full_matrices=True)
    s = s[..., :k]
    new_b = torch.zeros(*b.shape[:-2], d_out, r, dtype=torch.float64, device=b.device)
    new_b[..., :, :k] = q_b @ (u[..., :, :k] * s.unsqueeze(-2))
    new_a = torch.zeros(*a.shape[:-2], r, d_in, dtype=torch.float64, device=a.device)
    new_a[..., :k_a, :] = vh @ q_a.transpose(-1, -2)
    # B == 0: the product carries no direction information, keep A as it is (B stays zero).
    b_zero = (b64 == 0).flatten(-2).all(-1)
    if bool(b_zero.any()):
        mask = b_zero[..., None, None]
        new_a = torch.where(mask, a64, new_a)
        new_b = torch.where(mask, torch.zeros_like(new_b), new_b)
        s = torch.where(b_zero[..., None], torch.zeros_like(s), s)
    return new_b.to(b.dtype), new_a.to(a.dtype), s


@overload
def refactorize(
    B: torch.Tensor, A: torch.Tensor, *, return_singular_values: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@overload
def refactorize(
    B: PairList, A: PairList, *, return_singular_values: bool = False
) -> (
    tuple[list[torch.Tensor], list[torch.Tensor]] | tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]
): ...


@torch.no_grad()
def refactorize(B, A, *, return_singular_values: bool = False):  # noqa: N803 - the paper's names
    """SVD refactorization of a LoRA pair: ``B' @ A' == B @ A`` with ``A'`` having orthonormal rows.

    With ``M = B @ A = U S V^T``: ``A' = V^T[:r]`` and ``B' = U[:, :r] * S[:r]``, computed by the cheap route of
    docs/fedsvd.md in ``O((d_out + d_in) r^2)``: ``B = Q_b R_b``, ``A^T = Q_a R_a``, SVD of the ``r x r`` matrix
    ``R_b R_a^T = U' S V'^T``, then ``B' = Q_b U' S`` and ``A' = V'^T Q_a^T``. All maths in float64; results are cast
    back to the input dtypes and stay on the input devices. Columns of ``B'`` are sorted by decreasing singular value
    and have norms equal to the singular values.

    Edge cases:
      * ``B == 0`` (all entries, per pair): ``(B, A)`` is returned unchanged (there is no spectrum to align to).
      * ``r > min(d_out, d_in)``: the product has rank ``k = min(d_out, d_in, r) < r``; ``B'`` columns ``k:`` are zero.
        ``A'`` still has ``min(r, d_in)`` orthonormal rows (an orthonormal completion); if ``r > d_in`` rows ``d_in:``
        are zero.

    Args:
        B: ``(..., d_out, r)`` tensor (leading batch dims allowed), or a list of ``(d_out_i, r_i)`` tensors.
        A: ``(..., r, d_in)`` tensor, or a list of ``(r_i, d_in_i)`` tensors paired with ``B``.
        return_singular_values: also return ``S`` (``(..., k)`` or a list of ``(k_i,)``), float32 or float64.

    Returns:
        ``(B', A')`` (or ``(B', A', S)``), tensors for tensor input and lists for list input. Lists are processed by
        grouping equal shapes into one batched call.

    Raises:
        ValueError: if the shapes do not form LoRA pairs or a value is NaN/Inf.
    """
    if isinstance(B, torch.Tensor) and isinstance(A, torch.Tensor):
        _check_pair(B, A)
        new_b, new_a, s = _refactorize_stacked(B, A)
        s = s.to(torch.promote_types(B.dtype, torch.float32))
        return (new_b, new_a, s) if return_singular_values else (new_b, new_a)
    if isinstance(B, torch.Tensor) or isinstance(A, torch.Tensor) or isinstance(B, str) or isinstance(A, str):
        raise TypeError("B and A must both be tensors or both be sequences of tensors (one B per A)")
    B, A = list(B), list(A)  # noqa: N806
    if len(B) != len(A):
        raise ValueError(f"got {len(B)} B matrices but {len(A)} A matrices; pass one B per A")
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (b, a) in enumerate(zip(B, A, strict=True)):
        _check_pair(b, a, where=f"[{i}]")
        groups[(tuple(b.shape), tuple(a.shape), b.dtype, a.dtype, b.device, a.device)].append(i)
    out_b: list[torch.Tensor | None] = [None] * len(B)
    out_a: list[torch.Tensor | None] = [None] * len(A)
    out_s: list[torch.Tensor | None] = [None] * len(A)
    for idx in groups.values():
        nb, na, s = _refactorize_stacked(torch.stack([B[i] for i in idx]), torch.stack([A[i] for i in idx]))
        s = s.to(torch.promote_types(B[idx[0]].dtype, torch.float32))
        for j, i in enumerate(idx):
            out_b[i], out_a[i], out_s[i] = nb[j], na[j], s[j]
    return (out_b, out_a, out_s) if return_singular_values else (out_b, out_a)


FIRST_MOMENT_KEYS = ("exp_avg", "momentum_buffer")
"""Optimizer state that is a running (weighted) sum of gradients: Adam's first moment, SGD's momentum."""
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq")
"""Optimizer state that is a running sum of squared gradient entries: Adam's second moment, AMSGrad's maximum."""


@torch.no_grad()
def basis_change(a_old: torch.Tensor, a_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``r x r`` maps of a refactorization ``(B, A) -> (B', A')`` whose ``A'`` has orthonormal rows.

    * ``T = A A'^T`` maps the factor: ``B' = B T`` whenever ``B' A' = B A`` (multiply by ``A'^T``), and with A in the
      row space of A' also ``A = T A'``.
    * ``W = pinv(A^T) A'^T`` maps gradients of B: the gradient of the loss w.r.t. B is ``G A^T`` for the gradient
      ``G (d_out, d_in)`` w.r.t. the product, so ``G A'^T = (G A^T) W`` exactly when the rows of ``A'`` lie in the
      row space of ``A`` (A of full row rank, which is what :func:`refactorize` produces then).

    ``W = T^{-T}``; both are orthogonal, and equal, when A already had orthonormal rows (every refactorization after
    the first one with A frozen).

    Args:
        a_old: ``A (r, d_in)`` before, ``a_new``: ``A' (r, d_in)`` after (as stored, i.e. after the cast).

    Returns:
        ``(T, W)``, float64 ``(r, r)``.
    """
    a64, n64 = a_old.to(torch.float64), a_new.to(torch.float64)
    t = a64 @ n64.T
    w = torch.linalg.pinv(a64.T) @ n64.T
    return t, w


@torch.no_grad()
def transform_moments(
    state: dict[str, torch.Tensor], factor: str, t: torch.Tensor, w: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Carry one parameter's optimizer moments across a change of basis (see :func:`basis_change`).

    First moments (:data:`FIRST_MOMENT_KEYS`) are linear in the gradients and transform exactly:
    ``m_B' = m_B W`` and, for a trained A (``A' = T^{-1} A``, gradients ``B'^T G = T^T B^T G``), ``m_A' = T^T m_A``.
    For B this is exact when A was frozen since the moments started (FFA-LoRA): every past gradient ``G_t A^T`` maps
    to ``G_t A'^T``. With A trained too, past gradients were taken at other factors and the map is an approximation.

    Second moments (:data:`SECOND_MOMENT_KEYS`) hold squared entries, which do not transform linearly: the new
    coordinate ``g'_k = sum_j g_j W_jk`` has ``E[g'_k^2] = sum_jl W_jk W_lk E[g_j g_l]``; the state keeps only the
    diagonal ``E[g_j^2]``, so the cross terms are dropped: ``v_B' = v_B (W o W)`` (``o``: entrywise product),
    ``v_A' = (T o T)^T v_A``. Exact if the gradient coordinates are uncorrelated; for orthogonal ``W`` it keeps each
    row's total ``sum_k v'_k = sum_j v_j`` and every entry non-negative. Other keys (step counts) are kept.

    Args:
        state: ``{key: tensor}`` of one parameter, ``B``-shaped ``(d_out, r)`` or ``A``-shaped ``(r, d_in)``.
        factor: ``"B"`` or ``"A"``.
        t, w: from :func:`basis_change`.

    Returns:
        A new dict with the transformed tensors, in the dtype and on the device of each input tensor.
    """
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    out = dict(state)
    for key, value in state.items():
        if key not in FIRST_MOMENT_KEYS and key not in SECOND_MOMENT_KEYS:
            continue
        v64 = value.to(torch.float64)
        first = key in FIRST_MOMENT_KEYS
        if factor == "B":
            new = v64 @ w.to(v64.device) if first else v64 @ (w * w).to(v64.device)
        else:
            new = t.T.to(v64.device) @ v64 if first else (t * t).T.to(v64.device) @ v64
        out[key] = new.to(value.dtype)
    return out


@torch.no_grad()
def aggregate_weighted(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Weighted mean ``sum_i w_i T_i / sum_i w_i`` (e.g. client B matrices weighted by their example counts).

    Args:
        tensors: ``n`` tensors of one shape (any, e.g. ``(d_out, r)``).
        weights: ``n`` non-negative finite numbers with a positive sum (need not be normalised).

    Returns:
        A tensor of that shape in the dtype and on the device of ``tensors[0]``; the sum is taken in float64.

    Raises:
        ValueError: on an empty list, a length/shape mismatch, negative or non-finite weights, a zero total weight,
            or NaN/Inf in a tensor.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors is empty: aggregate at least one client update")
    w = [float(x) for x in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(w) != len(tensors):
        raise ValueError(f"got {len(tensors)} tensors but {len(w)} weights; pass one weight per tensor")
    if any((not math.isfinite(x)) or x < 0 for x in w):
        raise ValueError(f"weights must be finite and >= 0 (e.g. example counts), got {w}")
    total = sum(w)
    if total <= 0:
        raise ValueError(f"weights sum to {total}; at least one weight must be positive")
    ref = tensors[0]
    acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
    for i, (t, wi) in enumerate(zip(tensors, w, strict=True)):
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"tensors[{i}] has shape {tuple(t.shape)} but tensors[0] has {tuple(ref.shape)}; "
                "all updates must have the same shape (same LoRA rank on every client)"
            )
        t64 = t.to(device=ref.device, dtype=torch.float64)
        if not bool(torch.isfinite(t64).all()):
            raise ValueError(f"tensors[{i}] contains NaN or Inf; drop that update before aggregating")
        acc.add_(t64, alpha=wi / total)
    return acc.to(ref.dtype)


# --------------------------------------------------------------------------------------------- federated server side


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a ``ValueError`` listing them."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return method


def trains_a(method: str) -> bool:
    """Whether clients train LoRA ``A`` under ``method`` (only ``fedavg_lora``; the others are FFA-LoRA, B only)."""
    return check_method(method) == "fedavg_lora"


def is_finite_update(update: Mapping[str, object]) -> bool:
    """True if every tensor in ``update`` (values may be tensors, None, or tuples of those) is free of NaN/Inf."""
    for value in update.values():
        items = value if isinstance(value, tuple | list) else (value,)
        for t in items:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return False
    return True


@torch.no_grad()
def aggregate_lora(
    method: str,
    global_weights: LoraWeights,
    client_weights: Sequence[LoraWeights],
    num_examples: Sequence[int],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """One server round: aggregate client LoRA weights by example counts under ``method``.

    * ``fedavg_lora``: ``A = avg(A_i)``, ``B = avg(B_i)`` (separately; their product is not the average product).
    * ``ffa_lora``: ``A = A_prev`` (frozen), ``B = avg(B_i)``.
    * ``fedsvd``: ``B_avg = avg(B_i)``, then ``(B, A) = refactorize(B_avg, A_prev)``: the same product as FFA-LoRA,
      with ``A`` re-oriented to the top right singular vectors for the next round.

    Args:
        method: one of :data:`METHODS`.
        global_weights: ``{module: (A (r, d_in), B (d_out, r))}`` the clients started from.
        client_weights: per client ``{module: (A or None, B)}``; ``A`` is only read for ``fedavg_lora``.
        num_examples: per client weight (its number of training examples), ``> 0`` in total.

    Returns:
        ``({module: (A, B)}, {module: singular values (k,)})``; the spectrum is empty unless ``method == "fedsvd"``.

    Raises:
        ValueError: unknown method, no clients, count mismatch, a module missing, a rank/shape mismatch (naming the
            client and module), NaN/Inf in an update (filter with :func:`is_finite_update` first).
    """
    check_method(method)
    if len(client_weights) == 0:
        raise ValueError("no client updates to aggregate (zero participating clients); sample at least one client")
    if len(client_weights) != len(num_examples):
        raise ValueError(f"got {len(client_weights)} client updates but {len(num_examples)} example counts")
    for i, update in enumerate(client_weights):
        missing = set(global_weights) - set(update)
        extra = set(update) - set(global_weights)
        if missing or extra:
            raise ValueError(
                f"client {i} update does not match the global modules: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]}; every client must use the same LoRA target_modules"
            )
        for name, (a_g, b_g) in global_weights.items():
            a_i, b_i = update[name]
            if b_i is None or tuple(b_i.shape) != tuple(b_g.shape):
                raise ValueError(
                    f"rank mismatch: client {i} sent B of shape {None if b_i is None else tuple(b_i.shape)} for "
                    f"{name}, the server has {tuple(b_g.shape)}; every client must use the same LoRA r"
                )
            if method == "fedavg_lora" and (a_i is None or tuple(a_i.shape) != tuple(a_g.shape)):
                raise ValueError(
                    f"rank mismatch: client {i} sent A of shape {None if a_i is None else tuple(a_i.shape)} for "
                    f"{name}, the server has {tuple(a_g.shape)}; fedavg_lora clients must send A and B"
                )
        if not is_finite_update(update):
            raise ValueError(f"client {i} update contains NaN or Inf; reject it before aggregating")
    names = list(global_weights)
    new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    b_avg = {n: aggregate_weighted([u[n][1] for u in client_weights], num_examples) for n in names}
    if method == "fedavg_lora":
        for n in names:
            new[n] = (aggregate_weighted([u[n][0] for u in client_weights], num_examples), b_avg[n])
        return new, {}
    if method == "ffa_lora":
        return {n: (global_weights[n][0].clone(), b_avg[n]) for n in names}, {}
    new_b, new_a, sv = refactorize(
        [b_avg[n] for n in names], [global_weights[n][0] for n in names], return_singular_values=True
    )
    new = {n: (a, b) for n, a, b in zip(names, new_a, new_b, strict=True)}
    return new, {n: s.float() for n, s in zip(names, sv, strict=True)}


def __getattr__(name: str):  # the partitions moved to fedsvd/partition.py; old imports keep working
    if name in ("partition_iid", "partition_dirichlet"):
        import warnings

        from hf_svd_plugins.fedsvd import partition

        warnings.warn(
            f"hf_svd_plugins.fedsvd.core.{name} moved to hf_svd_plugins.fedsvd.partition (also exported by "
            "hf_svd_plugins.fedsvd)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(partition, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
