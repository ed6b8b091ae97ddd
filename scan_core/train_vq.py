"""Train a VQ tokenizer (:class:`scan_core.tokenizer.VQModel`) on a small image set (emoji).

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
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm import tqdm

from scan_core.checkpoint import save_checkpoint
from scan_core.config import VQConfig, vq_preset
from scan_core.emoji_data import load_split
from scan_core.images import tensor_to_uint8
from scan_core.tokenizer import VQModel

TRAIN_STATE_FORMAT = "scan-vq-train-state"
TRAIN_STATE_VERSION = 1
# Fields that may change between a run and its resumption (they do not change the weights).
RESUMABLE_CHANGES = ("data", "out", "steps", "threads", "log_every", "eval_every")
RESUMABLE_CHANGES += ("checkpoint_every", "keep_last")


def _field(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class VQTrainConfig:
    """A tokenizer training run. CLI flags are generated from these fields."""

    data: str = _field("data/emoji", "directory with train.npz / val.npz (scan_core.emoji_data)")
    preset: str = _field("VQ-S", "tokenizer preset from scan_core.config.VQ_PRESETS")
    out: str = _field("runs/vq_s", "run directory: checkpoints, metrics.jsonl, best.safetensors")
    steps: int = _field(20_000, "total optimizer steps (the cosine schedule spans them)")
    batch_size: int = _field(16, "images per step (16 suits 1 CPU thread; raise it on a GPU)")
    lr: float = _field(4e-4, "peak learning rate (AdamW), also the discriminator's")
    min_lr_ratio: float = _field(0.05, "final lr as a fraction of the peak (cosine decay)")
    warmup_steps: int = _field(200, "linear warm-up steps")
    weight_decay: float = _field(0.05, "AdamW decay on conv weights; never on codebook or 1-D")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    grad_clip: float = _field(1.0, "max gradient norm (0 = off)")
    recon_loss: str = _field("l2", "pixel loss: l1 or l2")
    disc_weight: float = _field(0.0, "PatchGAN generator-loss weight (0 = no discriminator)")
    disc_start: int = _field(2_000, "step at which the discriminator switches on")
    disc_adaptive: bool = _field(True, "scale the GAN term by the gradient-norm ratio")
    dead_code_steps: int = _field(200, "restart codes unused for this many steps (0 = never)")
    flip: bool = _field(True, "random horizontal flips")
    log_every: int = _field(50, "steps per log line / code-usage window")
    eval_every: int = _field(250, "steps between held-out PSNR evaluations")
    checkpoint_every: int = _field(250, "steps between checkpoints")
    keep_last: int = _field(3, "step checkpoints kept (best.safetensors is kept apart)")
    seed: int = _field(0, "seed of the weights, batch order, flips and code restarts")
    threads: int = _field(0, "torch CPU threads (0 = torch's default)")

    def __post_init__(self) -> None:
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        for name in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def replace(self, **changes) -> VQTrainConfig:
        return dataclasses.replace(self, **changes)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; no weights were updated at that step."""


# ------------------------------------------------------------------------------ pure helpers


