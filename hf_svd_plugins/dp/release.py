"""The release of one optimizer step: clipped per-example gradient sums -> one noised gradient.

Per optimizer step: the clipped sums of every micro-batch are added into float32 accumulators; at the step they are
summed over ranks (one all-reduce, through :mod:`hf_svd_plugins.distributed`), Gaussian noise ``N(0, sigma^2 C^2)`` is
added once (every rank draws the same noise from an identically seeded generator, so the noise is added once to the
one all-reduced sum), and the result is divided by the expected batch size.

A rank that fails while computing its share (a refused batch, an error in the model) records the failure instead of
raising at once; the failure travels with the all-reduce as one extra number, and every rank raises at the step.
Otherwise the other ranks would wait forever in the collective.
"""

from __future__ import annotations

import torch

from hf_svd_plugins.distributed import all_reduce_sum_
from hf_svd_plugins.dp.clipping import privatize


class RankFailedError(RuntimeError):
    """Another rank failed while computing its share of the step (its own log has the error)."""


class NoisyRelease:
    """Accumulators and noise generator of the private gradient.

    Args:
        noise_multiplier: sigma.
        max_grad_norm: C.
        expected_batch_size: ``q N`` (the realised Poisson batch size would leak).
        seed: seed of the noise generator (identical on every rank).
    """

    def __init__(self, noise_multiplier: float, max_grad_norm: float, expected_batch_size: int, seed: int) -> None:
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = expected_batch_size
        self.generator = torch.Generator().manual_seed(int(seed))
        self.sums: list[torch.Tensor] | None = None
        self.failure: BaseException | None = None

    @property
    def pending(self) -> bool:
        return self.sums is not None

    def add(self, sums: list[torch.Tensor]) -> None:
        """Add one micro-batch's clipped sums ``[(*param_shape)]`` (kept in float32)."""
        if self.sums is None:
            self.sums = [torch.zeros(s.shape, dtype=torch.float32, device=s.device) for s in sums]
        for acc, s in zip(self.sums, sums, strict=True):
            acc.add_(s.to(acc.dtype))

    def record_failure(self, exc: BaseException) -> None:
        """Remember this rank's failure; :meth:`release` raises it after telling the other ranks."""
        if self.failure is None:
            self.failure = exc

    def discard(self) -> None:
        """Drop the step's accumulators (no release, nothing drawn)."""
        self.sums = None

    @torch.no_grad()
    def release(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """``(sum over ranks of the clipped sums + N(0, (sigma C)^2 I)) / B`` per parameter (new float32 tensors).

        Raises the recorded failure (or :class:`RankFailedError` on the other ranks) instead, after the all-reduce.
        """
        acc = self.sums or [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        self.sums = None
        failed = torch.tensor([0.0 if self.failure is None else 1.0], dtype=torch.float32, device=acc[0].device)
        all_reduce_sum_([*acc, failed])
        if self.failure is not None:
            exc, self.failure = self.failure, None
            raise exc
        if failed.item() > 0:
            raise RankFailedError("DP: another rank failed while computing its share of this step; see its error")
        return privatize(acc, self.noise_multiplier, self.max_grad_norm, self.expected_batch_size, self.generator)
