"""EVA's Frequent Directions sketch against an exact float64 SVD of the same rows (numpy), and its stated bounds."""

import math

import numpy as np
import pytest
import torch

from hf_svd_plugins.eva.sketch import FrequentDirections, captured_variance_lower_bound


def heavy_tailed(n: int, d: int, seed: int = 0, power: float = 0.6, offset: float = 5.0) -> np.ndarray:
    """Rows with a slowly (power-law) decaying spectrum, like LLM activations, and a large non-zero mean."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = (1.0 + np.arange(d)) ** -power
    return rng.standard_normal((n, d)) * scales @ basis.T + offset * rng.standard_normal(d)


def exact_scatter(x: np.ndarray, center: bool = True) -> np.ndarray:
    xc = x - x.mean(0) if center else x
    return xc.T @ xc


def stream(x: np.ndarray, capacity: int, batch: int = 97, center: bool = True, dtype=torch.float64):
    sketch = FrequentDirections.empty(x.shape[1], capacity, dtype)
    for start in range(0, x.shape[0], batch):
        sketch.update_(torch.from_numpy(x[start : start + batch]), center)
    return sketch


def captured_ratio(vectors: np.ndarray, scatter: np.ndarray) -> float:
    k = vectors.shape[0]
    optimal = np.sort(np.linalg.eigvalsh(scatter))[::-1][:k].sum()
    return float(np.trace(vectors @ scatter @ vectors.T) / optimal)


@pytest.mark.parametrize("center", [True, False])
def test_sketch_subspace_captures_the_variance_of_the_optimal_one(center):
    x = heavy_tailed(3000, 120)
    scatter = exact_scatter(x, center)
    k = 8
    sketch = stream(x, capacity=4 * k, center=center)
    assert sketch.rows.shape[0] <= 4 * k
    comps = sketch.components(2 * k)
    vectors = comps.vectors.numpy()
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(2 * k), atol=1e-10)
    for j in (1, k // 2, k):
        assert captured_ratio(vectors[:j], scatter) >= 0.99, j
    # count, mean and total variance are exact
    assert float(sketch.count) == 3000
    np.testing.assert_allclose(sketch.mean.numpy(), x.mean(0) if center else 0.0, atol=1e-12)
    np.testing.assert_allclose(float(sketch.scatter_trace), np.trace(scatter), rtol=1e-10)
    np.testing.assert_allclose(comps.explained_variance_ratio.numpy(),
                               comps.singular_values.numpy() ** 2 / np.trace(scatter), rtol=1e-10)


def test_sketch_error_stays_within_the_frequent_directions_bound():
    """0 <= C - S^T S <= Delta I, and Delta <= sum_{i>j} lambda_i / (ceil(l/2) + 1 - j) for every j <= ceil(l/2)."""
    x = heavy_tailed(4000, 90, seed=1, power=0.3)  # slow decay: the sketch has to shrink a lot
    capacity = 24
    sketch = stream(x, capacity, batch=61)
    scatter = exact_scatter(x)
    gap = np.linalg.eigvalsh(scatter - sketch.rows.numpy().T @ sketch.rows.numpy())
    delta = float(sketch.shrinkage)
    scale = np.abs(scatter).max()
    assert delta > 0
    assert gap.min() >= -1e-9 * scale and gap.max() <= delta + 1e-9 * scale
    eigenvalues = np.sort(np.linalg.eigvalsh(scatter))[::-1]
    for j in range(0, math.ceil(capacity / 2) + 1):
        assert delta <= eigenvalues[j:].sum() / (math.ceil(capacity / 2) + 1 - j) * (1 + 1e-9), j
    # the reported lower bound holds for the captured share of every size
    comps = sketch.components(capacity // 2)
    for j in (1, 4, 12):
        bound = captured_variance_lower_bound(comps.singular_values, delta, j)
        assert captured_ratio(comps.vectors.numpy()[:j], scatter) >= bound - 1e-12


def test_merged_sketches_of_disjoint_rows_keep_the_bound():
    """What data-parallel ranks do: sketch each rank's rows alone, then merge; the union's bound holds."""
    x = heavy_tailed(2400, 80, seed=2)
    capacity = 24
    parts = [FrequentDirections.of(torch.from_numpy(chunk), capacity, dtype=torch.float64)
             for chunk in np.array_split(x, 3)]
    merged = FrequentDirections.empty(80, capacity, torch.float64).merge_(parts)
    scatter = exact_scatter(x)
    gap = np.linalg.eigvalsh(scatter - merged.rows.numpy().T @ merged.rows.numpy())
    scale = np.abs(scatter).max()
    assert gap.min() >= -1e-9 * scale and gap.max() <= float(merged.shrinkage) + 1e-9 * scale
    np.testing.assert_allclose(merged.mean.numpy(), x.mean(0), atol=1e-12)
    np.testing.assert_allclose(float(merged.scatter_trace), np.trace(scatter), rtol=1e-10)
    assert captured_ratio(merged.components(6).vectors.numpy(), scatter) >= 0.99


def test_sketch_as_wide_as_the_rows_is_exact():
    x = heavy_tailed(500, 16, seed=3)
    sketch = stream(x, capacity=16)
    assert float(sketch.shrinkage) <= 1e-12 * float(sketch.scatter_trace)  # rounding only
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    comps = sketch.components(5)
    np.testing.assert_allclose(comps.singular_values.numpy(), s[:5], rtol=1e-9)
    assert np.abs(np.sum(comps.vectors.numpy() * vt[:5], axis=1)).min() > 1 - 1e-9


def test_float32_sketch_agrees_with_float64():
    x = heavy_tailed(3000, 120, seed=4)
    v32 = stream(x, 32, dtype=torch.float32).components(8).vectors.numpy()
    v64 = stream(x, 32, dtype=torch.float64).components(8).vectors.numpy()
    assert np.linalg.svd(v32 @ v64.T, compute_uv=False).min() > 0.999


def test_fewer_rows_than_components_gives_orthonormal_zero_variance_directions():
    sketch = FrequentDirections.of(torch.randn(3, 10, dtype=torch.float64), capacity=8)
    comps = sketch.components(6)
    v = comps.vectors.numpy()
    np.testing.assert_allclose(v @ v.T, np.eye(6), atol=1e-10)
    assert torch.all(comps.explained_variance_ratio[2:] == 0)  # 3 centred rows span 2 directions
