"""Time SCAN-L's linear layers on M rows at a time, against their roofline floor: the
measurement behind docs/results.md's "Linear layers by row count" table.

    python -m tools.linear_rows [--threads 1] [--dtype float32] [--preset SCAN-L]
        [--steps [--compile]]

The weights of SCAN-L's 24 blocks (1.23 GB fp32, fresh random tensors so none sit in cache; the
shapes come from the preset) run on M rows, best of 3, three ways side by side: ``F.linear``
(what the model runs), ``x @ W.T`` on pre-transposed contiguous weights, and oneDNN's linear on
weights pre-packed once into its blocked layout (``scan_core.evaluation.kernels``, what
``bench --prepack`` runs). The benchmark's own
roofs (``scan_core.evaluation.machine``) give the floor: the faster of a matrix-vector product
and a sum over as many bytes (bandwidth) and a large square GEMM (matmul peak), so at M rows
the layers take at least max(bytes / bandwidth, 2 M weights / peak).

``--steps`` makes the same comparison on whole generation steps (K = 64, T = 0, CFG):
a random model with ``F.linear`` and one with pre-packed linears (``--compile``: and one under
``torch.compile``), generations alternating, every step against its roofline floor
(``bench``'s roofs, FLOPs and hooks), in wall and CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from scan_core.evaluation.bench import build_random_model, measure_roofs, warm_up_model
from scan_core.evaluation.kernels import onednn_linear, pack_weight, prepack_linears
from scan_core.evaluation.machine import (
    describe_machine,
    machine_description,
    measure_bandwidth,
    measure_matmul_peak,
)
from scan_core.evaluation.roofline import NetworkTimer, roofline_seconds
from scan_core.model.config import model_preset
from scan_core.model.network import Transformer
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.settings import SamplerSettings

ROWS = (1, 2, 4, 8, 16, 26, 32)


def block_shapes(preset: str = "SCAN-L") -> list[torch.Size]:
    """(out, in) of every linear layer in the preset's blocks, read off a weightless model."""
    with torch.device("meta"):
        model = Transformer(model_preset(preset))
    return [m.weight.shape for m in model.layers.modules() if isinstance(m, nn.Linear)]


def best_of(repeats: int, *fns) -> list[float]:
    """The best time of each function, run in turn ``repeats`` times (a slow spell of a shared
    machine then falls on all of them)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def record_steps(model: nn.Module, settings: SamplerSettings, seed: int, steps: list) -> None:
    """Append (wall s, CPU s, FLOPs per forward) of every generation step after the first."""
    timer = NetworkTimer(model, torch.device("cpu"))
    marks = []

    def on_step(_trace, step) -> None:
        marks.append((time.perf_counter(), time.process_time()))
        flops = timer.take()
        if len(marks) > 1 and step.kind == "generate":  # the first step allocates the cache
            steps.append((marks[-1][0] - marks[-2][0], marks[-1][1] - marks[-2][1], flops))

    run_all(ScanSampler(model).generate([1], settings, seed), on_step)
    timer.remove()


def compare_steps(preset: str, dtype: torch.dtype, compile_too: bool, repeats: int = 2) -> None:
    """Generation steps with F.linear, with pre-packed linears (and compiled), side by side."""
    cpu = torch.device("cpu")
    names = ["F.linear", "oneDNN pre-packed"] + ["torch.compile"] * compile_too
    models = {name: build_random_model(model_preset(preset), cpu, dtype) for name in names}
    prepack_linears(models["oneDNN pre-packed"])
    settings = SamplerSettings(num_rounds=0)
    if compile_too:
        model, start = models["torch.compile"], time.perf_counter()
        warm_up = lambda: run_all(ScanSampler(model).generate([1], settings))  # noqa: E731
        status = warm_up_model(model, warm_up, compile_model=True)
        print(f"{status}, {time.perf_counter() - start:.0f} s to compile and run once")
    roofs = measure_roofs(models["F.linear"], cpu, dtype)
    print(
        f"{preset} {roofs['weight_bytes'] / 1e9:.2f} GB streamed per forward at "
        f"{roofs['bandwidth_gbps']:.1f} GB/s; matmul peak {roofs['peak_gflops']:.0f} GFLOP/s"
    )
    steps = {name: [] for name in models}
    for seed in range(repeats + 1):  # seed 0 warms up
        for name, model in models.items():
            record_steps(model, settings, seed, steps[name] if seed else [])
    print("| kernels | step wall (ms) | step CPU (ms) | x roofline (wall) | x roofline (CPU) |")
    print("|---|---|---|---|---|")
    for name, records in steps.items():
        walls, cpus, flops = zip(*records, strict=True)
        roof = (roofs["weight_bytes"], roofs["bandwidth"], roofs["peak_flops"])
        floors = [roofline_seconds(calls, *roof) for calls in flops]
        cells = [f"{statistics.median(times) * 1e3:.0f}" for times in (walls, cpus)]
        for times in (walls, cpus):
            ratios = [t / f for t, f in zip(times, floors, strict=True)]
            cells.append(f"{statistics.median(ratios):.2f}")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--preset", default="SCAN-L", help="whose weights (default SCAN-L)")
    parser.add_argument("--steps", action="store_true", help="compare whole generation steps")
    parser.add_argument("--compile", action="store_true", help="--steps: add torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, cpu = getattr(torch, args.dtype), torch.device("cpu")
    if args.steps:
        print(describe_machine(machine_description()))
        compare_steps(args.preset, dtype, args.compile)
        return
    weights = [(torch.randn(shape) * 0.02).to(dtype) for shape in block_shapes(args.preset)]
    transposed = [w.t().contiguous() for w in weights]
    packed = [pack_weight(w) for w in weights]
    pairs = list(zip(weights, packed, strict=True))
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    count = sum(w.numel() for w in weights)
    rate = measure_bandwidth(nbytes, 4096, cpu, dtype, repeats=3)
    peak = measure_matmul_peak(cpu, dtype, repeats=3)
    print(describe_machine(machine_description()))
    print(
        f"weights {nbytes / 1e9:.2f} GB {args.dtype}; streamed in {nbytes / rate * 1e3:.0f} ms "
        f"at {rate / 1e9:.1f} GB/s; matmul peak {peak / 1e9:.0f} GFLOP/s; "
        f"the roofs meet at M = {nbytes * peak / (rate * 2 * count):.1f}"
    )
    print("| rows M | floor (ms) | F.linear (ms) | x @ W.T (ms) | oneDNN pre-packed (ms) |")
    print("|---|---|---|---|---|")
    widths = {w.shape[1] for w in weights}
    for rows in ROWS:
        inputs = {width: torch.randn(rows, width).to(dtype) for width in widths}
        floor = max(nbytes / rate, 2 * rows * count / peak)
        times = best_of(
            3,
            lambda x=inputs: [F.linear(x[w.shape[1]], w) for w in weights],
            lambda x=inputs: [x[w.shape[0]] @ w for w in transposed],
            lambda x=inputs: [onednn_linear(x[w.shape[1]], p) for w, p in pairs],
        )
        times = " | ".join(f"{t * 1e3:.0f} ({t / floor:.1f}x)" for t in times)
        print(f"| {rows} | {floor * 1e3:.0f} | {times} |", flush=True)


if __name__ == "__main__":
    main()
