"""What a training run reports: JSONL metrics (+ TensorBoard) and sample preview grids."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from PIL import Image

from scan_core.model.network import Transformer
from scan_core.training.losses import LossConfig
from scan_core.training.state import TrainConfig

log = logging.getLogger("scan_core.training.train")
PREVIEW_ROUNDS = (0, 30)  # refinement rounds T of the preview rows


class MetricsLogger:
    """JSONL lines (and TensorBoard scalars when asked and installed); rank 0 only."""

    def __init__(self, out: Path, tensorboard: bool, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                log.info("TensorBoard is not installed (pip install tensorboard); JSONL only")

    def write(self, step: int, epoch: int, metrics: dict[str, float], samples_per_second: float):
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, "time": time.time()}
        row |= {k: (None if math.isnan(v) else v) for k, v in metrics.items()}
        row["samples_per_second"] = samples_per_second
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def render_preview(
    model: Transformer, config: TrainConfig, loss_config: LossConfig, path: Path
) -> Path:
    """Sample ``config.preview_classes`` at T=0 and T=30 (same seed, so the same initial
    images) and save them as a two-row PNG grid, decoded with ``config.tokenizer``."""
    from scan_core.checkpoint.loading import load_tokenizer
    from scan_core.images import tensor_to_pil
    from scan_core.sampling.sampler import ScanSampler, run_all
    from scan_core.sampling.settings import SamplerSettings

    device = next(model.parameters()).device
    tokenizer, _ = load_tokenizer(config.tokenizer, device=device)
    num_tokens, grid = model.config.num_tokens, model.config.grid_size
    classes = [c % model.config.num_classes for c in config.preview_classes]
    settings = SamplerSettings(
        num_steps=len(loss_config.set_sizes(num_tokens)),
        tokens_per_round=min(loss_config.tokens_per_round, num_tokens),
    )
    sampler = ScanSampler(model, device=device)
    rows = []
    for rounds in PREVIEW_ROUNDS:
        trace = run_all(sampler.generate(classes, settings.replace(num_rounds=rounds), seed=0))
        codes = torch.as_tensor(trace.codes_at(-1), device=device).view(-1, grid, grid)
        rows.append(tensor_to_pil(tokenizer.decode_codes(codes)))
    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * len(classes), height * len(rows)), "white")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            sheet.paste(image, (c * width, r * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
