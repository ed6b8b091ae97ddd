"""Image-set metrics on feature vectors: Fréchet and kernel distances, precision / recall, accuracy.

Everything runs in float64 numpy (no scipy / sklearn). Features come from any extractor: the
project's own emoji classifier (``scan_core.evaluation.classifier``) or a TorchScript Inception
(``scan_core.evaluation.inception``). Shapes: a feature set is (n, d); labels are (n,).
"""

from __future__ import annotations

import numpy as np

__all__ = ["class_accuracy", "frechet_distance", "kernel_distance", "precision_recall"]

# Rows of the distance matrix computed at once: 1024 x 10k float64 is 80 MiB, so a 10k x 10k
# comparison never holds the full 800 MiB matrix.
_CHUNK_ROWS = 1024


def _as_features(features, name: str) -> np.ndarray:
    """A (n, d) float64 array from a numpy array, a list or a (CPU or GPU) torch tensor."""
    if hasattr(features, "detach"):  # torch tensor, without importing torch here
        features = features.detach().cpu().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a (n, d) feature array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _check_pair(a: np.ndarray, b: np.ndarray, min_samples: int) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]} (same extractor for both?)"
        )
    for name, array in (("first", a), ("second", b)):
        if array.shape[0] < min_samples:
            raise ValueError(
                f"the {name} feature set has {array.shape[0]} samples; at least {min_samples} "
                "are needed"
            )


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via eigh (negatives -> 0)."""
    values, vectors = np.linalg.eigh(matrix)
    roots = np.sqrt(np.clip(values, 0.0, None))
    return (vectors * roots) @ vectors.T


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID on Inception features).

    FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b)).
    S_a S_b is not symmetric, so tr(sqrt(S_a S_b)) is computed as the sum of the square roots of
    the eigenvalues of sqrt(S_a) S_b sqrt(S_a), which has the same eigenvalues and is symmetric
    PSD: eigh is then stable, and rounding noise (tiny negative eigenvalues) is clamped to 0.

    Args:
        feats_a, feats_b: (n_a, d) and (n_b, d) features, n >= 2 each.
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    _check_pair(a, b, min_samples=2)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])  # (d, d), also for d = 1
    cov_b = np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1])
    root_a = _symmetric_sqrt(cov_a)
    product = root_a @ cov_b @ root_a
    product = (product + product.T) / 2  # exact symmetry for eigvalsh
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(product), 0.0, None)).sum()
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    return float(max(distance, 0.0))  # >= 0 in exact arithmetic


def kernel_distance(
    feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> float:
    """Kernel distance (KID on Inception features; Binkowski et al., 2018): the unbiased MMD^2
    with the cubic kernel k(x, y) = (x . y / d + 1)^3, averaged over random subsets.

    Unlike FD it has an unbiased estimator, so small sample sets do not inflate it, and it can
    come out slightly negative when the sets match. Each subset draws ``min(subset_size, n_a,
    n_b)`` rows from each set without replacement (the usual 100 subsets of 1,000).
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    _check_pair(a, b, min_samples=2)
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    dim = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        k_xx, k_yy = (x @ x.T / dim + 1) ** 3, (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        off_diagonal = size * (size - 1)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / off_diagonal
        values.append(within - 2 * k_xy.mean())
    return float(np.mean(values))


def _squared_distances(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """(r, c) squared Euclidean distances, clamped at 0 against cancellation."""
    squared = (
        (rows**2).sum(axis=1)[:, None] + (columns**2).sum(axis=1)[None, :] - 2 * rows @ columns.T
    )
    return np.maximum(squared, 0.0)


def _knn_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in the same set.

    The point itself sits at distance 0 in its own row, so the k-th neighbour is the (k+1)-th
    smallest entry (index k after partitioning).
    """
    radii = np.empty(len(points))
    for start in range(0, len(points), _CHUNK_ROWS):
        block = _squared_distances(points[start : start + _CHUNK_ROWS], points)
        radii[start : start + len(block)] = np.partition(block, k, axis=1)[:, k]
    return radii


def _inside_manifold(queries: np.ndarray, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(q,) bool: whether each query lies within the k-NN ball of at least one point."""
    inside = np.empty(len(queries), dtype=bool)
    for start in range(0, len(queries), _CHUNK_ROWS):
        block = _squared_distances(queries[start : start + _CHUNK_ROWS], points)
        inside[start : start + len(block)] = (block <= radii[None, :]).any(axis=1)
    return inside


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Each set's manifold is the union of balls around its samples, each ball reaching the
    sample's k-th nearest neighbour in its own set. Precision is the share of fake samples inside
    the real manifold (are generated images realistic?); recall is the share of real samples
    inside the fake manifold (are all real modes covered?).

    Args:
        real, fake: (n_real, d) and (n_fake, d) features; each set needs more than k samples.
        k: neighbourhood size (the paper uses 3).

    Returns:
        (precision, recall), each in [0, 1].
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    real_array = _as_features(real, "real")
    fake_array = _as_features(fake, "fake")
    _check_pair(real_array, fake_array, min_samples=k + 1)
    real_radii = _knn_radii(real_array, k)
    fake_radii = _knn_radii(fake_array, k)
    precision = _inside_manifold(fake_array, real_array, real_radii).mean()
    recall = _inside_manifold(real_array, fake_array, fake_radii).mean()
    return float(precision), float(recall)


def class_accuracy(predicted, labels) -> float:
    """Share of positions where ``predicted`` equals ``labels`` (both (n,) class indices)."""
    predicted = np.asarray(predicted.cpu() if hasattr(predicted, "cpu") else predicted)
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if predicted.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"predicted and labels must be 1-D, got shapes {predicted.shape} and {labels.shape}"
        )
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("class_accuracy needs at least one label")
    return float((predicted == labels).mean())
