"""The planned run: how many optimizer steps it takes, and what shuffled (non-Poisson) batches really guarantee.

The step count must be the Trainer's own: sigma is calibrated for it, and the hard budget stops training at it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

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


def epsilon_without_amplification(
    noise_multiplier: float, participations: int, delta: float, accountant: str = "prv", eps_error: float = 0.01
) -> float:
    """Epsilon when every example is in ``participations`` steps and the batches may be known: the Gaussian
    mechanism (sensitivity C, noise sigma C) composed ``participations`` times, i.e. sample rate 1. The other steps
    do not touch the example."""
    with np.errstate(divide="ignore", invalid="ignore"):  # PRV at q = 1 takes log(0) on its grid
        return compute_epsilon(noise_multiplier, 1.0, participations, delta, accountant, eps_error)


def warn_shuffled_batches(cfg: DPConfig, noise_multiplier: float, planned: int, per_epoch: int, delta: float) -> None:
    """The warning for ``poisson_sampling=False``, with the bound that does hold."""
    participations = math.ceil(planned / per_epoch)
    bound = epsilon_without_amplification(noise_multiplier, participations, delta, cfg.accountant, cfg.eps_error)
    warnings.warn(
        "DPConfig(poisson_sampling=False): the Trainer's shuffled fixed-size batches are NOT what the accountant "
        "analyses. The reported epsilon assumes amplification by a secret Poisson sample; here the shuffle order "
        "comes from TrainingArguments.seed/data_seed, which are public (saved in training_args.bin), so an attacker "
        "may know every batch and the reported epsilon can under-estimate the privacy loss many times over. What "
        f"does hold without amplification (each example in {participations} of the {planned} steps): "
        f"epsilon = {bound:.3g} at delta = {delta:.3g}. Use poisson_sampling=True for a guarantee at the reported "
        "epsilon",
        UserWarning,
        stacklevel=4,
    )
