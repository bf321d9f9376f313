"""The planned run: how many optimizer steps it takes, and what shuffled (non-Poisson) batches really guarantee.

The step count must be the Trainer's own: sigma is calibrated for it, and the hard budget stops training at it.
With ``poisson_sampling=False`` the batches are not a secret Poisson sample, so no amplification holds: what is
accounted, calibrated and reported is then the Gaussian mechanism composed once per epoch an example takes part in.
"""

from __future__ import annotations

import math
import warnings

from hf_svd_plugins.dp.accounting import compute_epsilon
from hf_svd_plugins.dp.config import DPConfig


def steps_per_epoch(args, cfg: DPConfig, num_examples: int, expected_batch_size: int) -> int:
    """Optimizer steps per epoch: ``N // B`` Poisson batches, or the Trainer's own count for its shuffled batches,
    ``ceil(batches / gradient_accumulation_steps)`` with ``batches = ceil(N / (per_device x world))`` (floor with
    ``dataloader_drop_last``)."""
    if cfg.poisson_sampling:
        return max(1, num_examples // expected_batch_size)
    per_batch = args.per_device_train_batch_size * max(1, args.world_size)
    rounding = math.floor if args.dataloader_drop_last else math.ceil
    batches = rounding(num_examples / per_batch)
    return max(1, math.ceil(batches / args.gradient_accumulation_steps))


def planned_steps(args, cfg: DPConfig, per_epoch: int) -> int:
    """``DPConfig.total_steps``, else ``max_steps``, else ``ceil(num_train_epochs x per_epoch)`` (the Trainer's rule)."""
    if cfg.total_steps is not None:
        return int(cfg.total_steps)
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    return max(1, math.ceil(args.num_train_epochs * per_epoch))


def participations(planned: int, per_epoch: int) -> int:
    """How many of ``planned`` shuffled-batch steps one example can be in: one per epoch begun."""
    return max(1, math.ceil(planned / per_epoch))


def accounted_plan(cfg: DPConfig, sample_rate: float, planned: int, per_epoch: int) -> tuple[float, int]:
    """``(sample rate, releases)`` the privacy of the planned run is computed from: ``(q, planned steps)`` for
    Poisson batches, ``(1, participations)`` for shuffled ones."""
    if cfg.poisson_sampling:
        return sample_rate, planned
    return 1.0, participations(planned, per_epoch)


def epsilon_without_amplification(
    noise_multiplier: float, participations: int, delta: float, accountant: str = "prv", eps_error: float = 0.01
) -> float:
    """Epsilon when every example is in ``participations`` steps and the batches may be known: the Gaussian
    mechanism (sensitivity C, noise sigma C) composed ``participations`` times, i.e. sample rate 1. The other steps
    do not touch the example."""
    return compute_epsilon(noise_multiplier, 1.0, participations, delta, accountant, eps_error)


def warn_shuffled_batches(cfg: DPConfig, noise_multiplier: float, sample_rate: float, planned: int, per_epoch: int,
                          delta: float) -> None:
    """The warning for ``poisson_sampling=False``: the epsilon that holds (reported) and the one it is not."""
    k = participations(planned, per_epoch)
    bound = epsilon_without_amplification(noise_multiplier, k, delta, cfg.accountant, cfg.eps_error)
    poisson = compute_epsilon(noise_multiplier, sample_rate, planned, delta, cfg.accountant, cfg.eps_error)
    warnings.warn(
        "DPConfig(poisson_sampling=False): the Trainer's shuffled fixed-size batches are NOT what the accountants' "
        "amplification by subsampling analyses. Their order comes from TrainingArguments.seed/data_seed, which are "
        "public (saved in training_args.bin), so an attacker may know every batch. What holds is the Gaussian "
        f"mechanism composed once per epoch (each example in {k} of the {planned} steps): epsilon = {bound:.3g} at "
        f"delta = {delta:.3g}; that is the epsilon logged and returned by get_epsilon() (sigma is calibrated for it "
        f"with target_epsilon). A secret Poisson sample would give {poisson:.3g}: use poisson_sampling=True for it",
        UserWarning,
        stacklevel=4,
    )
