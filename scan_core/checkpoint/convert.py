"""Writing new checkpoints from old ones: conversion to the own format, and averaging."""

from __future__ import annotations

import os

import torch

from scan_core.checkpoint.files import CheckpointError, read_raw
from scan_core.checkpoint.layouts import LoadReport
from scan_core.checkpoint.loading import _assemble_either, resolve_path, save_checkpoint

__all__ = ["average", "convert"]


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    grid_size: int | None = None,
    n_head: int | None = None,
    image_size: int | None = None,
    want_quality_head: bool | None = None,
    trust_pickle: bool = False,
    dtype: torch.dtype | None = None,
    card: dict | None = None,
) -> LoadReport:
    """Load any supported checkpoint and write it in the own format; returns the load report.

    The output's metadata records the source file and every key added, dropped or renamed.
    """
    raw = read_raw(resolve_path(src), header_only=False, trust_pickle=trust_pickle)
    module, report = _assemble_either(
        raw,
        "cpu",
        dtype,
        grid_size=grid_size,
        n_head=n_head,
        image_size=image_size,
        want_quality_head=want_quality_head,
    )
    changes = {name: [str(c) for c in getattr(report, name)] for name in ("added", "dropped")}
    renamed = [str(c) for c in report.renamed]
    source = {"file": raw.path.name, "layout": report.layout, **changes, "renamed": renamed}
    extra = {"source": source} | ({"card": card} if card else {})
    save_checkpoint(out, module, report.kind, extra_metadata=extra)
    return report


def average(
    sources: list[str | os.PathLike], out: str | os.PathLike, *, trust_pickle: bool = False
) -> LoadReport:
    """Write the element-wise mean of several checkpoints of one model (checkpoint averaging).

    Averaging the last checkpoints of a low-learning-rate run is a cheap way to smooth out the
    noise of single steps (as stochastic weight averaging does). Every source must have the
    same kind and configuration; the sum is kept in float64 and cast back to the first file's
    dtypes. Returns the first file's load report; the output's metadata lists the sources.
    """
    if len(sources) < 2:
        raise CheckpointError("average needs at least two checkpoints")
    first, report, total, names = None, None, {}, []
    for source in sources:
        raw = read_raw(resolve_path(source), header_only=False, trust_pickle=trust_pickle)
        module, loaded = _assemble_either(raw, "cpu")
        names.append(raw.path.name)
        if first is None:
            first, report = module, loaded
        elif loaded.kind != report.kind:
            raise CheckpointError(
                f"{raw.path.name} is a {loaded.kind} but the first checkpoint is a "
                f"{report.kind}: average runs of one model only"
            )
        elif module.config != first.config:
            ours, theirs = first.config.to_dict(), module.config.to_dict()
            differ = ", ".join(
                f"{key} {ours[key]} vs {theirs[key]}"
                for key in ours
                if ours[key] != theirs.get(key)
            )
            raise CheckpointError(
                f"{raw.path.name} differs from the first checkpoint ({differ}): "
                "average runs of one model only"
            )
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                total[name] = total.get(name, 0) + tensor.double()
    with torch.no_grad():
        for name, tensor in first.state_dict().items():
            if name in total:
                tensor.copy_(total[name] / len(sources))
    save_checkpoint(out, first, report.kind, extra_metadata={"source": {"averaged": names}})
    return report
