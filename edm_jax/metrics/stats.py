"""Feature statistics and the distances built on them: FID / FD-DINOv2, KID, Inception Score.

All host-side NumPy in float64. ``FeatureStats`` streams ``sum x`` and ``sum x x^T`` so the
features of 50,000 images never sit in memory at once (as NVlabs/edm ``fid.py`` and edm2
``calculate_stats_for_iterable``); ``mu = sum/N`` and ``sigma = (X^T X - N mu mu^T)/(N-1)``.
``frechet_distance`` is edm2's ``calculate_metrics_from_stats``; ``kid`` is k-diffusion's
``evaluation.kid``; ``kid_subsets`` is the StyleGAN2-ADA / torch-fidelity random-subset form;
``InceptionScore`` streams StyleGAN2-ADA's split-wise Inception Score.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import scipy.special

__all__ = [
    "FeatureStats", "InceptionScore", "frechet_distance", "kid", "kid_subsets",
    "polynomial_kernel", "squared_mmd",
]  # fmt: skip


class FeatureStats:
    """Running float64 ``sum x`` [D], ``sum x x^T`` [D, D] and count of features [B, D]."""

    def __init__(self, dim: int):
        self.dim, self.n = int(dim), 0
        self.sum = np.zeros([self.dim], np.float64)
        self.sum_xxt = np.zeros([self.dim, self.dim], np.float64)

    def update(self, features) -> None:
        """Add a batch of features [B, D]."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got shape {x.shape}")
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sum_xxt += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's sums (other hosts, other chunks) into this one."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge features of size {other.dim} into {self.dim}")
        self.n += other.n
        self.sum += other.sum
        self.sum_xxt += other.sum_xxt
        return self

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) with the unbiased N-1 covariance; needs N >= 2."""
        if self.n < 2:
            raise ValueError(f"need at least 2 images for a covariance (N-1), got N={self.n}")
        mu = self.sum / self.n
        sigma = (self.sum_xxt - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1-mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2))``, scipy sqrtm (disp=False), real part."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("statistics hold NaN or inf (non-finite features); valid: finite values")
    m = np.square(mu1 - mu2).sum()
    s = _sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy.linalg.sqrtm(a, disp=False)[0] as edm/edm2 call it (plain sqrtm once disp is gone)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return scipy.linalg.sqrtm(a, disp=False)[0]
        except TypeError:  # SciPy >= 1.18 dropped disp; sqrtm returns the matrix alone
            return scipy.linalg.sqrtm(a)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's cubic kernel ``k(x, y) = (x.y / d + 1)^3`` [Nx, Ny]."""
    d = x.shape[-1]
    return (x @ y.T / d + 1) ** 3


def squared_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between feature sets x [m, D] and y [n, D] (k-diffusion squared_mmd)."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 features on each side, got {m} and {n}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    kxx_sum = kxx.sum() - np.trace(kxx)
    kyy_sum = kyy.sum() - np.trace(kyy)
    return float(kxx_sum / m / (m - 1) + kyy_sum / n / (n - 1) - kxy.sum() * 2 / m / n)


def kid(x, y, max_size: int = 5000) -> float:
    """k-diffusion ``kid``: mean unbiased MMD^2 over contiguous partitions of at most max_size.

    Partition i is ``x[round(i*Nx/P) : round((i+1)*Nx/P)]`` with Python's round (half to
    even) and ``P = ceil(max(Nx/max_size, Ny/max_size))``.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs features [N, D] of one size D, got {x.shape} and {y.shape}")
    nx, ny = x.shape[0], y.shape[0]
    parts = math.ceil(max(nx / max_size, ny / max_size))
    total = 0.0
    for i in range(parts):
        cur_x = x[round(i * nx / parts) : round((i + 1) * nx / parts)]
        cur_y = y[round(i * ny / parts) : round((i + 1) * ny / parts)]
        total += squared_mmd(cur_x, cur_y)
    return total / parts


def kid_subsets(
    x, y, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float, np.ndarray]:
    """Random-subset KID: (mean, std (ddof=0), values [S]) of MMD^2 over S subset pairs.

    Indices come from ``numpy.random.default_rng(seed + 1).choice(N, m, replace=False)``:
    all S subsets of x first, then all of y; m is clipped to the smaller set.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = min(subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed + 1)
    idx_x = [rng.choice(x.shape[0], m, replace=False) for _ in range(num_subsets)]
    idx_y = [rng.choice(y.shape[0], m, replace=False) for _ in range(num_subsets)]
    values = np.array([squared_mmd(x[a], y[b]) for a, b in zip(idx_x, idx_y, strict=True)])
    return float(values.mean()), float(values.std()), values


class InceptionScore:
    """StyleGAN2-ADA's Inception Score over ``num_splits`` contiguous splits, streamed.

    Split s holds images ``[s*N//S, (s+1)*N//S)``; its score is ``exp(mean_i KL(p_i || m))``
    with ``m`` the split's mean class distribution, and ``KL = sum p log p - sum m log m``
    summed per split, so only [S] + [S, K] sums are kept.
    """

    def __init__(self, num_images: int, num_splits: int = 10):
        if num_images < num_splits:
            raise ValueError(f"Inception Score needs >= {num_splits} images, got {num_images}")
        self.bounds = [s * num_images // num_splits for s in range(num_splits + 1)]
        self.num_images, self.num_splits = num_images, num_splits
        self.plogp = np.zeros([num_splits], np.float64)
        self.sum_p: np.ndarray | None = None  # [S, K]

    def update(self, logits, start: int) -> None:
        """Add the logits [B, K] of images start .. start+B-1 (global image indices)."""
        z = np.asarray(logits, np.float64)
        logp = z - scipy.special.logsumexp(z, axis=1, keepdims=True)  # log softmax
        p = np.exp(logp)
        if self.sum_p is None:
            self.sum_p = np.zeros([self.num_splits, z.shape[1]], np.float64)
        for s in range(self.num_splits):
            lo = max(self.bounds[s] - start, 0)
            hi = min(self.bounds[s + 1] - start, len(z))
            if hi > lo:
                self.plogp[s] += (p[lo:hi] * logp[lo:hi]).sum()
                self.sum_p[s] += p[lo:hi].sum(0)

    def merge(self, other: InceptionScore) -> InceptionScore:
        """Add another accumulator's sums (other hosts) into this one."""
        self.plogp += other.plogp
        if other.sum_p is not None:
            self.sum_p = other.sum_p.copy() if self.sum_p is None else self.sum_p + other.sum_p
        return self

    def score(self) -> tuple[float, float]:
        """(mean, std) of the per-split scores (numpy std, ddof=0)."""
        if self.sum_p is None:
            raise ValueError("no logits were added to the Inception Score")
        sizes = np.diff(self.bounds).astype(np.float64)  # [S]
        mean_p = self.sum_p / sizes[:, None]  # [S, K]
        cross = np.where(mean_p > 0, mean_p * np.log(np.where(mean_p > 0, mean_p, 1)), 0.0)
        scores = np.exp(self.plogp / sizes - cross.sum(1))
        return float(scores.mean()), float(scores.std())
