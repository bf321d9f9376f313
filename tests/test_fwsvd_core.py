"""FWSVD's numerical core against float64 numpy closed forms, random perturbations and explicit loops."""

import numpy as np
import pytest
import torch

from hf_svd_plugins.fwsvd import core
from hf_svd_plugins.fwsvd.core import (
    LayerShape,
    allocate_budget,
    batch_fisher,
    per_example_fisher,
    uniform_rank,
    weighted_low_rank,
    whitened_low_rank,
    whitening_factor,
)


def random_weight(d_out: int, d_in: int, seed: int = 0, decay: float = 0.85) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d_out, d_out)))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
    s = decay ** np.arange(min(d_out, d_in)) * 3
    return (u[:, : len(s)] * s) @ v[:, : len(s)].T


def numpy_weighted_optimum(w: np.ndarray, imp: np.ndarray, k: int) -> np.ndarray:
    """The paper's closed form with an explicit D^-1 (positive importances): W' = (U_k S_k)(V_k^T D^-1)."""
    d = np.sqrt(imp)
    u, s, vt = np.linalg.svd(w * d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k] / d


def weighted_error(w, approx, imp):
    return float((((w - approx) ** 2) * imp).sum())


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_weighted_low_rank_is_the_float64_closed_form_and_beats_random_perturbations(shape):
    rng = np.random.default_rng(1)
    w = random_weight(*shape)
    imp = rng.gamma(0.5, 2.0, shape[1]) + 1e-3
    k = 4
    down, up = weighted_low_rank(torch.from_numpy(w), torch.from_numpy(imp), k)
    assert down.shape == (k, shape[1]) and up.shape == (shape[0], k) and down.dtype == torch.float64
    approx = (up @ down).numpy()
    optimum = numpy_weighted_optimum(w, imp, k)
    np.testing.assert_allclose(approx, optimum, atol=1e-10)
    np.testing.assert_allclose(up.numpy().T @ up.numpy(), np.eye(k), atol=1e-12)  # up orthonormal, down = up^T W
    best = weighted_error(w, approx, imp)
    for _ in range(200):  # any other rank-k matrix nearby is worse
        a = up.numpy() + 0.05 * rng.standard_normal(up.shape)
        b = down.numpy() + 0.05 * rng.standard_normal(down.shape)
        assert weighted_error(w, a @ b, imp) > best


def test_no_importance_is_truncated_svd_and_dtype_is_kept():
    w = random_weight(16, 24, seed=2)
    down, up = weighted_low_rank(torch.from_numpy(w).float(), None, 5)
    assert down.dtype == up.dtype == torch.float32
    u, s, vt = np.linalg.svd(w)
    np.testing.assert_allclose((up @ down).double().numpy(), (u[:, :5] * s[:5]) @ vt[:5], atol=1e-5)


def test_zero_importance_needs_no_epsilon_and_ignores_those_features():
    rng = np.random.default_rng(3)
    w = random_weight(10, 16, seed=3)
    imp = rng.random(16) + 0.1
    imp[[2, 7]] = 0.0
    down, up = weighted_low_rank(torch.from_numpy(w), torch.from_numpy(imp), 3)
    assert torch.isfinite(down).all() and down.abs().max() <= np.abs(w).max() * 4
    keep = imp > 0
    optimum = numpy_weighted_optimum(w[:, keep], imp[keep], 3)  # zero columns do not enter the objective
    np.testing.assert_allclose((up @ down).numpy()[:, keep], optimum, atol=1e-10)


def test_weighted_low_rank_rejects_bad_importance_and_rank():
    w = torch.randn(6, 8)
    with pytest.raises(ValueError, match="importance must have shape"):
        weighted_low_rank(w, torch.ones(6), 2)
    with pytest.raises(ValueError, match="non-negative"):
        weighted_low_rank(w, -torch.ones(8), 2)
    with pytest.raises(ValueError, match="rank must be"):
        weighted_low_rank(w, None, 7)


@pytest.mark.parametrize("n_tokens", [300, 9])  # full-rank Gram, and fewer tokens than features (singular)
def test_whitened_low_rank_reaches_the_numpy_optimum_of_the_output_error(n_tokens):
    rng = np.random.default_rng(4)
    d_out, d_in, k = 14, 20, 5
    w = random_weight(d_out, d_in, seed=4)
    x = rng.standard_normal((n_tokens, d_in)) @ np.diag(rng.gamma(0.7, 1.0, d_in)) + 0.3
    gram = x.T @ x
    down, up = whitened_low_rank(torch.from_numpy(w), torch.from_numpy(gram), k, damping=0.0)
    error = np.linalg.norm((w - (up @ down).numpy()) @ x.T) ** 2
    singular = np.linalg.svd(w @ x.T, compute_uv=False)
    np.testing.assert_allclose(error, (singular[k:] ** 2).sum(), rtol=1e-8, atol=1e-9)
    # with damping, the singular Gram still works and stays close to the optimum
    down_d, up_d = whitened_low_rank(torch.from_numpy(w), torch.from_numpy(gram), k, damping=0.01)
    error_d = np.linalg.norm((w - (up_d @ down_d).numpy()) @ x.T) ** 2
    assert np.isfinite(error_d) and error_d <= 1.2 * (singular[k:] ** 2).sum() + 1e-9


