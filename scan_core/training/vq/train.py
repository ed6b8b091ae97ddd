"""Train a VQ tokenizer (:class:`scan_core.tokenizer.vq.VQModel`) on a small image set (emoji).

Loss = reconstruction (L1 or L2) + the VQ terms of ``VQModel`` (codebook, commitment, entropy)
+ an optional hinge PatchGAN term from ``disc_start`` on (adaptive weight as in taming).
Codes unused for ``dead_code_steps`` steps are re-initialised from encoder outputs of the current
batch. Every random choice (batch order, flips, restarts) is a pure function of (seed, step), so a
run resumed from a checkpoint is bit-identical to an uninterrupted one on the same machine.

Files under ``--out``:
- ``checkpoints/step_XXXXXXXX.safetensors``: the tokenizer (``save_checkpoint``, kind "tokenizer");
- ``checkpoints/step_XXXXXXXX.train.pt``: optimizers, discriminator, step, code ages, RNG, config;
- ``checkpoints/latest``: the newest complete checkpoint (written last, so a crash keeps the old);
- ``best.safetensors`` + ``best.json``: the highest held-out PSNR so far;
- ``metrics.jsonl``: one JSON object per log window, evaluation or event.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm import tqdm

from scan_core.checkpoint.loading import save_checkpoint
from scan_core.datasets.emoji import load_split
from scan_core.files import atomic_torch_save, atomic_write_text
from scan_core.images import tensor_to_uint8
from scan_core.model.config import VQConfig, vq_preset
from scan_core.tokenizer.vq import VQModel
from scan_core.training.distributed import DistInfo, resolve_device
from scan_core.training.vq.codebook import codebook_usage, flat_latents, restart_dead_codes
from scan_core.training.vq.losses import (
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_discriminator_loss,
)
from scan_core.training.vq.state import (
    TRAIN_STATE_FORMAT,
    TRAIN_STATE_VERSION,
    TrainingDiverged,
    VQTrainConfig,
    batch_indices,
    build_optimizer,
    checkpoint_name,
    config_changes,
    lr_factor,
    step_generator,
    to_model_range,
)

# The config, schedule and files live in vq_train_state, the PatchGAN in vq_losses and the
# dead-code restarts in vq_codebook; the names imported above stay importable from here.


# ---------------------------------------------------------------------------------- trainer


class VQTrainer:
    """Model, discriminator, optimizers and code ages of one run; :meth:`run` trains it."""

    def __init__(self, config: VQTrainConfig, resume: bool = False) -> None:
        self.config = config
        self.out = Path(config.out)
        self.checkpoints = self.out / "checkpoints"
        self.vq_config: VQConfig = vq_preset(config.preset)
        self.train_pixels = self._load_pixels("train")  # (N, 3, S, S) uint8
        self.val_pixels = self._load_pixels("val")
        self.device = resolve_device(config.device, DistInfo())
        torch.manual_seed(config.seed)
        self.model = VQModel(self.vq_config).to(self.device).train()
        self.optimizer = build_optimizer(self.model, config, {"quantize.embedding.weight"})
        self.discriminator, self.disc_optimizer = None, None
        if config.disc_weight > 0:
            self.discriminator = PatchDiscriminator().to(self.device).train()
            self.disc_optimizer = build_optimizer(self.discriminator, config, set())
        size, device = self.vq_config.codebook_size, self.device
        # step each code was last chosen; both live beside the codes they count
        self.last_used = torch.zeros(size, dtype=torch.long, device=device)
        self.window_counts = torch.zeros(size, dtype=torch.long, device=device)
        self.step, self.restarts = 0, 0
        self.stop_requested = False  # set from a signal handler; the loop stops after the step
        self.best_psnr, self.best_step = -math.inf, -1
        latest = self.latest_checkpoint()
        if latest and not resume:
            raise FileExistsError(
                f"{self.checkpoints} holds {latest}: pass --resume or a new --out"
            )
        if latest:
            self.load(latest)

    def _load_pixels(self, split: str) -> Tensor:
        pixels = load_split(self.config.data, split)["images"]  # (N, S, S, 3) uint8
        size = self.vq_config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3) or pixels.dtype != np.uint8:
            raise ValueError(
                f"{self.config.data}/{split}.npz images are {pixels.shape} {pixels.dtype}; "
                f"{self.config.preset} wants (N, {size}, {size}, 3) uint8"
            )
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

    def batch(self, step: int) -> Tensor:
        """The training images of ``step``, flipped at random: (B, 3, S, S) in [-1, 1]."""
        cfg = self.config
        images = to_model_range(
            self.train_pixels[batch_indices(step, cfg.batch_size, len(self.train_pixels), cfg.seed)]
        )
        if cfg.flip:
            flip = torch.rand(len(images), generator=step_generator(cfg.seed, "flip", step)) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images.to(self.device)  # picked and flipped on the CPU, so any device draws alike

    def train_step(self) -> dict[str, float]:
        """One optimizer step (and one discriminator step once it is on); returns the losses."""
        cfg, step, model = self.config, self.step, self.model
        images = self.batch(step)
        latents = model.encode_to_latents(images)
        z_q, codes, vq_losses = model.quantize.quantize_with_losses(latents)
        recon = model.decode_latents(z_q)
        pixel_loss = F.mse_loss if cfg.recon_loss == "l2" else F.l1_loss
        recon_loss = pixel_loss(recon, images)
        loss = recon_loss + sum(vq_losses.values())
        logs = {"recon": recon_loss.item(), **{k: v.item() for k, v in vq_losses.items()}}
        gan_on = self.discriminator is not None and step >= cfg.disc_start
        if gan_on:
            gan_loss = -self.discriminator(recon).mean()
            last_layer = model.decoder.conv_out.weight
            weight = (
                adaptive_gan_weight(recon_loss, gan_loss, last_layer) if cfg.disc_adaptive else 1
            )
            loss = loss + cfg.disc_weight * weight * gan_loss
            logs.update(gan=gan_loss.item(), gan_weight=float(weight))
        _check_finite(loss, "loss", step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        logs["grad_norm"] = _check_finite(
            nn.utils.clip_grad_norm_(model.parameters(), max_norm), "gradient norm", step
        )
        factor = lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        for optimizer in (self.optimizer, self.disc_optimizer):
            for group in optimizer.param_groups if optimizer else ():
                group["lr"] = cfg.lr * factor
        self.optimizer.step()
        if gan_on:
            logs["disc"] = self._discriminator_step(images, recon.detach())
        self._track_codes(codes, latents)
        return logs

    def _discriminator_step(self, real: Tensor, fake: Tensor) -> float:
        loss = hinge_discriminator_loss(self.discriminator(real), self.discriminator(fake))
        _check_finite(loss, "discriminator loss", self.step)
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_optimizer.step()
        return loss.item()

    def _track_codes(self, codes: Tensor, latents: Tensor) -> None:
        flat = codes.reshape(-1)
        self.last_used[flat.unique()] = self.step
        self.window_counts += torch.bincount(flat, minlength=len(self.window_counts))
        if self.config.dead_code_steps > 0:
            self.restarts += restart_dead_codes(
                self.model,
                self.last_used,
                self.step,
                self.config.dead_code_steps,
                flat_latents(self.model, latents),
                self.optimizer,
                step_generator(self.config.seed, "restart", self.step),
            )

    @torch.no_grad()
    def evaluate(self, batch_size: int = 256) -> dict[str, float]:
        """Held-out PSNR (mean over images, and pooled over all pixels) and codebook usage."""
        if len(self.val_pixels) == 0:
            return {}
        self.model.eval()
        squared_errors, counts = [], torch.zeros_like(self.window_counts)
        for pixels in self.val_pixels.split(batch_size):
            images = to_model_range(pixels).to(self.device)
            z_q, codes = self.model.quantize(self.model.encode_to_latents(images))
            recon = tensor_to_uint8(self.model.decode_latents(z_q)).astype(np.float64)
            diff = pixels.permute(0, 2, 3, 1).numpy().astype(np.float64) - recon
            squared_errors.append((diff**2).reshape(len(diff), -1).mean(1))
            counts += torch.bincount(codes.reshape(-1), minlength=len(counts))
        self.model.train()
        mse = np.concatenate(squared_errors)
        per_image = np.where(mse == 0, 100.0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)))
        return {
            "val_psnr": float(per_image.mean()),
            "val_psnr_pooled": float(10 * np.log10(255.0**2 / max(mse.mean(), 1e-12))),
            "val_codes_used": codebook_usage(counts)["codes_used"],
        }

    def run(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to ``config.steps`` (or ``stop_at``); log, evaluate and checkpoint on the way."""
        cfg = self.config
        end = min(cfg.steps, stop_at if stop_at is not None else cfg.steps)
        interactive = sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, mininterval=1 if interactive else 60)
        window, started, last_eval = [], time.perf_counter(), {}
        try:
            while self.step < end and not self.stop_requested:
                try:
                    window.append(self.train_step())
                except TrainingDiverged as error:
                    latest = self.latest_checkpoint()
                    self.log({"event": "diverged", "error": str(error), "kept": latest})
                    raise TrainingDiverged(f"{error}; last good checkpoint: {latest}") from None
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == end:
                    rate = len(window) / (time.perf_counter() - started)
                    bar.set_postfix(recon=f"{window[-1]['recon']:.4f}", refresh=False)
                    self._log_window(window, rate)
                    window, started = [], time.perf_counter()
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last_eval = self.evaluate()
                    self.log({"step": self.step, **last_eval})
                    tqdm.write(f"step {self.step}: " + _format(last_eval))
                    self._keep_best(last_eval)
                if self.step % cfg.checkpoint_every == 0 or self.step == end:
                    self.save()
            if self.stop_requested and self.latest_checkpoint() != checkpoint_name(self.step):
                self.save()  # a signal stops between two steps, where the state is consistent
        finally:
            bar.close()
        return last_eval

    def _log_window(self, window: list[dict[str, float]], rate: float) -> None:
        means = {
            key: float(np.mean([logs.get(key, np.nan) for logs in window])) for key in window[-1]
        }
        usage = codebook_usage(self.window_counts)
        self.window_counts.zero_()
        record = {"step": self.step, **means, **usage, "restarts": self.restarts}
        record.update(lr=self.optimizer.param_groups[0]["lr"], steps_per_s=rate)
        self.log(record)
        tqdm.write(f"step {self.step}: " + _format(record))

    def log(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _keep_best(self, metrics: dict[str, float]) -> None:
        psnr = metrics.get("val_psnr", -math.inf)
        if psnr <= self.best_psnr:
            return
        self.best_psnr, self.best_step = psnr, self.step
        info = {"step": self.step, **metrics}
        save_checkpoint(self.out / "best.safetensors", self.model, "tokenizer", {"training": info})
        atomic_write_text(self.out / "best.json", json.dumps(info, indent=2) + "\n")

    # ------------------------------------------------------------------------- checkpoints

    def latest_checkpoint(self) -> str | None:
        path = self.checkpoints / "latest"
        return path.read_text().strip() if path.exists() else None

    def save(self) -> str:
        """Write step_XXXXXXXX.{safetensors,train.pt}, then point ``latest`` at them."""
        name = checkpoint_name(self.step)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        info = {"step": self.step, "run": dataclasses.asdict(self.config)}
        path = self.checkpoints / f"{name}.safetensors"
        save_checkpoint(path, self.model, "tokenizer", {"training": info})
        state = {
            "format": TRAIN_STATE_FORMAT,
            "version": TRAIN_STATE_VERSION,
            "step": self.step,
            "config": dataclasses.asdict(self.config),
            "optimizer": self.optimizer.state_dict(),
            "discriminator": self.discriminator and self.discriminator.state_dict(),
            "disc_optimizer": self.disc_optimizer and self.disc_optimizer.state_dict(),
            "last_used": self.last_used.cpu().clone(),
            "restarts": self.restarts,
            "best": [self.best_psnr, self.best_step],
            "torch_rng": torch.get_rng_state(),
        }
        atomic_torch_save(state, self.checkpoints / f"{name}.train.pt")
        atomic_write_text(self.checkpoints / "latest", name + "\n")
        self._prune(keep=name)
        return name

    def _prune(self, keep: str) -> None:
        names = sorted(
            path.name[: -len(".train.pt")] for path in self.checkpoints.glob("*.train.pt")
        )
        old = [name for name in names if name != keep][: max(0, len(names) - self.config.keep_last)]
        for name in old:
            for suffix in (".safetensors", ".train.pt"):
                (self.checkpoints / f"{name}{suffix}").unlink(missing_ok=True)

    def load(self, name: str) -> None:
        """Restore weights, optimizers, code ages and RNG from a checkpoint (strict)."""
        state = torch.load(
            self.checkpoints / f"{name}.train.pt", map_location="cpu", weights_only=True
        )
        if state.get("format") != TRAIN_STATE_FORMAT or state.get("version") != TRAIN_STATE_VERSION:
            raise ValueError(
                f"{name}.train.pt is not a {TRAIN_STATE_FORMAT} v{TRAIN_STATE_VERSION}"
            )
        changes = config_changes(state["config"], self.config)
        if changes:
            raise ValueError(f"cannot resume {name} exactly; changed settings: {changes}")
        weights = load_file(self.checkpoints / f"{name}.safetensors")
        self.model.load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"], strict=True)
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.last_used.copy_(state["last_used"])
        self.step, self.restarts = state["step"], state["restarts"]
        self.best_psnr, self.best_step = state["best"]
        torch.set_rng_state(state["torch_rng"])
        self.log({"event": "resumed", "step": self.step, "checkpoint": name})


def _check_finite(value: Tensor, what: str, step: int) -> float:
    number = float(value.detach()) if isinstance(value, Tensor) else float(value)
    if not math.isfinite(number):
        raise TrainingDiverged(f"{what} is {number} at step {step} (weights not updated)")
    return number


def _format(record: dict) -> str:
    return " ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in record.items()
        if key != "step"
    )


