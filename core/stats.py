"""Frechet distance between Gaussians fitted to feature sets (FID's formula), shared by the run-end tuning of
sampling settings (maskgit.tune) and the bench judges."""

import numpy as np


def gaussian(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are observations) in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Frechet distance of two Gaussians (mean, covariance): ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    S_a S_b is similar to the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), so the trace of its square root is the
    sum of the square roots of that matrix's eigenvalues: two `eigh` calls, exact, and much faster than a general
    matrix square root (scipy.linalg.sqrtm), which the tests compare against."""
    (mu_a, s_a), (mu_b, s_b) = a, b
    lam, vec = np.linalg.eigh(s_a)
    root_a = (vec * np.sqrt(lam.clip(min=0))) @ vec.T  # S_a^(1/2)
    middle = root_a @ s_b @ root_a
    tr_covmean = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean
    return max(0.0, float(fd))  # >= 0 in exact arithmetic; rounding can leave -1e-13 for identical inputs


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (n, d) (FID's formula)."""
    return frechet(gaussian(feats_a), gaussian(feats_b))
