"""Privacy spent and the hard budget, for Poisson-sampled or shuffled batches.

Poisson batches: every optimizer step is one Poisson-subsampled Gaussian release (the accountant's ``history``), and
epsilon is that history's. Shuffled batches (``poisson_sampling=False``): nothing is amplified; an example is in at
most one batch of an epoch, so every epoch begun adds one release of the Gaussian mechanism at sample rate 1 (the
accountant's ``unamplified`` history), and epsilon is that bound. The hard budget ``max_epsilon`` is checked before
every step against the epsilon that holds.
"""

from __future__ import annotations

import logging

from hf_svd_plugins.dp.accounting import PrivacyAccountant

logger = logging.getLogger(__name__)

#: identifies an epoch of shuffled batches: (train() call, epoch index)
EpochKey = tuple[int, int]


class PrivacyBudget:
    """What has been spent (:attr:`accountant`) and how much more may be, before each step.

    Args:
        accountant: the run's accountant (its histories survive checkpoints).
        delta: the delta epsilon is reported at.
        poisson: batches are a secret Poisson sample (amplified accounting).
        steps_per_epoch: optimizer steps per epoch (shuffled batches: a new epoch is a new participation).
    """

    def __init__(self, accountant: PrivacyAccountant, delta: float, poisson: bool, steps_per_epoch: int) -> None:
        self.accountant = accountant
        self.delta = delta
        self.poisson = poisson
        self.steps_per_epoch = steps_per_epoch
        self.last_epoch: EpochKey | None = None
        self.allowance: int | None = None  # steps (Poisson) or participations (shuffled) still allowed; None: no limit

    def epsilon(self, delta: float | None = None) -> float:
        """The epsilon that holds for the batches in use, at ``delta`` (default: the run's)."""
        return self.accountant.get_epsilon(self.delta if delta is None else delta, amplified=self.poisson)

    def epoch_key(self, train_call: int, global_step: int) -> EpochKey:
        return (train_call, global_step // self.steps_per_epoch)

    def _costs(self, key: EpochKey) -> bool:
        """Whether a step of epoch ``key`` spends budget (always for Poisson; the first step of an epoch otherwise)."""
        return self.poisson or key != self.last_epoch

    def releases_needed(self, train_call: int, start_step: int, stop_step: int) -> int:
        """What steps ``start_step .. stop_step - 1`` of a ``train()`` call spend: one each (Poisson), or one per epoch
        begun (shuffled; the epoch already begun before a resume is paid for)."""
        if stop_step <= start_step:
            return 0
        if self.poisson:
            return stop_step - start_step
        first = start_step // self.steps_per_epoch
        epochs = (stop_step - 1) // self.steps_per_epoch - first + 1
        return epochs - int(self.last_epoch == (train_call, first))

    def start(self, limit: float | None, noise_multiplier: float, sample_rate: float, needed: int) -> int | None:
        """How many of the ``needed`` releases (:meth:`releases_needed`) fit in ``limit``: that many are allowed from
        now on (None without a limit)."""
        if limit is None:
            self.allowance = None
            return None
        # A small slack for the calibration tolerance: sigma was chosen so the full plan meets target_epsilon.
        self.allowance = self.accountant.max_extra_steps(
            limit * (1 + 1e-9), self.delta, noise_multiplier, sample_rate, upper=max(0, needed),
            amplified=self.poisson,
        )
        return self.allowance

    def allows(self, key: EpochKey) -> bool:
        """Whether a step of epoch ``key`` stays within the hard budget."""
        return self.allowance is None or not self._costs(key) or self.allowance > 0

    def record(self, noise_multiplier: float, sample_rate: float, key: EpochKey) -> None:
        """Account one released step of epoch ``key``."""
        costs = self._costs(key)
        self.accountant.step(noise_multiplier, sample_rate)
        if not self.poisson and costs:
            self.accountant.participate(noise_multiplier)
        self.last_epoch = key
        if self.allowance is not None and costs:
            self.allowance -= 1
