"""The machine a figure was measured on: what it is, and its two roofs, measured in-process.

``machine_description`` names the CPU (model, family, the vector extensions torch's kernels can
use), the GPU if any, and torch's build; record it beside every timing. ``measure_bandwidth``
and ``measure_matmul_peak`` measure the memory and compute roofs with the calling process's
device, dtype and thread count, so they bound that process's own timings.
"""

from __future__ import annotations

import math
import os
import platform
import time

import torch

from scan_core.evaluation.kernels import onednn_available, onednn_linear, pack_weight
from scan_core.model.precision import parse_cpuinfo

# The flags that decide which matmul kernels run, as /proc/cpuinfo spells them (x86, then Arm).
VECTOR_EXTENSIONS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "asimd",
    "asimddp",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)
BANDWIDTH_CAP_BYTES = 2 << 30  # past the last-level cache the size no longer matters


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cpu_description(cpuinfo: str | None = None) -> dict:
    """CPU model, family/model numbers and vector extensions, read from ``/proc/cpuinfo``.

    Args:
        cpuinfo: the file's text (default: read it; empty where it does not exist).
    """
    fields = parse_cpuinfo(cpuinfo)
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "family": fields.get("cpu family"),
        "model_number": fields.get("model"),
        "logical_cpus": os.cpu_count(),
        "vector_extensions": [name for name in VECTOR_EXTENSIONS if name in flags],
    }


def machine_description(device: str | torch.device = "cpu") -> dict:
    """The CPU, the GPU behind ``device`` (if CUDA), torch's version and its CPU kernels."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu": cpu_description(),
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def describe_machine(machine: dict) -> str:
    """One line: CPU model (family/model), logical CPUs, vector extensions, torch, GPU."""
    cpu = machine["cpu"]
    numbers = f" (family {cpu['family']} model {cpu['model_number']})" if cpu["family"] else ""
    line = (
        f"{cpu['model']}{numbers}, {cpu['logical_cpus']} logical CPUs, "
        f"{' '.join(cpu['vector_extensions']) or 'no vector extensions listed'}; "
        f"torch {machine['torch']} ({machine['torch_cpu_kernels']} kernels, "
        f"{machine['threads']} thread{'' if machine['threads'] == 1 else 's'})"
    )
    return line + (f"; GPU {machine['gpu']}" if machine["gpu"] else "")


def measure_bandwidth(
    num_bytes: int, dim: int, device: torch.device, dtype: torch.dtype, repeats: int = 5
) -> float:
    """Bytes per second streamed from a ``num_bytes`` matrix (capped past the caches).

    A roof is the best the machine does, and single kernels fall short of it: this is the
    fastest of a matrix-vector product and a plain sum (a read-only stream), each in ``dtype``
    and in float32 over the same bytes. On the development machine (AMD EPYC, one thread) the
    fp32 sum streamed 21 GB/s where MKL's matrix-vector product reached 17, and a bf16
    matrix-vector product a fraction of either.
    """
    kinds = dict.fromkeys((dtype, torch.float32))  # one pass when dtype is float32
    return max(_stream_rate(num_bytes, dim, device, kind, repeats) for kind in kinds)


def _stream_rate(num_bytes: int, dim: int, device, dtype: torch.dtype, repeats: int) -> float:
    element = torch.tensor([], dtype=dtype).element_size()
    rows = max(1, min(num_bytes, BANDWIDTH_CAP_BYTES) // (dim * element))
    matrix = torch.randn(rows, dim, device=device, dtype=dtype)
    vector = torch.randn(dim, device=device, dtype=dtype)
    seconds = min(
        _best_time(lambda: torch.mv(matrix, vector), device, repeats),
        _best_time(matrix.sum, device, repeats),
    )
    return matrix.numel() * element / seconds


def default_matmul_size(device: torch.device) -> int:
    """A square GEMM big enough to run at the roof: 2048 on a CPU, 8192 on a GPU."""
    return 8192 if device.type == "cuda" else 2048


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 3
) -> float:
    """FLOP/s of a large square matrix product (2 n^3 FLOPs), best of ``repeats``: the compute
    roof in ``dtype`` at the current thread count (not the small-row kernels a step runs).

    On a CPU with oneDNN this is the faster of ``torch.mm`` and oneDNN's pre-packed linear (the
    kernel ``bench --prepack`` runs), so no kernel the benchmark offers can beat its roof.
    """
    size = size or default_matmul_size(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    kernels = [lambda: torch.mm(a, b)]
    if device.type == "cpu" and onednn_available():
        packed = pack_weight(b.t(), size)  # W = b^T, so onednn_linear(a, W) = a @ b
        kernels.append(lambda: onednn_linear(a, packed))
    return 2 * size**3 / min(_best_time(kernel, device, repeats) for kernel in kernels)


def _best_time(run, device: torch.device, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats + 1):  # the first run is a warm-up
        start = clock(device)
        run()
        best = min(best, clock(device) - start)
    return best
