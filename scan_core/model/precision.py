"""Which floating-point type a model runs in: ``--dtype auto|float32|bfloat16``.

``auto`` takes bfloat16 where the hardware computes it natively, float32 elsewhere:

- CUDA: bfloat16 when ``torch.cuda.is_bf16_supported()`` (as the paper's timings).
- CPUs with AVX-512 BF16 or AMX BF16: bfloat16. Measured side by side on an AMD EPYC with
  AVX-512 BF16 (``python -m tools.dtype_speed``, one thread, K = 16, T = 4, batch 1),
  bfloat16 ran 1.31x faster on the embedded emoji model (dim 256), 1.73x at dim 512 and
  1.88x at dim 1024 (docs/results.md, "Precision").
- Other CPUs (AVX2 only, Arm): float32. There bfloat16 matmuls are emulated: no faster, and
  less exact.

The sampler works in the model's dtype (its cache too) and keeps softmax, sampling and scores in
float32, so bfloat16 changes the logits by rounding only: on the embedded model, greedy codes
agree with float32 on most cells and scores differ by a few hundredths
(tests/test_precision.py states the bounds).
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
# /proc/cpuinfo flags that mean the CPU multiplies bfloat16 natively (x86).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def parse_cpuinfo(cpuinfo: str | None = None) -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (lower-case keys); {} where it does not
    exist. ``cpuinfo``: the file's text (default: read it)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as file:
                cpuinfo = file.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():  # the first processor is representative
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``)."""
    fields = parse_cpuinfo(cpuinfo)
    return set((fields.get("flags") or fields.get("features") or "").split())


def native_bf16(device: str | torch.device, flags: set[str] | None = None) -> bool:
    """Whether ``device`` computes bfloat16 natively (``flags``: the CPU's, default read)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def choose_dtype(
    requested: str, device: str | torch.device, flags: set[str] | None = None
) -> tuple[torch.dtype, str]:
    """The dtype for ``requested`` ("auto", "float32" or "bfloat16") on ``device``, and one line
    saying why (for load reports and logs). ValueError for any other name."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    device = torch.device(device)
    native = native_bf16(device, flags)
    where = "this GPU" if device.type == "cuda" else "this CPU"
    if requested == "float32":
        return torch.float32, "float32 (as asked)"
    if requested == "bfloat16":
        if native:
            return torch.bfloat16, "bfloat16 (as asked)"
        return torch.bfloat16, f"bfloat16 (as asked; {where} emulates it: slower than float32)"
    if native:
        return torch.bfloat16, f"bfloat16 (auto: {where} computes it natively, and it is faster)"
    return torch.float32, f"float32 (auto: {where} has no native bfloat16)"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
