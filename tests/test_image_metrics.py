"""Fréchet distance, improved precision / recall, accuracy and the TorchScript Inception path.

The Inception tests use tiny fake TorchScript modules, never real weights.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from scan_core.evaluation import image_metrics
from scan_core.evaluation.image_metrics import class_accuracy, frechet_distance, precision_recall
from scan_core.evaluation.inception import INCEPTION_SIZE, inception_score, load_inception


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


# ------------------------------------------------------------------ TorchScript Inception path


class PoolAndLinear(nn.Module):
    """Stands in for Inception: records the input it sees, returns (features, logits)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Linear(3, 8)
        self.logits = nn.Linear(8, 5)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pooled = images.mean(dim=(2, 3)) / 255.0  # (N, 3)
        features = self.features(pooled)[:, :, None, None]  # (N, 8, 1, 1), like pool3
        return features, self.logits(features.flatten(1))


class FeaturesOnly(nn.Module):
    def forward(self, images: Tensor) -> Tensor:
        return torch.stack([images.amin(dim=(1, 2, 3)), images.amax(dim=(1, 2, 3))], dim=1)


class StyleGanLike(nn.Module):
    """The StyleGAN / clean-fid interface: a return_features flag, probabilities otherwise."""

    def forward(self, images: Tensor, return_features: bool = False) -> Tensor:
        pooled = images.mean(dim=(2, 3))  # (N, 3)
        if return_features:
            return pooled
        return torch.softmax(pooled, dim=1)


def save_script(module: nn.Module, path) -> str:
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript itself
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


def random_images(count: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_features_and_logits_from_a_tuple_module(tmp_path):
    torch.manual_seed(0)
    extractor = load_inception(save_script(PoolAndLinear(), tmp_path / "fake.pt"), batch_size=7)
    images = random_images(20, seed=1)
    features, logits = extractor(images)
    assert features.shape == (20, 8) and features.dtype == np.float64
    assert logits.shape == (20, 5)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)
    again, _ = extractor(images[:3])  # batching does not change results
    np.testing.assert_allclose(again, features[:3], atol=1e-6)


def test_input_is_resized_to_299_in_0_255(tmp_path):
    extractor = load_inception(save_script(FeaturesOnly(), tmp_path / "fake.pt"))
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[1] = 255
    features, logits = extractor(images)
    assert logits is None
    np.testing.assert_allclose(features, [[0, 0], [255, 255]], atol=1e-4)
    assert extractor._prepare(images).shape == (2, 3, INCEPTION_SIZE, INCEPTION_SIZE)


def test_stylegan_interface_gives_log_probabilities(tmp_path):
    extractor = load_inception(save_script(StyleGanLike(), tmp_path / "fake.pt"))
    images = random_images(4, seed=2)
    features, logits = extractor(images)
    assert features.shape == (4, 3)
    expected = torch.log_softmax(torch.from_numpy(features), dim=1).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_missing_or_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --inception PATH"):
        load_inception(tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="pass --inception PATH"):
        load_inception(None)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        load_inception(junk)


def test_bad_images_are_refused(tmp_path):
    extractor = load_inception(save_script(FeaturesOnly(), tmp_path / "fake.pt"))
    with pytest.raises(ValueError, match="uint8"):
        extractor(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        extractor(np.zeros((2, 3, 32, 32), np.uint8))


def test_inception_score_bounds():
    uniform = np.zeros((100, 10))
    assert inception_score(uniform, splits=10)[0] == pytest.approx(1.0)
    confident = np.full((100, 10), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50.0  # each split holds every class
    mean, std = inception_score(torch.from_numpy(confident), splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    collapsed = np.full((100, 10), -50.0)
    collapsed[:, 3] = 50.0  # confident but always the same class
    assert inception_score(collapsed, splits=5)[0] == pytest.approx(1.0)


def test_inception_score_checks_inputs():
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        inception_score(np.zeros(10))
    with pytest.raises(ValueError, match="splits=10"):
        inception_score(np.zeros((5, 3)), splits=10)
