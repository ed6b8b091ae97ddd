"""The LlamaGen baseline: raster-order decoding, one code per step, with a KV cache.

It runs any of our transformers (LlamaGen GPT weights, or a SCAN/RandAR model for side-by-side
speed figures): the input is ``[C, x_0 .. x_{N-2}]`` and the output at slot i predicts code i.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scan_core.model.kv_cache import KVCache
from scan_core.model.network import SLOT_CLASS, SLOT_CODE
from scan_core.sampling.draw import sample_codes
from scan_core.sampling.schedule import cfg_scale_at
from scan_core.sampling.settings import SamplerSettings


@torch.inference_mode()
def raster_generate(
    model,
    class_ids: Tensor,
    settings: SamplerSettings,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> Tensor:
    """Decode a (B, N) code grid in raster order; CFG by batch doubling as in generation."""
    config = model.config
    batch, n = class_ids.shape[0], config.num_tokens
    device = class_ids.device
    use_cfg = settings.uses_cfg
    rows = 2 * batch if use_cfg else batch
    dtype = next(model.parameters()).dtype
    cache = KVCache.allocate(config, rows, n, device, dtype)
    values = class_ids.view(-1, 1)
    if use_cfg:
        values = torch.cat([values, torch.full_like(values, config.num_classes)])
    kinds = torch.full((rows, 1), SLOT_CLASS, dtype=torch.long, device=device)
    codes = torch.empty(batch, n, dtype=torch.long, device=device)
    keys = torch.arange(n, device=device)
    for i in range(n):
        cells = torch.full((rows, 1), i - 1, dtype=torch.long, device=device)
        position = keys[i : i + 1]
        mask = torch.ones(1, 1, i + 1, dtype=torch.bool, device=device)  # the written prefix
        hidden = model(kinds, values, cells, mask, cache, position)
        logits = model.token_logits(hidden[:, -1])
        if use_cfg:
            cond, uncond = logits.chunk(2)
            scale = cfg_scale_at(i / n, settings.cfg_start, settings.cfg_scale)
            logits = uncond + scale * (cond - uncond)
        code, _ = sample_codes(
            logits, settings.temperature, settings.top_k, settings.top_p, generator
        )
        codes[:, i] = code
        kinds = torch.full((rows, 1), SLOT_CODE, dtype=torch.long, device=device)
        values = code.view(-1, 1).repeat(2 if use_cfg else 1, 1)
    return codes
