"""Privacy accounting: a thin layer over Opacus accountants (PRV by default, RDP), with a name registry.

History is Opacus' format, a list of ``(noise_multiplier, sample_rate, num_steps)``. Noise calibration from a target
``(epsilon, delta)`` uses Opacus' ``get_noise_multiplier`` with the same accountant that reports epsilon.

Opacus warns "Optimal order is the largest alpha" whenever its RDP optimum sits at the edge of its grid of orders
(the PRV accountant computes an RDP bound internally to size its domain): the bound is still valid, only possibly
looser, so that warning is silenced here. Sample rate 1 (no amplification) is supported.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

History = list[tuple[float, float, int]]

#: name -> factory of an Opacus accountant. ``"prv"`` (Gopi et al. 2021, tight) is the default; ``"rdp"`` is the
#: classic Renyi-DP bound (looser). Add more with :func:`register_accountant`.
ACCOUNTANTS: dict[str, Callable[[], IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}


def register_accountant(name: str, factory: Callable[[], IAccountant]) -> None:
    """Make ``DPConfig(accountant=name)`` use ``factory()`` (an Opacus ``IAccountant``)."""
    if not callable(factory):
        raise ValueError(f"factory for accountant {name!r} must be callable and return an opacus IAccountant")
    ACCOUNTANTS[name] = factory


def make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant={name!r}: choose one of {sorted(ACCOUNTANTS)} or register_accountant() yours")
    return ACCOUNTANTS[name]()


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):  # PRV at q = 1 takes log(0)
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


def _clean_history(history: Sequence[tuple[float, float, int]]) -> History:
    return [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0 and float(q) > 0]


def epsilon_of_history(
    history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "prv", eps_error: float = 0.01
) -> float:
    """Epsilon at ``delta`` after the composition ``history`` of Poisson-subsampled Gaussian steps.

    Returns 0 for an empty history and ``inf`` if any step had ``noise_multiplier == 0`` (no privacy).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must be in (0, 1)")
    hist = _clean_history(history)
    if not hist:
        return 0.0
    if any(s == 0 for s, _, _ in hist):
        return math.inf
    acc = make_accountant(accountant)
    acc.history = hist
    kwargs = {"eps_error": eps_error} if acc.mechanism() == "prv" else {}
    with _quiet_opacus():
        return float(acc.get_epsilon(delta=delta, **kwargs))


def compute_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv",
    eps_error: float = 0.01,
) -> float:
    """Epsilon at ``delta`` after ``steps`` steps with noise ``sigma`` and Poisson rate ``q``."""
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant, eps_error)


@functools.lru_cache(maxsize=256)  # federated clients calibrate the same plan every round
def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
    eps_error: float = 0.01,
) -> float:
    """The smallest ``sigma`` (to ``epsilon_tolerance``) whose ``steps`` steps at rate ``q`` spend at most
    ``target_epsilon`` at ``delta``, by Opacus' ``get_noise_multiplier`` with the same accountant.

    Raises ``ValueError`` when no noise level reaches the target.
    """
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1]")
    if steps < 1:
        raise ValueError(f"steps={steps!r}: calibration needs at least one planned step")
    mechanism = make_accountant(accountant).mechanism()
    kwargs = {"eps_error": eps_error} if mechanism == "prv" else {}
    try:
        with _quiet_opacus():
            sigma = float(get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=mechanism,
                epsilon_tolerance=epsilon_tolerance,
                **kwargs,
            ))
    except ValueError as exc:
        raise ValueError(
            f"target_epsilon={target_epsilon} cannot be met at delta={delta:.3g} with sample_rate={sample_rate:.4g} "
            f"over {steps} steps ({exc}); raise target_epsilon or delta, or train fewer steps / smaller batches"
        ) from exc
    return sigma


class PrivacyAccountant:
    """Privacy spent so far: an Opacus accountant's history plus caching, state dict and budget look-ahead.

    Two histories: ``history``, every step as a Poisson-subsampled Gaussian release ``(sigma, q, steps)`` (what the
    accountants analyse), and ``unamplified``, ``(sigma, 1.0, participations)`` for batches that are not a secret
    Poisson sample (an example is in at most one batch per epoch of shuffled batches, whose order may be known): the
    Gaussian mechanism composed once per participation, no amplification.

    Args:
        accountant: a name in :data:`ACCOUNTANTS`.
        eps_error: PRV accuracy.
    """

    def __init__(self, accountant: str = "prv", eps_error: float = 0.01) -> None:
        make_accountant(accountant)  # validates the name
        self.accountant = accountant
        self.eps_error = eps_error
        self.history: History = []
        self.unamplified: History = []
        self._cache: dict[tuple, float] = {}

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps (merged into the last history entry when sigma and q are unchanged)."""
        _append(self.history, noise_multiplier, sample_rate, num_steps)

    def participate(self, noise_multiplier: float, num: int = 1) -> None:
        """Record ``num`` releases that may include an example, without amplification (sample rate 1)."""
        _append(self.unamplified, noise_multiplier, 1.0, num)

    def get_epsilon(self, delta: float, amplified: bool = True) -> float:
        """Epsilon at ``delta`` of ``history`` (``amplified``) or of ``unamplified``."""
        history = self.history if amplified else self.unamplified
        key = (amplified, tuple(history), delta)
        if key not in self._cache:
            self._cache[key] = epsilon_of_history(history, delta, self.accountant, self.eps_error)
        return self._cache[key]

    def epsilon_after(
        self, delta: float, noise_multiplier: float, sample_rate: float, extra_steps: int, amplified: bool = True
    ) -> float:
        """Epsilon if ``extra_steps`` more steps at ``(sigma, q)`` were taken (or, not ``amplified``, that many more
        participations at ``sigma``); the histories are not changed."""
        probe = PrivacyAccountant(self.accountant, self.eps_error)
        probe.history, probe.unamplified = list(self.history), list(self.unamplified)
        if amplified:
            probe.step(noise_multiplier, sample_rate, extra_steps)
        else:
            probe.participate(noise_multiplier, extra_steps)
        return probe.get_epsilon(delta, amplified)

    def max_extra_steps(
        self, epsilon_limit: float, delta: float, noise_multiplier: float, sample_rate: float, upper: int,
        amplified: bool = True,
    ) -> int:
        """The most steps (participations if not ``amplified``; at most ``upper``) at ``(sigma, q)`` that keep
        epsilon <= ``epsilon_limit`` (bisection)."""
        def fits(n: int) -> bool:
            return self.epsilon_after(delta, noise_multiplier, sample_rate, n, amplified) <= epsilon_limit

        if fits(upper):
            return upper
        if self.get_epsilon(delta, amplified) > epsilon_limit:
            return 0
        lo, hi = 0, upper  # eps(lo) <= limit < eps(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def state_dict(self) -> dict:
        return {"accountant": self.accountant, "eps_error": self.eps_error, "history": list(self.history),
                "unamplified": list(self.unamplified)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("accountant", self.accountant) != self.accountant:
            raise ValueError(
                f"checkpoint was accounted with accountant={state['accountant']!r} but DPConfig.accountant="
                f"{self.accountant!r}; resume with the same accountant"
            )
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self.unamplified = [(float(s), float(q), int(n)) for s, q, n in state.get("unamplified", [])]
        self._cache.clear()


def _append(history: History, noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
    if num_steps <= 0:
        return
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        s, q, n = history[-1]
        history[-1] = (s, q, n + num_steps)
    else:
        history.append((float(noise_multiplier), float(sample_rate), int(num_steps)))
