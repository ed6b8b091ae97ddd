"""Time SCAN-L's linear layers on M rows at a time: the measurement behind
docs/results.md's "Linear layers by row count" table.

    python -m tools.linear_rows [--threads 1]

The weights of SCAN-L's 24 blocks (1.23 GB fp32, fresh random tensors so none sit in cache; the
shapes come from the preset) run as ``F.linear`` on M rows, best of 3. A matrix-vector product
over as many bytes (``bench.measure_bandwidth``, the benchmark's own) gives the memory
bandwidth, hence the floor a one-row step cannot beat. The second column runs the
same products on pre-transposed, contiguous weights (``x @ W.T`` stored as ``W.T``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from scan_core.evaluation.bench import measure_bandwidth
from scan_core.model.config import model_preset
from scan_core.model.network import Transformer

ROWS = (1, 2, 4, 8, 16, 26, 32)


def block_shapes(preset: str = "SCAN-L") -> list[torch.Size]:
    """(out, in) of every linear layer in the preset's blocks, read off a weightless model."""
    with torch.device("meta"):
        model = Transformer(model_preset(preset))
    return [m.weight.shape for m in model.layers.modules() if isinstance(m, nn.Linear)]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(shape) * 0.02 for shape in block_shapes()]
    transposed = [w.t().contiguous() for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    rate = measure_bandwidth(nbytes, 4096, torch.device("cpu"), torch.float32, repeats=3)
    print(
        f"weights {nbytes / 1e9:.2f} GB; matrix-vector {nbytes / rate * 1e3:.0f} ms "
        f"= {rate / 1e9:.1f} GB/s"
    )
    widths = {w.shape[1] for w in weights}
    for rows in ROWS:
        inputs = {width: torch.randn(rows, width) for width in widths}
        linear = best_of(3, lambda x=inputs: [F.linear(x[w.shape[1]], w) for w in weights])
        matmul = best_of(3, lambda x=inputs: [x[w.shape[0]] @ w for w in transposed])
        print(
            f"M = {rows:2d}: F.linear {linear * 1e3:5.0f} ms, x @ W.T {matmul * 1e3:5.0f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
