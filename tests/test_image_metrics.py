"""Fréchet distance, improved precision / recall and class accuracy (Inception: test_inception)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scan_core.evaluation import image_metrics
from scan_core.evaluation.image_metrics import (
    class_accuracy,
    frechet_distance,
    kernel_distance,
    precision_recall,
)


def gaussian(n: int, mean, std, seed: int) -> np.ndarray:
    """(n, d) samples with diagonal covariance; whitened so their moments are exactly as asked."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, len(mean)))
    noise = (noise - noise.mean(0)) / noise.std(0, ddof=1)
    return np.asarray(mean) + noise * np.asarray(std)


def test_fd_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((500, 16)) @ np.diag(np.arange(1, 17.0))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_fd_matches_the_closed_form_for_diagonal_gaussians():
    # Whitened samples give exact sample moments; columns are not exactly decorrelated, so the
    # sample covariances are close to (not equal to) diagonal: compare with a tolerance.
    mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    a = gaussian(20000, mean_a, np.sqrt(var_a), seed=1)
    b = gaussian(20000, mean_b, np.sqrt(var_b), seed=2)
    expected = ((mean_a - mean_b) ** 2).sum() + (var_a + var_b - 2 * np.sqrt(var_a * var_b)).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_fd_is_symmetric_and_grows_with_a_mean_shift():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((400, 8))
    b = rng.standard_normal((300, 8)) * 1.5
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    shifts = [frechet_distance(a, a + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts)
    assert shifts[-1] == pytest.approx(8 * 2.0**2, rel=1e-6)  # a pure shift adds ||delta||^2


def test_fd_accepts_torch_tensors_and_rank_deficient_covariances():
    # 5 samples in 32 dimensions: singular covariances must not produce NaN.
    a = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    value = frechet_distance(a, a.clone())
    assert np.isfinite(value) and value == pytest.approx(0.0, abs=1e-6)


def _mmd_by_loops(x, y):
    """The unbiased MMD^2 with the cubic kernel, written out pair by pair."""
    k = lambda u, v: (float(u @ v) / len(u) + 1) ** 3  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kernel_distance_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 5)), rng.normal(0.7, 1.3, size=(12, 5))
    # One subset as large as both sets uses every row: exactly the loop formula.
    assert kernel_distance(a, b, subsets=1) == pytest.approx(_mmd_by_loops(a, b), rel=1e-10)
    big = rng.normal(size=(400, 8))
    same = kernel_distance(big[:200], big[200:], subsets=20, subset_size=100)
    shifted = [kernel_distance(big[:200], big[200:] + s, subsets=20) for s in (0.5, 1.0)]
    assert abs(same) < 0.05 < shifted[0] < shifted[1]


def test_precision_recall_of_a_set_with_itself_is_one():
    feats = np.random.default_rng(4).standard_normal((300, 4))
    assert precision_recall(feats, feats, k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((200, 4))
    fake = rng.standard_normal((200, 4)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_half_the_modes_gives_full_precision_and_half_recall():
    # Low dimension and k = 5: k-NN balls of finite samples miss a few tail points of another
    # sample of the same mode, more so in high dimension, so precision is ~0.99, not exactly 1.
    rng = np.random.default_rng(6)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])  # four modes
    real = np.concatenate([c + rng.standard_normal((500, 2)) for c in centres])
    fake = np.concatenate([c + rng.standard_normal((500, 2)) for c in centres[:2]])
    precision, recall = precision_recall(real, fake, k=5)
    assert precision > 0.98
    assert recall == pytest.approx(0.5, abs=0.05)


def test_precision_recall_is_the_same_in_chunks(monkeypatch):
    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((130, 3)), rng.standard_normal((90, 3)) + 0.5
    whole = precision_recall(real, fake, k=5)
    monkeypatch.setattr(image_metrics, "_CHUNK_ROWS", 16)
    assert precision_recall(real, fake, k=5) == whole


def test_class_accuracy():
    assert class_accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert class_accuracy(torch.tensor([3, 3]), np.array([3, 3])) == 1.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: frechet_distance(np.zeros((4, 3)), np.zeros((4, 2))), "dimensions differ"),
        (lambda: frechet_distance(np.zeros((1, 3)), np.zeros((4, 3))), "at least 2"),
        (lambda: frechet_distance(np.zeros(3), np.zeros((4, 3))), r"\(n, d\)"),
        (lambda: frechet_distance(np.full((4, 3), np.nan), np.zeros((4, 3))), "NaN"),
        (lambda: precision_recall(np.zeros((3, 2)), np.zeros((9, 2)), k=3), "at least 4"),
        (lambda: precision_recall(np.zeros((9, 2)), np.zeros((9, 2)), k=0), "positive integer"),
        (lambda: class_accuracy([1, 2], [1]), "2 predictions but 1 labels"),
        (lambda: class_accuracy([], []), "at least one"),
        (lambda: class_accuracy([[1]], [[1]]), "1-D"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
