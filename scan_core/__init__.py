"""SCAN: a self-calibrated autoregressive image generator, its tokenizer, sampler and training.

The public API is the names below, so examples and the studio write
``from scan_core import load_model, ScanSampler, ...`` and never reach into the packages.
They are imported on first use: ``import scan_core`` loads neither torch nor any model code.

- loading and saving: ``load_model``, ``load_tokenizer``, ``load_pair`` (both, the grid
  agreed), ``save_checkpoint``, ``CheckpointError``,
  ``inspect`` (what a file is, read header-only), ``pair_mismatch`` (why a model and a
  tokenizer cannot work together)
- sampling: ``ScanSampler``, ``SamplerSettings``, ``run_all``; continuing several sessions'
  traces in one run: ``continuation_key``, ``stack_continuations``, ``stacked_mask`` (several
  requests' lock or region masks as one); stepping several runs at
  once, their model forwards merged: ``Together`` (``STEP_END``: a run had no step left)
- the record of a run: ``Trace``, ``Step``, ``parse_trace``, ``TraceError``
- the network: ``Transformer``, ``ModelConfig``, ``model_preset``, ``MODEL_PRESETS``
- the tokenizer: ``VQModel``, ``VQConfig``, ``vq_preset``, ``VQ_PRESETS``
- images: ``load_image``, ``tensor_to_pil``
- precision: ``choose_dtype`` (``--dtype auto|float32|bfloat16``), ``DTYPE_CHOICES``

Beside these names, three modules are public as a whole, since a front end needs all of them:
``scan_core.files`` (atomic writers), ``scan_core.images`` (image loading and conversions) and
``scan_core.sampling.settings`` with ``scan_core.sampling.setting_inputs`` (the table of sampler
settings that builds every flag and control). ``PUBLIC_MODULES`` lists them.

The commands are ``python -m scan_core COMMAND``; docs/architecture.md maps the packages.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> module that defines it
_HOMES = {
    "load_model": "scan_core.checkpoint.loading",
    "load_pair": "scan_core.checkpoint.loading",
    "load_tokenizer": "scan_core.checkpoint.loading",
    "save_checkpoint": "scan_core.checkpoint.loading",
    "CheckpointError": "scan_core.checkpoint.files",
    "inspect": "scan_core.checkpoint.loading",
    "pair_mismatch": "scan_core.checkpoint.loading",
    "ScanSampler": "scan_core.sampling.sampler",
    "run_all": "scan_core.sampling.sampler",
    "continuation_key": "scan_core.sampling.stacking",
    "stack_continuations": "scan_core.sampling.stacking",
    "stacked_mask": "scan_core.sampling.stacking",
    "Together": "scan_core.sampling.together",
    "STEP_END": "scan_core.sampling.together",
    "SamplerSettings": "scan_core.sampling.settings",
    "Trace": "scan_core.sampling.trace",
    "Step": "scan_core.sampling.trace",
    "TraceError": "scan_core.sampling.trace",
    "parse_trace": "scan_core.sampling.trace_files",
    "Transformer": "scan_core.model.network",
    "ModelConfig": "scan_core.model.config",
    "model_preset": "scan_core.model.config",
    "MODEL_PRESETS": "scan_core.model.config",
    "VQModel": "scan_core.tokenizer.vq",
    "VQConfig": "scan_core.model.config",
    "vq_preset": "scan_core.model.config",
    "VQ_PRESETS": "scan_core.model.config",
    "load_image": "scan_core.images",
    "tensor_to_pil": "scan_core.images",
    "choose_dtype": "scan_core.model.precision",
    "DTYPE_CHOICES": "scan_core.model.precision",
}

__all__ = [
    "CheckpointError",
    "MODEL_PRESETS",
    "ModelConfig",
    "SamplerSettings",
    "ScanSampler",
    "Step",
    "Trace",
    "TraceError",
    "Transformer",
    "VQConfig",
    "VQModel",
    "VQ_PRESETS",
    "load_image",
    "load_model",
    "load_pair",
    "load_tokenizer",
    "model_preset",
    "parse_trace",
    "run_all",
    "save_checkpoint",
    "tensor_to_pil",
    "vq_preset",
    "inspect",
    "pair_mismatch",
    "choose_dtype",
    "continuation_key",
    "stack_continuations",
    "stacked_mask",
    "Together",
    "STEP_END",
    "DTYPE_CHOICES",
]  # the keys of _HOMES (tests/test_layout.py checks)

PUBLIC_MODULES = (
    "scan_core.files",
    "scan_core.images",
    "scan_core.sampling.settings",
    "scan_core.sampling.setting_inputs",
)

if TYPE_CHECKING:  # what type checkers and editors see; never executed
    from scan_core.checkpoint.files import CheckpointError
    from scan_core.checkpoint.loading import (
        inspect,
        load_model,
        load_pair,
        load_tokenizer,
        pair_mismatch,
        save_checkpoint,
    )
    from scan_core.images import load_image, tensor_to_pil
    from scan_core.model.config import (
        MODEL_PRESETS,
        VQ_PRESETS,
        ModelConfig,
        VQConfig,
        model_preset,
        vq_preset,
    )
    from scan_core.model.network import Transformer
    from scan_core.model.precision import DTYPE_CHOICES, choose_dtype
    from scan_core.sampling.sampler import ScanSampler, run_all
    from scan_core.sampling.settings import SamplerSettings
    from scan_core.sampling.stacking import continuation_key, stack_continuations, stacked_mask
    from scan_core.sampling.together import STEP_END, Together
    from scan_core.sampling.trace import Step, Trace, TraceError
    from scan_core.sampling.trace_files import parse_trace
    from scan_core.tokenizer.vq import VQModel


def __getattr__(name: str):
    """Import a public name's module on first use (PEP 562) and keep the name here."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'scan_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