# ------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`VQTrainConfig` field, plus ``--resume``."""
    parser = argparse.ArgumentParser(prog="python -m scan_core train_vq", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for item in dataclasses.fields(VQTrainConfig):
        flag = "--" + item.name.replace("_", "-")
        help_text = f"{item.metadata['help']} (default: {item.default})"
        if isinstance(item.default, bool):
            kind = argparse.BooleanOptionalAction
            parser.add_argument(flag, action=kind, default=item.default, help=help_text)
        else:
            parser.add_argument(flag, type=type(item.default), default=item.default, help=help_text)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    resume = args.pop("resume")
    config = VQTrainConfig(**args)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    trainer = VQTrainer(config, resume=resume)
    params = sum(p.numel() for p in trainer.model.parameters())
    print(
        f"{config.preset}: {params:,} parameters; {len(trainer.train_pixels)} train / "
        f"{len(trainer.val_pixels)} val images; step {trainer.step} of {config.steps}; "
        f"on {trainer.device} ({torch.get_num_threads()} CPU thread(s))",
        flush=True,
    )

    def request_stop(signum, frame) -> None:
        trainer.stop_requested = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    try:
        final = trainer.run()
    except TrainingDiverged as error:
        print(f"error: training stopped: {error}", file=sys.stderr)
        return 2
    if trainer.stop_requested:
        print(f"stopped by a signal at step {trainer.step} (saved); continue with --resume")
        return 130
    print(f"done at step {trainer.step}: {_format(final)}; best val_psnr {trainer.best_psnr:.2f}")
    return 0
