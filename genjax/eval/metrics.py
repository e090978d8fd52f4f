"""Image and video metrics: PSNR, SSIM (Wang et al. 2004) and the Frechet distance (Heusel et al. 2017).

Inputs are channels-last pixel arrays, images `(N, H, W, C)` or videos `(N, T, H, W, C)`, either
uint8 in [0, 255] or float in [-1, 1] (the project's two pixel conventions); `data_range` is the
span of the pixel values (255 for uint8, 2.0 for [-1, 1]; that is also the default for each
dtype). PSNR and SSIM return one value per example, float64 `(N,)`; take `.mean()` for the set.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from genjax.errors import check


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    check(a.shape == b.shape, "shapes", (a.shape, b.shape), "the two arrays must have the same shape")
    check(a.ndim in (4, 5), "shape", a.shape, "must be images (N, H, W, C) or videos (N, T, H, W, C)")
    for name, x in (("a", a), ("b", b)):
        check(x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating), f"{name}.dtype",
              str(x.dtype), "must be uint8 in [0, 255] or float in [-1, 1]")
    return a, b


def _data_range(a: np.ndarray, data_range: float | None) -> float:
    if data_range is None:
        return 255.0 if a.dtype == np.uint8 else 2.0
    check(float(data_range) > 0, "data_range", data_range, "must be > 0")
    return float(data_range)


def psnr(a, b, *, data_range: float | None = None) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per example: `10 log10(data_range^2 / MSE)`.

    The MSE of example i is the mean over all its pixels (all frames of a video), in float64; it
    equals `skimage.metrics.peak_signal_noise_ratio(a[i], b[i], data_range=data_range)`.
    Identical examples give `inf`.

    Args:
      a, b: uint8 in [0, 255] or float in [-1, 1], same shape `(N, H, W, C)` or `(N, T, H, W, C)`.
      data_range: span of the pixel values; default 255 for uint8, 2.0 for floats.

    Returns:
      float64 `(N,)`.

    Raises:
      UserError: different shapes, a rank other than 4 or 5, another dtype, data_range <= 0.
    """
    a, b = _pair(a, b)
    data_range = _data_range(a, data_range)
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.mean(np.square(diff).reshape(len(a), -1), axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def _gaussian_kernel(sigma: float, truncate: float = 3.5) -> np.ndarray:
    """1D Gaussian of radius `int(truncate * sigma + 0.5)`, normalised to sum 1 (as
    `scipy.ndimage.gaussian_filter`; sigma 1.5 gives the 11-tap window of Wang et al.)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


@functools.partial(jax.jit, static_argnames=("kernel", "c1", "c2", "cov_norm"))
def _ssim_maps_mean(x, y, *, kernel: tuple[float, ...], c1: float, c2: float, cov_norm: float):
    """x, y float32 (M, H, W, 1) -> mean SSIM per image (M,), 'valid' filtering only."""
    k = jnp.asarray(kernel, jnp.float32)
    stack = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)  # (M, H, W, 5)
    dn = ("NHWC", "HWIO", "NHWC")
    kh = jnp.tile(k[:, None, None, None], (1, 1, 1, 5))
    kw = jnp.tile(k[None, :, None, None], (1, 1, 1, 5))
    f = jax.lax.conv_general_dilated(stack, kh, (1, 1), "VALID", dimension_numbers=dn,
                                     feature_group_count=5, precision="highest")
    f = jax.lax.conv_general_dilated(f, kw, (1, 1), "VALID", dimension_numbers=dn,
                                     feature_group_count=5, precision="highest")
    ux, uy, uxx, uyy, uxy = (f[..., i] for i in range(5))
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2))


def ssim(a, b, *, data_range: float | None = None, gaussian_weights: bool = True,
         win_size: int | None = None, batch_size: int = 1024) -> np.ndarray:
    """Structural similarity per example (Wang, Bovik, Sheikh & Simoncelli 2004, eq. 13).

    SSIM map = `((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 +
    sigma_y^2 + C2))` with `C1 = (0.01 L)^2`, `C2 = (0.03 L)^2`, L = data_range. Local statistics
    use, by default, the paper's 11 x 11 Gaussian window with sigma 1.5 (population covariance);
    `gaussian_weights=False` uses a uniform `win_size` window (default 7) with the sample
    covariance. The map is kept only where the window fits inside the image ('valid', as the
    paper's reference MATLAB code) and averaged; then the mean is taken over channels and, for
    videos, over frames. This equals `skimage.metrics.structural_similarity(a[i], b[i],
    data_range=L, channel_axis=-1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)` (Gaussian) or its defaults (uniform), frame by frame.
    Float inputs in [-1, 1] are shifted to [0, 2] first (the luminance term assumes
    non-negative intensities), so a [-1, 1] array and its uint8 version get the same SSIM; for
    floats this equals skimage on `a + 1, b + 1`.

    Args:
      a, b: uint8 in [0, 255] or float in [-1, 1], same shape `(N, H, W, C)` or
        `(N, T, H, W, C)`, with H and W at least the window size (11 or win_size).
      data_range: span of the pixel values; default 255 for uint8, 2.0 for floats.
      gaussian_weights: the Gaussian window (True) or a uniform one (False).
      win_size: odd size of the uniform window (default 7); only with gaussian_weights=False.
      batch_size: frames per compiled call (memory bound only; no effect on the values).

    Returns:
      float64 `(N,)` in [-1, 1]; 1 for identical examples.

    Raises:
      UserError: different shapes, rank not 4 or 5, another dtype, data_range <= 0, a bad
        win_size, images smaller than the window.
    """
    a, b = _pair(a, b)
    data_range = _data_range(a, data_range)
    if gaussian_weights:
        check(win_size is None, "win_size", win_size, "is set by sigma=1.5 (11) with gaussian_weights")
        kernel, cov_norm = _gaussian_kernel(1.5), 1.0
    else:
        win_size = 7 if win_size is None else win_size
        check(isinstance(win_size, int) and win_size >= 3 and win_size % 2 == 1, "win_size",
              win_size, "must be an odd int >= 3")
        kernel, cov_norm = np.full(win_size, 1.0 / win_size), win_size**2 / (win_size**2 - 1.0)
    h, w, c = a.shape[-3:]
    check(min(h, w) >= len(kernel), "shape", a.shape, f"H and W must be >= the window size {len(kernel)}")
    n = len(a)
    low = 0.0 if a.dtype == np.uint8 else -1.0

    # One gray image per (example, frame, channel), scaled by L so float32 keeps precision.
    def images(x):
        x = np.moveaxis(x.reshape(-1, h, w, c), -1, 1).reshape(-1, h, w, 1)
        return ((x.astype(np.float64) - low) / data_range).astype(np.float32)
    x, y = images(a), images(b)
    out = np.concatenate([np.asarray(_ssim_maps_mean(
        x[i:i + batch_size], y[i:i + batch_size], kernel=tuple(float(k) for k in kernel),
        c1=0.01**2, c2=0.03**2, cov_norm=float(cov_norm))) for i in range(0, len(x), batch_size)])
    return out.astype(np.float64).reshape(n, -1).mean(axis=1)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set: float64 `mu (D,)` and `sigma (D, D)`.

    `sigma` is the unbiased sample covariance (`np.cov(features, rowvar=False)`, as pytorch-fid).

    Args:
      features: float `(N, D)`, N >= 2.

    Raises:
      UserError: not 2-D, or fewer than 2 rows, or non-finite values.
    """
    f = np.asarray(features, np.float64)
    check(f.ndim == 2 and f.shape[0] >= 2, "features.shape", f.shape, "must be (N, D) with N >= 2")
    check(bool(np.isfinite(f).all()), "features", "non-finite", "must be finite")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    `d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))` (Dowson & Landau
    1982; the FID of Heusel et al. 2017, eq. 6). Computed as pytorch-fid's
    `calculate_frechet_distance`: `scipy.linalg.sqrtm` of `sigma1 @ sigma2`; if that is not
    finite (near-singular product), `eps * I` is added to both covariances; a complex result whose
    diagonal has imaginary parts up to 1e-3 (numerical noise) keeps its real part.

    Args:
      mu1, mu2: float `(D,)` means. sigma1, sigma2: float `(D, D)` covariances (symmetric PSD).
      eps: diagonal offset used only when the product's square root is not finite.

    Returns:
      float >= 0 (up to rounding), in squared feature units.

    Raises:
      UserError: mismatched shapes.
      ValueError: the square root has a large imaginary component (covariances not PSD).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    for name, x, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)),
                           ("sigma2", sigma2, (d, d))):
        check(x.shape == shape, f"{name}.shape", x.shape, f"must be {shape} (D={d} from mu1)")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is expected (N <= D); handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))} "
                             "in sqrtm(sigma1 @ sigma2); are the covariances PSD?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
