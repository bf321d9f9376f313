"""Per-example clipping, summation and Gaussian noise: the DP-SGD arithmetic on plain tensors.

``clip_C(g) = g * min(1, C / ||g||)`` with ``||.||`` the L2 norm over *all* trainable parameters of one example.
One optimizer step releases ``(sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / B_expected``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Added to norms before dividing (as Opacus does), so a zero gradient gets factor 1, not NaN.
NORM_EPS = 1e-6


def per_sample_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Total L2 norm per example over several parameters.

    Args:
        grads: tensors ``(B, *param_shape)``, one per parameter.

    Returns:
        ``(B,)`` float32 (float64 if any input is float64).
    """
    if len(grads) == 0:
        raise ValueError("grads is empty: there are no trainable parameters to clip")
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    sq = torch.stack([g.reshape(g.shape[0], -1).to(dtype).pow(2).sum(dim=1) for g in grads], dim=0)
    return sq.sum(dim=0).sqrt()


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, C / (||g_i|| + 1e-6))`` per example: ``(B,)`` -> ``(B,)``."""
    if max_norm <= 0:
        raise ValueError(f"max_norm={max_norm!r}: the clipping bound must be > 0")
    return (max_norm / (norms + NORM_EPS)).clamp(max=1.0)


def clip_and_sum(
    grads: Sequence[torch.Tensor], max_norm: float, sample_weights: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clip every example's gradient to total norm ``C`` and sum over the batch.

    Args:
        grads: per-example gradients ``(B, *param_shape)``, one tensor per parameter.
        max_norm: ``C``.
        sample_weights: optional ``(B,)`` 0/1 mask (e.g. to drop padding examples); multiplies the clip factor.

    Returns:
        ``(sums, norms)``: sums ``[(*param_shape)]`` in float32 (float64 for float64 inputs) and the pre-clip
        norms ``(B,)``.
    """
    norms = per_sample_norms(grads)
    factors = clip_factors(norms, max_norm)
    if sample_weights is not None:
        factors = factors * sample_weights.to(factors)
    sums = [torch.einsum("b,b...->...", factors.to(g.device), g.to(factors.dtype)) for g in grads]
    return sums, norms


def gaussian_noise_like(
    tensors: Sequence[torch.Tensor], std: float, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Independent ``N(0, std^2)`` noise of the shape of every tensor, drawn on CPU from ``generator`` (so the stream
    does not depend on the device) in float32, then moved to each tensor's device and dtype."""
    out = []
    for t in tensors:
        if std == 0:
            out.append(torch.zeros_like(t))
            continue
        z = torch.randn(t.shape, generator=generator, dtype=torch.float32, device="cpu") * std
        out.append(z.to(device=t.device, dtype=t.dtype))
    return out


def privatize(
    summed: Sequence[torch.Tensor],
    noise_multiplier: float,
    max_norm: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The released gradient ``(sum + N(0, (sigma C)^2 I)) / B_expected`` per parameter (new tensors).

    Args:
        summed: clipped per-example gradient sums of the whole logical batch, ``[(*param_shape)]``.
        noise_multiplier: ``sigma``.
        max_norm: ``C``.
        expected_batch_size: ``q N`` (not the realised Poisson batch size, which would leak it).
        generator: noise RNG.
    """
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size={expected_batch_size!r} must be > 0")
    noise = gaussian_noise_like(summed, noise_multiplier * max_norm, generator)
    return [(s + z) / expected_batch_size for s, z in zip(summed, noise, strict=True)]
