"""A kernel choice for CPU inference: every ``nn.Linear`` through oneDNN on pre-packed weights.

``F.linear`` on a CPU runs the BLAS torch was built with (MKL). oneDNN can instead take a weight
reordered once into its blocked layout; on the development machine (AMD EPYC, AVX-512, fp32)
that ran SCAN-L's block weights 1.5-2.2x faster at the 2-32 rows a step feeds them, and whole
SCAN-L steps 1.6-1.8x faster (docs/results.md, "Against the roofline"). Results match
``F.linear`` to float rounding, not bit for bit. The state dict is untouched: the packed copy
lives beside the weight (memory for a second copy of every linear weight) and is made once, so
a packed model is for inference only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PACKING_ROWS = 16  # the row count oneDNN picks its layout for; SCAN steps run 2-26 rows


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


def onednn_linear(x: Tensor, packed: Tensor) -> Tensor:
    """``F.linear(x, W)`` (no bias) through oneDNN; ``packed`` from ``pack_weight(W)``.

    Shapes: x (..., in) -> (..., out).
    """
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def pack_weight(weight: Tensor, rows: int = PACKING_ROWS) -> Tensor:
    """``weight`` (out, in) reordered into oneDNN's layout for inputs of about ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def prepack_linears(model: nn.Module) -> int:
    """Route every bias-free CPU ``nn.Linear`` of ``model`` through :func:`onednn_linear`.

    Each module's ``forward`` is overridden on the instance (``del module.forward`` restores
    it); its parameters and the state dict stay as they were. Returns how many were packed.
    """
    if not onednn_available():
        raise RuntimeError("this torch build has no oneDNN (torch.backends.mkldnn)")
    packed = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is None:
            if module.weight.device.type != "cpu":
                raise ValueError("oneDNN pre-packing is for CPU weights")
            module.forward = _packed_forward(pack_weight(module.weight))
            packed += 1
    return packed


def _packed_forward(packed: Tensor):
    def forward(x: Tensor) -> Tensor:
        return onednn_linear(x, packed)

    return forward
