"""FedSVD core numerics against an independent reference: float64 numpy full SVD of ``B @ A``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_svd_plugins.fedsvd.core import aggregate_weighted, refactorize

# (d_out, r, d_in): ordinary, r > d_out, r > d_in, r > both, r == min, vectors, scalars
SHAPES = [(16, 4, 24), (24, 4, 16), (3, 4, 24), (16, 6, 2), (2, 5, 3), (8, 8, 8), (1, 3, 7), (7, 3, 1), (1, 1, 1)]


def _numpy_reference(b: torch.Tensor, a: torch.Tensor):
    m = b.double().numpy() @ a.double().numpy()
    u, s, vt = np.linalg.svd(m, full_matrices=True)
    return m, u, s, vt


def _check_against_numpy(b, a, nb, na, s, atol):
    d_out, r = b.shape
    d_in = a.shape[1]
    k = min(d_out, d_in, r)
    m, u, s_ref, vt = _numpy_reference(b, a)
    nb64, na64 = nb.double().numpy(), na.double().numpy()
    # the product is unchanged
    np.testing.assert_allclose(nb64 @ na64, m, atol=atol, rtol=0)
    # singular values are the product's
    np.testing.assert_allclose(s.double().numpy(), s_ref[:k], atol=atol, rtol=0)
    # rows of A' are orthonormal (the first min(r, d_in)); rows beyond d_in are zero
    n_orth = min(r, d_in)
    np.testing.assert_allclose(na64[:n_orth] @ na64[:n_orth].T, np.eye(n_orth), atol=atol, rtol=0)
    np.testing.assert_allclose(na64[n_orth:], 0.0, atol=0)
    # B' columns beyond the product's rank are zero; the first k are U S (and A' rows are V^T) up to a sign
    np.testing.assert_allclose(nb64[:, k:], 0.0, atol=0)
    for j in range(k):
        sign = np.sign(na64[j] @ vt[j])
        assert abs(sign) == 1
        np.testing.assert_allclose(na64[j], sign * vt[j], atol=atol * 10, rtol=0)
        np.testing.assert_allclose(nb64[:, j], sign * u[:, j] * s_ref[j], atol=atol * 10, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(nb64[:, :k], axis=0), s_ref[:k], atol=atol, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_refactorize_matches_numpy_svd_float64(shape):
    d_out, r, d_in = shape
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    b = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    nb, na, s = refactorize(b, a, return_singular_values=True)
    assert nb.shape == b.shape and na.shape == a.shape and nb.dtype == na.dtype == torch.float64
    _check_against_numpy(b, a, nb, na, s, atol=1e-10)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 5e-2)])
def test_refactorize_keeps_dtype_and_is_accurate(dtype, atol):
    g = torch.Generator().manual_seed(1)
    b = (torch.randn(12, 4, generator=g) * 0.5).to(dtype)
    a = (torch.randn(4, 20, generator=g) / 20**0.5).to(dtype)
    nb, na, s = refactorize(b, a, return_singular_values=True)
    assert nb.dtype == dtype and na.dtype == dtype and s.dtype == torch.float32
    m = b.double() @ a.double()
    assert (nb.double() @ na.double() - m).abs().max() < atol * max(1.0, float(m.abs().max()))
    assert (na.double() @ na.double().T - torch.eye(4, dtype=torch.float64)).abs().max() < atol * 4


def test_refactorize_rank_deficient_product():
    g = torch.Generator().manual_seed(2)
    # B of rank 1 with r = 4: the product has rank 1, A' must still have 4 orthonormal rows, B' one non-zero column
    b = torch.randn(10, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 4, generator=g, dtype=torch.float64)
    a = torch.randn(4, 9, generator=g, dtype=torch.float64)
    nb, na, s = refactorize(b, a, return_singular_values=True)
    np.testing.assert_allclose((nb @ na).numpy(), (b @ a).numpy(), atol=1e-12)
    np.testing.assert_allclose((na @ na.T).numpy(), np.eye(4), atol=1e-12)
    np.testing.assert_allclose(nb[:, 1:].numpy(), 0.0, atol=1e-12)
    _, s_ref, _ = np.linalg.svd((b @ a).numpy())
    np.testing.assert_allclose(s.numpy(), s_ref[:4], atol=1e-12)


def test_refactorize_zero_b_keeps_a():
    a = torch.randn(4, 9)
    b = torch.zeros(6, 4)
    nb, na, s = refactorize(b, a, return_singular_values=True)
    assert torch.equal(na, a) and torch.equal(nb, b) and torch.equal(s, torch.zeros(4))


def test_refactorize_batched_equals_per_pair_and_handles_zero_member():
    g = torch.Generator().manual_seed(3)
    bs = torch.randn(5, 8, 3, generator=g, dtype=torch.float64)
    bs[2] = 0
    as_ = torch.randn(5, 3, 11, generator=g, dtype=torch.float64)
    nb, na, s = refactorize(bs, as_, return_singular_values=True)
    assert nb.shape == bs.shape and na.shape == as_.shape and s.shape == (5, 3)
    for i in range(5):
        pb, pa, ps = refactorize(bs[i], as_[i], return_singular_values=True)
        torch.testing.assert_close(nb[i], pb, atol=1e-12, rtol=0)
        torch.testing.assert_close(na[i], pa, atol=1e-12, rtol=0)
        torch.testing.assert_close(s[i], ps, atol=1e-12, rtol=0)
        if i != 2:
            _check_against_numpy(bs[i], as_[i], nb[i], na[i], s[i], atol=1e-10)
    assert torch.equal(na[2], as_[2])


def test_refactorize_list_of_mixed_shapes():
    g = torch.Generator().manual_seed(4)
    shapes = [(16, 4, 24), (16, 4, 24), (3, 4, 24), (16, 2, 8), (16, 4, 24)]
    bs = [torch.randn(o, r, generator=g, dtype=torch.float64) for o, r, _ in shapes]
    as_ = [torch.randn(r, i, generator=g, dtype=torch.float64) for _, r, i in shapes]
    nb, na, s = refactorize(bs, as_, return_singular_values=True)
    assert isinstance(nb, list) and len(nb) == len(shapes)
    for b, a, x, y, z in zip(bs, as_, nb, na, s, strict=True):
        _check_against_numpy(b, a, x, y, z, atol=1e-10)
    nb2, na2 = refactorize(tuple(bs), tuple(as_))
    assert all(torch.equal(x, y) for x, y in zip(nb, nb2, strict=True))


def test_refactorize_is_idempotent():
    g = torch.Generator().manual_seed(5)
    b = torch.randn(12, 4, generator=g, dtype=torch.float64)
    a = torch.randn(4, 10, generator=g, dtype=torch.float64)
    b1, a1 = refactorize(b, a)
    b2, a2 = refactorize(b1, a1)
    # already in SVD form: the same factors up to the sign of each component
    signs = torch.sign((a1 * a2).sum(1))
    torch.testing.assert_close(a2, a1 * signs[:, None], atol=1e-10, rtol=0)
    torch.testing.assert_close(b2, b1 * signs[None, :], atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "b,a,exc,match",
    [
        (torch.randn(4, 3), torch.randn(2, 5), ValueError, "rank mismatch"),
        (torch.randn(4), torch.randn(4, 5), ValueError, "B must be"),
        (torch.full((4, 2), float("nan")), torch.randn(2, 5), ValueError, "NaN"),
        (torch.randn(4, 2), torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, "NaN or Inf"),
        (torch.ones(4, 2, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), TypeError, "floating"),
        (torch.randn(2, 4, 2), torch.randn(3, 2, 5), ValueError, "batch shapes"),
        ([torch.randn(4, 2)], [torch.randn(2, 3), torch.randn(2, 3)], ValueError, "one B per A"),
        (torch.randn(4, 2), [torch.randn(2, 3)], TypeError, "both"),
    ],
)
def test_refactorize_bad_input(b, a, exc, match):
    with pytest.raises(exc, match=match):
        refactorize(b, a)


def test_aggregate_weighted_matches_numpy():
    g = torch.Generator().manual_seed(6)
    ts = [torch.randn(5, 3, generator=g) for _ in range(4)]
    w = [10, 0, 3, 7]
    ref = sum(wi * t.double().numpy() for wi, t in zip(w, ts, strict=True)) / sum(w)
    out = aggregate_weighted(ts, w)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(aggregate_weighted(ts, torch.tensor(w)).numpy(), out.numpy())
    # a single client returns its own tensor exactly
    assert torch.equal(aggregate_weighted([ts[0]], [5]), ts[0])


@pytest.mark.parametrize(
    "ts,w,match",
    [
        ([], [], "empty"),
        ([torch.ones(2)], [1, 2], "one weight per tensor"),
        ([torch.ones(2), torch.ones(2)], [1, -1], ">= 0"),
        ([torch.ones(2), torch.ones(2)], [0, 0], "positive"),
        ([torch.ones(2), torch.ones(3)], [1, 1], "same shape"),
        ([torch.ones(2), torch.tensor([1.0, float("nan")])], [1, 1], "NaN"),
    ],
)
def test_aggregate_weighted_bad_input(ts, w, match):
    with pytest.raises(ValueError, match=match):
        aggregate_weighted(ts, w)
