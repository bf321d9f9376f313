"""Privacy accounting: a thin layer over Opacus accountants (PRV by default, RDP), with a name registry.

History is Opacus' format, a list of ``(noise_multiplier, sample_rate, num_steps)``. Noise calibration from a target
``(epsilon, delta)`` uses Opacus' ``get_noise_multiplier`` with the same accountant that reports epsilon.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

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
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=mechanism,
                epsilon_tolerance=epsilon_tolerance,
                **kwargs,
            )
        )
    except ValueError as exc:
        raise ValueError(
            f"target_epsilon={target_epsilon} cannot be met at delta={delta:.3g} with sample_rate={sample_rate:.4g} "
            f"over {steps} steps ({exc}); raise target_epsilon or delta, or train fewer steps / smaller batches"
        ) from exc


class PrivacyAccountant:
    """Privacy spent so far: an Opacus accountant's history plus caching, state dict and budget look-ahead.

    Args:
        accountant: a name in :data:`ACCOUNTANTS`.
        eps_error: PRV accuracy.
    """

    def __init__(self, accountant: str = "prv", eps_error: float = 0.01) -> None:
        make_accountant(accountant)  # validates the name
        self.accountant = accountant
        self.eps_error = eps_error
        self.history: History = []
        self._cache: dict[tuple, float] = {}

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps (merged into the last history entry when sigma and q are unchanged)."""
        if num_steps <= 0:
            return
        if self.history and self.history[-1][0] == noise_multiplier and self.history[-1][1] == sample_rate:
            s, q, n = self.history[-1]
            self.history[-1] = (s, q, n + num_steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(num_steps)))

    def get_epsilon(self, delta: float) -> float:
        key = (tuple(self.history), delta)
        if key not in self._cache:
            self._cache[key] = epsilon_of_history(self.history, delta, self.accountant, self.eps_error)
        return self._cache[key]

    def epsilon_after(self, delta: float, noise_multiplier: float, sample_rate: float, extra_steps: int) -> float:
        """Epsilon if ``extra_steps`` more steps at ``(sigma, q)`` were taken (the history is not changed)."""
        probe = PrivacyAccountant(self.accountant, self.eps_error)
        probe.history = list(self.history)
        probe.step(noise_multiplier, sample_rate, extra_steps)
        return probe.get_epsilon(delta)

    def max_extra_steps(
        self, epsilon_limit: float, delta: float, noise_multiplier: float, sample_rate: float, upper: int
    ) -> int:
        """The most steps (at most ``upper``) at ``(sigma, q)`` that keep epsilon <= ``epsilon_limit`` (bisection)."""
        if self.epsilon_after(delta, noise_multiplier, sample_rate, upper) <= epsilon_limit:
            return upper
        lo, hi = 0, upper  # eps(lo) <= limit < eps(hi)
        if self.get_epsilon(delta) > epsilon_limit:
            return 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon_after(delta, noise_multiplier, sample_rate, mid) <= epsilon_limit:
                lo = mid
            else:
                hi = mid
        return lo

    def state_dict(self) -> dict:
        return {"accountant": self.accountant, "eps_error": self.eps_error, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("accountant", self.accountant) != self.accountant:
            raise ValueError(
                f"checkpoint was accounted with accountant={state['accountant']!r} but DPConfig.accountant="
                f"{self.accountant!r}; resume with the same accountant"
            )
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self._cache.clear()