def step_generator(seed: int, stream: str, index: int) -> torch.Generator:
    """An independent generator for (seed, stream, index): resumption needs no stored state."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def batch_indices(step: int, batch_size: int, num_images: int, seed: int) -> Tensor:
    """Indices for ``step``: consecutive slices of one random permutation per epoch, (B,)."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // num_images, positions % num_images
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(num_images, generator=step_generator(seed, "epoch", epoch))
        here = epochs == epoch
        out[here] = order[offsets[here]]
    return out


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def to_model_range(pixels: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], exactly as ``images.pil_to_tensor``."""
    return pixels.float() / 127.5 - 1.0


def codebook_usage(counts: Tensor) -> dict[str, float]:
    """Fraction of codes used and perplexity of a histogram of code assignments (K,)."""
    total = counts.sum()
    if total == 0:
        return {"codes_used": 0.0, "perplexity": 0.0}
    probs = counts.double() / total
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {"codes_used": (counts > 0).double().mean().item(), "perplexity": entropy.exp().item()}


# ------------------------------------------------------------------------------ discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming): 4x4 convs, stride 2 then 1; one real/fake logit per patch.

    Shapes: images (B, 3, H, W) -> logits (B, 1, H / 2^num_down - 2, same).
    """

    def __init__(self, channels: int = 64, num_down: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, num_down + 1):
            stride = 2 if index < num_down else 1
            layers += [
                nn.Conv2d(width, 2 * width, 4, stride, 1, bias=False),
                nn.GroupNorm(32, 2 * width),  # batch-independent, unlike taming's BatchNorm
                nn.LeakyReLU(0.2),
            ]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(recon_loss: Tensor, gan_loss: Tensor, last_layer: Tensor) -> Tensor:
    """||grad recon|| / ||grad gan|| at the decoder's last layer (taming-transformers)."""
    recon_grad = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (recon_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# --------------------------------------------------------------------------------- codebook


def flat_latents(model: VQModel, latents: Tensor) -> Tensor:
    """Latents (B, C, h, w) -> (B*h*w, C) as the quantizer searches them (L2-normalised or not)."""
    flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    return F.normalize(flat, dim=-1) if model.config.codebook_l2_norm else flat


@torch.no_grad()
def restart_dead_codes(
    model: VQModel,
    last_used: Tensor,
    step: int,
    patience: int,
    candidates: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
) -> int:
    """Re-initialise codewords unused for ``patience`` steps from rows of ``candidates`` (N, C).

    Their AdamW moments are zeroed and their age reset. Returns how many codes were restarted.
    """
    dead = (step - last_used) >= patience  # (K,)
    count = int(dead.sum())
    if count == 0 or len(candidates) == 0:
        return 0
    weight = model.quantize.embedding.weight
    picks = torch.randint(len(candidates), (count,), generator=generator)
    weight[dead] = candidates[picks].to(weight.dtype)
    last_used[dead] = step
    for moment in ("exp_avg", "exp_avg_sq"):
        if moment in optimizer.state.get(weight, {}):
            optimizer.state[weight][moment][dead] = 0.0
    return count


def build_optimizer(
    module: nn.Module, config: VQTrainConfig, no_decay: set[str]
) -> torch.optim.AdamW:
    """AdamW with decay on >= 2-D weights only, never on the parameters named in ``no_decay``."""
    decay, plain = [], []
    for name, param in module.named_parameters():
        (plain if param.ndim < 2 or name in no_decay else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


# ---------------------------------------------------------------------------------- files


def atomic_torch_save(obj: object, path: Path) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        torch.save(obj, temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.partial")
    temp.write_text(text)
    os.replace(temp, path)


def config_changes(saved: dict, current: VQTrainConfig) -> list[str]:
    """Differences that would break an exact resumption, as "name: saved -> current"."""
    now = dataclasses.asdict(current)
    return [
        f"{name}: {saved.get(name)!r} -> {now[name]!r}"
        for name in now
        if name not in RESUMABLE_CHANGES and saved.get(name) != now[name]
    ]


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
        torch.manual_seed(config.seed)
        self.model = VQModel(self.vq_config).train()
        self.optimizer = build_optimizer(self.model, config, {"quantize.embedding.weight"})
        self.discriminator, self.disc_optimizer = None, None
        if config.disc_weight > 0:
            self.discriminator = PatchDiscriminator().train()
            self.disc_optimizer = build_optimizer(self.discriminator, config, set())
        size = self.vq_config.codebook_size
        self.last_used = torch.zeros(size, dtype=torch.long)  # step each code was last chosen
        self.window_counts = torch.zeros(size, dtype=torch.long)
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
        return images

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
            z_q, codes = self.model.quantize(self.model.encode_to_latents(to_model_range(pixels)))
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
            "last_used": self.last_used.clone(),
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
        state = torch.load(self.checkpoints / f"{name}.train.pt", weights_only=True)
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


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


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
    parser = argparse.ArgumentParser(prog="python -m scan_core.train_vq", description=__doc__)
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
        f"{torch.get_num_threads()} thread(s)",
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


if __name__ == "__main__":
    raise SystemExit(main())