def test_whitening_factor_is_a_factor_of_the_damped_gram_without_inverse():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 8))  # rank 3 of 8
    g = torch.from_numpy(x.T @ x)
    for damping in (0.0, 0.1):
        factor = whitening_factor(g, damping)
        target = g + damping * torch.trace(g) / 8 * torch.eye(8, dtype=torch.float64)
        torch.testing.assert_close(factor @ factor.T, target, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="calibration data never reached"):
        whitening_factor(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="damping"):
        whitening_factor(g, -1.0)


def test_per_example_fisher_routes_equal_an_explicit_loop():
    rng = torch.Generator().manual_seed(6)
    for tokens, d_in, d_out in [(3, 16, 24), (40, 6, 5)]:  # Gram route, then the direct route
        assert (tokens * (d_in + d_out) < d_in * d_out) == (tokens == 3)
        x = torch.randn(5, tokens, d_in, generator=rng)
        g = torch.randn(5, tokens, d_out, generator=rng)
        g[1, -1] = 0  # a padded position
        expected = sum(((g[n].double().T @ x[n].double()) ** 2).sum(0) for n in range(5))
        for chunk in (core.DEFAULT_CHUNK_BYTES, 64):  # one chunk, and one example / one row at a time
            torch.testing.assert_close(per_example_fisher(x, g, chunk), expected, rtol=1e-5, atol=1e-6)
        batch = ((g.reshape(-1, d_out).double().T @ x.reshape(-1, d_in).double()) ** 2).sum(0)
        torch.testing.assert_close(batch_fisher(x, g, 64), batch, rtol=1e-5, atol=1e-6)


def test_uniform_rank_counts_weight_parameters_and_rounds_down():
    assert uniform_rank(32, 32, 0.5, 8) == 8  # 0.5 * 1024 / 64 = 8
    assert uniform_rank(4096, 11008, 0.5, 8) == 1488  # floor(1492.8) rounded down to a multiple of 8
    assert uniform_rank(4096, 4096, 1.0, 8) is None  # keeping everything saves nothing: stays dense
    assert uniform_rank(16, 32, 0.3, 8) == 3  # below one multiple: floor(3.2), not rounded to 0
    k = uniform_rank(576, 1536, 0.8, 8)
    assert k * (576 + 1536) <= 0.8 * 576 * 1536 < (k + 8) * (576 + 1536)


def test_allocate_budget_with_equal_shapes_keeps_the_globally_largest_terms():
    rng = np.random.default_rng(7)
    energies = {f"l{i}": torch.from_numpy(np.sort(rng.gamma(0.5, 1.0, 16))[::-1].copy()) for i in range(5)}
    shapes = {name: LayerShape(16, 40) for name in energies}
    budget = 30 * 56  # 30 ranks in total
    ranks = allocate_budget(energies, shapes, budget, rank_multiple=1)
    everything = np.sort(np.concatenate([e.numpy() for e in energies.values()]))[::-1]
    threshold = everything[29]
    assert ranks == {n: int((e.numpy() >= threshold).sum()) for n, e in energies.items()}
    assert sum(ranks.values()) == 30


def test_allocate_budget_respects_budget_floors_and_multiples():
    rng = np.random.default_rng(8)
    shapes = {"a": LayerShape(64, 64), "b": LayerShape(32, 96), "c": LayerShape(96, 48)}
    energies = {n: torch.from_numpy(np.sort(rng.gamma(0.3, 1.0, min(s.d_out, s.d_in)))[::-1].copy())
                for n, s in shapes.items()}
    for budget in (8 * (128 + 128 + 144), 5000, 9000):
        ranks = allocate_budget(energies, shapes, budget, rank_multiple=8)
        assert sum(shapes[n].cost(k) for n, k in ranks.items()) <= budget
        assert all(k is None or (k % 8 == 0 and k >= 8) for k in ranks.values())
    smallest, dense = core.budget_bounds(shapes, 8)
    with pytest.raises(ValueError, match="param_budget"):
        allocate_budget(energies, shapes, smallest - 1)
    with pytest.raises(ValueError, match="dense size"):
        allocate_budget(energies, shapes, dense)
