"""Multi-process training: process-group set-up under torchrun, and FSDP2 sharding.

DDP (the default under torchrun) replicates the model and the optimizer on every process; it
fits SCAN-L (343M parameters: ~5.5 GB of fp32 weights + AdamW state) on 40-80 GB GPUs. For XL
and XXL, ``--fsdp`` shards parameters, gradients and optimizer state over the processes with
FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per transformer block), cutting that
memory by the world size; checkpoints are gathered to full tensors on rank 0 so the files are
the same as a single-process run's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from scan_core.model.network import Transformer


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, dist_info: DistInfo) -> torch.device:
    """``auto`` -> this process's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist_info.local_rank)
    return device


def init_distributed() -> DistInfo:
    """Join the torchrun job described by the environment (a no-op for a single process).

    NCCL on GPUs, gloo on CPUs. An already-initialised group (tests) is used as it is.
    """
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return DistInfo()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", str(dist.get_rank())))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(heads: nn.Module, model: Transformer, device: torch.device) -> nn.Module:
    """Shard ``heads`` in place with FSDP2: each block is a unit, the rest is the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(heads, mesh=mesh)
    return heads


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_copy(heads: nn.Module, config) -> Transformer | None:
    """Gather the sharded weights into a CPU Transformer on rank 0 (collective; None elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(heads, options=_full_options())
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        model = Transformer(config)
    prefix = "model."
    plain = {key.removeprefix(prefix): value for key, value in state.items()}
    model.load_state_dict(plain, strict=True, assign=True)
    return model


def full_optimizer_state(heads: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state gathered to full tensors keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(heads, optimizer, options=_full_options())


def load_full_optimizer_state(
    heads: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Scatter a full optimizer state (as saved by ``full_optimizer_state``) to the shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(heads, optimizer, state, options=_full_options())


def set_gradient_sync(module: nn.Module, sync: bool):
    """Context for gradient accumulation: skip the all-reduce / reduce-scatter until ``sync``."""
    import contextlib

    if sync:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


class _fsdp_no_sync:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self):
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc) -> None:
        self.module.set_requires_gradient_sync(True)
