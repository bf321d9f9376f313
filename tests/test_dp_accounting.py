"""Our accountant layer (Opacus PRV / RDP) against Google's independent `dp_accounting` library."""

from __future__ import annotations

import math

import pytest

from hf_svd_plugins.dp.accounting import (
    PrivacyAccountant,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_of_history,
)

dp_accounting = pytest.importorskip("dp_accounting")


def _pld_epsilon(history, delta: float) -> float:
    from dp_accounting import pld

    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


def _google_rdp_epsilon(history, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


CASES = [(1.0, 0.01, 1000), (0.8, 0.05, 200), (2.0, 0.1, 50), (1.5, 0.004, 3000)]


@pytest.mark.parametrize(("sigma", "q", "steps"), CASES)
def test_prv_matches_google_pld(sigma, q, steps):
    ours = compute_epsilon(sigma, q, steps, 1e-5, accountant="prv")
    ref = _pld_epsilon([(sigma, q, steps)], 1e-5)
    assert abs(ours / ref - 1) < 0.02, (ours, ref)


@pytest.mark.parametrize(("sigma", "q", "steps"), CASES[:2])
def test_rdp_matches_google_rdp(sigma, q, steps):
    ours = compute_epsilon(sigma, q, steps, 1e-5, accountant="rdp")
    ref = _google_rdp_epsilon([(sigma, q, steps)], 1e-5)
    assert abs(ours / ref - 1) < 0.02, (ours, ref)


def test_design_reference_numbers():
    assert compute_epsilon(1.0, 0.01, 1000, 1e-5, "prv") == pytest.approx(1.83, abs=0.02)
    assert compute_epsilon(1.0, 0.01, 1000, 1e-5, "rdp") == pytest.approx(2.10, abs=0.02)


def test_heterogeneous_history_matches_pld():
    history = [(1.2, 0.02, 300), (0.9, 0.05, 100)]
    acc = PrivacyAccountant("prv")
    for s, q, n in history:
        for _ in range(n):
            acc.step(s, q)
    assert acc.history == history  # consecutive equal steps are merged
    ours = acc.get_epsilon(1e-5)
    assert abs(ours / _pld_epsilon(history, 1e-5) - 1) < 0.02


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibration_hits_target(accountant):
    target, delta, q, steps = 3.0, 1e-5, 0.02, 400
    sigma = calibrate_noise_multiplier(target, delta, q, steps, accountant=accountant)
    eps = compute_epsilon(sigma, q, steps, delta, accountant)
    assert target - 0.02 <= eps <= target
    if accountant == "prv":  # independent check of the calibrated sigma
        assert abs(_pld_epsilon([(sigma, q, steps)], delta) / target - 1) < 0.02


def test_unreachable_target_raises():
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(1e-6, 1e-5, 1.0, 10**6, accountant="rdp")


def test_edge_cases_and_state():
    assert epsilon_of_history([], 1e-5) == 0.0
    assert math.isinf(compute_epsilon(0.0, 0.1, 10, 1e-5))
    acc = PrivacyAccountant("rdp")
    acc.step(1.0, 0.1, 5)
    state = acc.state_dict()
    other = PrivacyAccountant("rdp")
    other.load_state_dict(state)
    assert other.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyAccountant("prv").load_state_dict(state)
    n = acc.max_extra_steps(acc.epsilon_after(1e-5, 1.0, 0.1, 20), 1e-5, 1.0, 0.1, upper=100)
    assert n == 20


@pytest.mark.parametrize(("sigma", "participations"), [(1.0, 1), (1.0, 3), (2.0, 10)])
def test_no_amplification_bound_is_the_composed_gaussian_mechanism(sigma, participations):
    """What shuffled (public-order) batches guarantee: k releases of the Gaussian mechanism. Reference: its exact
    privacy profile (Balle & Wang 2018) with mu = sqrt(k) / sigma,
    delta(eps) = Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2), solved for eps."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    from hf_svd_plugins.dp.plan import epsilon_without_amplification

    delta, mu = 1e-5, math.sqrt(participations) / sigma
    exact = brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 1e-6, 200)
    assert epsilon_without_amplification(sigma, participations, delta) == pytest.approx(exact, rel=0.02)
