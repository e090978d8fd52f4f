"""PSNR / SSIM / Frechet distance against direct formulas, scipy.ndimage references and identities."""

import math

import numpy as np
import pytest
import scipy.linalg
from scipy import ndimage

from genjax.errors import UserError
from genjax.eval import metrics


def _noisy(rng, shape, amount):
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-amount, amount + 1, shape), 0, 255).astype(np.uint8)
    return a, b


def _to_float(x):
    return x.astype(np.float64) / 127.5 - 1.0


# ----------------------------------------------------------------------------- PSNR


def test_psnr_equals_direct_formula_and_is_dtype_consistent():
    rng = np.random.default_rng(0)
    a, b = _noisy(rng, (3, 2, 16, 12, 3), 30)
    expected = []
    for x, y in zip(a, b):
        sq = [(int(p) - int(q)) ** 2 for p, q in zip(x.ravel(), y.ravel())]
        expected.append(10 * math.log10(255**2 / (sum(sq) / len(sq))))
    np.testing.assert_allclose(metrics.psnr(a, b), expected, rtol=1e-12)
    # The same pixels in [-1, 1] with data_range 2 give the same PSNR.
    np.testing.assert_allclose(metrics.psnr(_to_float(a), _to_float(b)), expected, rtol=1e-9)
    assert np.all(np.isinf(metrics.psnr(a, a)))


# ----------------------------------------------------------------------------- SSIM


def _ssim_reference(x, y, *, gaussian, data_range=255.0):
    """Wang et al. (2004) on one 2D image pair, with scipy.ndimage filters, cropped to 'valid'."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    if gaussian:
        filt, cov_norm, pad = (lambda z: ndimage.gaussian_filter(z, 1.5, truncate=3.5)), 1.0, 5
    else:
        filt, cov_norm, pad = (lambda z: ndimage.uniform_filter(z, 7)), 49 / 48, 3
    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s[pad:-pad, pad:-pad].mean()


@pytest.mark.parametrize("gaussian", [True, False])
def test_ssim_matches_scipy_reference_on_videos(gaussian):
    rng = np.random.default_rng(1)
    a, b = _noisy(rng, (2, 3, 24, 20, 2), 40)
    expected = [np.mean([_ssim_reference(a[i, t, ..., c], b[i, t, ..., c], gaussian=gaussian)
                         for t in range(3) for c in range(2)]) for i in range(2)]
    got = metrics.ssim(a, b, gaussian_weights=gaussian)
    np.testing.assert_allclose(got, expected, atol=2e-6)
    # [-1, 1] floats are the same pixels: same SSIM.
    np.testing.assert_allclose(metrics.ssim(_to_float(a), _to_float(b), gaussian_weights=gaussian),
                               got, atol=2e-6)


def test_ssim_identities():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-6)
    y = np.clip(x.astype(int) + rng.integers(-50, 51, x.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(metrics.ssim(x, y), metrics.ssim(y, x), atol=1e-6)
    # Monotone in the noise level.
    noise = rng.normal(size=x.shape)
    scores = [metrics.ssim(x, np.clip(x + s * noise, 0, 255).astype(np.uint8)).mean()
              for s in (2, 10, 30, 80)]
    assert all(s1 > s2 for s1, s2 in zip(scores, scores[1:])), scores


def test_metric_user_errors():
    x = np.zeros((2, 16, 16, 1), np.uint8)
    with pytest.raises(UserError, match="shapes"):
        metrics.psnr(x, x[:1])
    with pytest.raises(UserError, match="dtype"):
        metrics.ssim(x.astype(np.int32), x.astype(np.int32))
    with pytest.raises(UserError, match="window size 11"):
        metrics.ssim(x[:, :8, :8], x[:, :8, :8])
    with pytest.raises(UserError, match="shape"):
        metrics.psnr(x[0], x[0])


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert abs(metrics.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1))) < 1e-10


def test_frechet_distance_full_covariance_matches_symmetric_form():
    # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2) = sum of sqrt of eigenvalues of a symmetric PSD matrix.
    rng = np.random.default_rng(4)
    d = 20
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    r1 = scipy.linalg.sqrtm(s1).real
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-8)


def test_frechet_distance_of_a_translated_feature_set_is_the_squared_shift():
    # Same covariance, means differ by c: d^2 = ||c||^2 exactly; also with singular
    # covariances (N < D), which pytorch-fid handles with the eps offset.
    rng = np.random.default_rng(5)
    for n, d in ((200, 8), (10, 30)):
        x = rng.normal(size=(n, d))
        shift = rng.normal(size=d)
        mu1, s1 = metrics.feature_statistics(x)
        mu2, s2 = metrics.feature_statistics(x + shift)
        assert s1.shape == (d, d)
        np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), shift @ shift,
                                   rtol=1e-4, atol=1e-4)


def test_frechet_distance_user_errors():
    with pytest.raises(UserError, match="sigma2.shape"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(UserError, match="features.shape"):
        metrics.feature_statistics(np.zeros((1, 4)))
