"""EVA's numerical core against float64 numpy and brute force."""

import numpy as np
import pytest
import torch

from hf_svd_plugins.eva.core import (
    ActivationStats,
    allocate_ranks,
    eva_matrix,
    principal_components,
    subspace_similarity,
)


def decaying_data(n: int, d: int, seed: int = 0, decay: float = 0.8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = decay ** np.arange(d)
    return rng.standard_normal((n, d)) * scales @ basis.T + rng.standard_normal(d) * 3.0  # non-zero mean


def numpy_pca(x: np.ndarray, k: int, center: bool):
    xc = x - x.mean(0) if center else x
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    return vt[:k], s[:k], (s**2 / (s**2).sum())[:k]


@pytest.mark.parametrize("d", [24, 800])  # full eigh path and warm-started subspace-iteration path
@pytest.mark.parametrize("center", [True, False])
def test_principal_components_match_numpy_svd(d, center):
    x = decaying_data(2000, d, decay=0.8 if d < 100 else 0.9)
    stats = ActivationStats.zeros(d)
    for chunk in np.array_split(x, 7):  # streaming in uneven blocks changes nothing
        stats.add_(ActivationStats.of(torch.from_numpy(chunk), torch.float64))
    k = 6
    comps = principal_components(stats, k, center=center, tol=1e-13)
    vt, s, ratio = numpy_pca(x, k, center)
    cos = np.abs(np.sum(comps.vectors.numpy() * vt, axis=1))
    assert cos.min() > 1 - 1e-8
    np.testing.assert_allclose(comps.singular_values.numpy(), s, rtol=1e-8)
    np.testing.assert_allclose(comps.explained_variance_ratio.numpy(), ratio, rtol=1e-8)
    np.testing.assert_allclose(comps.vectors.numpy() @ comps.vectors.numpy().T, np.eye(k), atol=1e-10)


def test_allocate_ranks_matches_brute_force_threshold():
    rng = np.random.default_rng(3)
    ratios = {f"m{i}": torch.from_numpy(np.sort(rng.random(8))[::-1].copy()) for i in range(6)}
    budget = 4 * 6
    ranks = allocate_ranks(ratios, budget)
    everything = np.sort(np.concatenate([v.numpy() for v in ratios.values()]))[::-1]
    threshold = everything[budget - 1]
    expected = {k: int((v.numpy() >= threshold).sum()) for k, v in ratios.items()}
    assert ranks == expected
    assert sum(ranks.values()) == budget


def test_allocate_ranks_gives_zero_to_modules_without_variance():
    ranks = allocate_ranks({"a": torch.tensor([0.5, 0.4, 0.3]), "b": torch.tensor([0.01, 0.0, 0.0])}, budget=3)
    assert ranks == {"a": 3, "b": 0}


def test_subspace_similarity_matches_scipy_principal_angles():
    from scipy.linalg import subspace_angles

    rng = np.random.default_rng(4)
    a = np.linalg.qr(rng.standard_normal((30, 6)))[0].T
    b = np.linalg.qr(a[:4].T + 0.2 * rng.standard_normal((30, 4)))[0].T
    b = np.vstack([b, np.linalg.qr(rng.standard_normal((30, 2)))[0].T])
    for n in (1, 3, 4):
        expected = np.cos(subspace_angles(a[:n].T, b[:n].T)).min()
        assert subspace_similarity(torch.from_numpy(a), torch.from_numpy(b), n) == pytest.approx(expected, abs=1e-10)
    rotated = torch.from_numpy(np.linalg.qr(rng.standard_normal((4, 4)))[0] @ a[:4])
    assert subspace_similarity(torch.from_numpy(a), rotated, 4) == pytest.approx(1.0, abs=1e-12)
    assert subspace_similarity(torch.from_numpy(a), rotated, 0) == 1.0


def test_eva_matrix_zero_pads_and_whitens():
    x = torch.from_numpy(decaying_data(500, 12))
    comps = principal_components(ActivationStats.of(x), 5)
    a = eva_matrix(comps, rank=3, width=5)
    assert torch.equal(a[3:], torch.zeros(2, 12, dtype=a.dtype))
    white = eva_matrix(comps, rank=3, width=3, whiten=True)
    expected = comps.vectors[:3] / comps.singular_values[:3].sqrt()[:, None]
    assert torch.allclose(white, expected)
    with pytest.raises(ValueError, match="exceeds"):
        eva_matrix(comps, rank=6, width=6)
