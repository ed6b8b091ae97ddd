"""The SCAN training loop (``Trainer``): data, steps, logging, checkpoints, resume, previews.

One process per device; under torchrun every process runs the same loop on its slice of the
data (DDP, or FSDP2 with ``--fsdp``). Only rank 0 writes files. See ``training.train`` for the
command line and ``scan_core.training.state`` for what a checkpoint holds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from scan_core.datasets.codes import CodesDataset, ResumableDistributedSampler
from scan_core.training.distributed import (
    DistInfo,
    full_model_copy,
    full_optimizer_state,
    load_full_optimizer_state,
    resolve_device,
    set_gradient_sync,
    shard_model,
)
from scan_core.training.losses import LossConfig, ScanHeads, scan_loss
from scan_core.training.report import MetricsLogger
from scan_core.training.state import (
    TRAIN_STATE_FORMAT,
    TRAIN_STATE_VERSION,
    CheckpointManager,
    CheckpointSaveError,
    ConfigMismatchError,
    TrainConfig,
    TrainingDiverged,
    WarmupCosine,
    build_model,
    build_optimizer,
    capture_rng,
    config_diff,
    freeze_backbone,
    restore_rng,
    set_train_mode,
)

log = logging.getLogger("scan_core.training.train")


class Trainer:
    """Owns the model, optimizer, data position and RNGs of one process of a run."""

    def __init__(
        self, config: TrainConfig, loss_config: LossConfig, dist_info: DistInfo | None = None
    ) -> None:
        self.config, self.loss_config = config, loss_config
        self.dist = dist_info or DistInfo()
        self.device = resolve_device(config.device, self.dist)
        self.out = Path(config.out)
        self.checkpoints = CheckpointManager(self.out / "checkpoints", config.keep_last)
        if config.head_only and not (config.init_from or config.resume):
            raise ValueError("--head-only trains a head for given weights: pass --init-from")
        self.model = build_model(config, self.device)
        if config.head_only:
            freeze_backbone(self.model)
        set_train_mode(self.model, config.head_only)
        self.model_config = self.model.config
        if not self.model_config.has_quality_head:
            raise ValueError("SCAN training needs arch='scan' (a model with a quality head)")
        self.dataset = CodesDataset(config.data)
        self.dataset.validate(self.model_config, self._tokenizer_sha256())
        self.heads = ScanHeads(self.model)
        self.ema = None
        if config.ema_decay > 0:
            if config.fsdp:
                raise ValueError("EMA under --fsdp is not implemented; drop --ema-decay")
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        resume_state = self._resume_weights()
        self.wrapped = self._wrap()  # before the optimizer: FSDP2 replaces the parameters
        self.optimizer = build_optimizer(self.heads, config)
        schedule = WarmupCosine(config.warmup_steps, config.max_steps, config.min_lr_ratio)
        self.scheduler = LambdaLR(self.optimizer, schedule)
        self._seed_generators()
        self.sampler = ResumableDistributedSampler(
            self.dataset, self.dist.world_size, self.dist.rank, config.seed
        )
        if self.sampler.num_samples < config.batch_size:
            raise ValueError(
                f"each process sees {self.sampler.num_samples} code grids, fewer than one batch "
                f"of {config.batch_size}; lower --batch-size"
            )
        self.step = self.epoch = self.epoch_offset = 0
        self._indices = None
        self._notes: set[str] = set()
        self._saved_step = -1  # the same on every rank, unlike a directory listing
        if resume_state is not None:
            self._restore(resume_state)

    # -- set-up ------------------------------------------------------------------------------

    def _seed_generators(self) -> None:
        seed, rank = self.config.seed, self.dist.rank
        # Different negatives, flips and dropout on every rank; all reproducible from the seed.
        self.generators = {
            "loss": torch.Generator(self.device).manual_seed(seed * 1000 + 2 * rank + 1),
            "data": torch.Generator().manual_seed(seed * 1000 + 2 * rank + 2),
        }
        torch.manual_seed(seed * 1000 + 2 * rank + 3)

    def _tokenizer_sha256(self) -> str | None:
        if not self.config.tokenizer:
            return None
        from scan_core.files import file_sha256

        return file_sha256(self.config.tokenizer)

    def config_dict(self) -> dict[str, dict]:
        return {
            "train": dataclasses.asdict(self.config),
            "loss": dataclasses.asdict(self.loss_config),
            "model": self.model_config.to_dict(),
        }

    def _data_summary(self) -> dict:
        return {"count": len(self.dataset), "tokenizer_sha256": self.dataset.tokenizer_sha256}

    def _resume_weights(self) -> dict | None:
        """With --resume and a checkpoint: check the configs, load the weights, return the
        training state (restored by ``_restore`` once the optimizer exists)."""
        name = self.checkpoints.latest()
        if name and not self.config.resume:
            raise ValueError(
                f"{self.checkpoints.directory} already holds checkpoints (latest {name}); pass "
                "--resume to continue that run, or choose another --out"
            )
        if not (name and self.config.resume):
            if self.config.resume:
                log.info("nothing to resume in %s; starting a new run", self.checkpoints.directory)
            return None
        state = self.checkpoints.load_train_state(name)
        diff = config_diff(state["config"], self.config_dict())
        diff += config_diff({"data": state["data"]}, {"data": self._data_summary()})
        if diff:
            raise ConfigMismatchError(
                f"refusing to resume {name}: these settings differ from the saved run's\n"
                + "\n".join(diff)
                + "\nrestore them, or start a new run with another --out"
            )
        self.model.load_state_dict(self.checkpoints.load_weights(name), strict=True)
        if self.ema is not None:
            self.ema.load_state_dict(self.checkpoints.load_weights(name, "ema"), strict=True)
        log.info("resuming %s at step %d", name, state["step"])
        return state

    def _restore(self, state: dict) -> None:
        if self.config.fsdp:
            load_full_optimizer_state(self.heads, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.epoch_offset = state["epoch_offset"]
        self._saved_step = self.step
        saved_world = len(state["rng"])
        if saved_world == self.dist.world_size:
            restore_rng(state["rng"][self.dist.rank], self.generators)
            return
        # Another world size: an exact continuation is impossible; continue approximately.
        self.epoch_offset = state["epoch_offset"] * saved_world // self.dist.world_size
        log.warning(
            "resumed with %d processes instead of %d: data order and RNG streams continue "
            "approximately",
            self.dist.world_size,
            saved_world,
        )

    def _wrap(self) -> torch.nn.Module:
        if self.config.fsdp:
            if not self.dist.enabled:
                raise ValueError("--fsdp needs several processes: launch with torchrun")
            return shard_model(self.heads, self.model, self.device)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(self.heads, device_ids=ids)
        return self.heads

    # -- one step ----------------------------------------------------------------------------

    def _next_batch(self) -> tuple[Tensor, Tensor]:
        """The next micro-batch of this rank; the data position advances with it."""
        size = self.config.batch_size
        while True:
            if self._indices is None:
                self.sampler.set_position(self.epoch, self.epoch_offset)
                self._indices = iter(self.sampler)
            chunk = list(itertools.islice(self._indices, size))
            if len(chunk) == size:
                self.epoch_offset += size
                codes, labels = self.dataset.batch(chunk, self.generators["data"])
                return codes.to(self.device), labels.to(self.device)
            # The incomplete tail of an epoch is dropped: every step has the same batch size.
            self.epoch, self.epoch_offset, self._indices = self.epoch + 1, 0, None

    def _autocast(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def _check_finite(self, value: Tensor, what: str) -> None:
        """Stop every rank together when ``value`` is NaN/inf, before anything is updated."""
        value = value.detach()
        if hasattr(value, "full_tensor"):  # a DTensor under FSDP
            value = value.full_tensor()
        bad = (~torch.isfinite(value.float())).to(torch.float32).reshape(1)
        if self.dist.enabled:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            latest = self.checkpoints.latest()
            raise TrainingDiverged(
                f"{what} is {float(value):.4g} at step {self.step + 1}; training stopped without "
                f"saving. Last good checkpoint: {latest or 'none saved yet'}"
            )

    def _micro_step(self, sync: bool) -> dict[str, float]:
        """Forward and backward of one micro-batch; gradients sync across ranks when ``sync``."""
        codes, labels = self._next_batch()
        with set_gradient_sync(self.wrapped, sync):  # backward must run inside no_sync too
            with self._autocast():
                # teacher_heads: the plain module, so the no-grad pass skips DDP's bookkeeping
                # (FSDP2 shards in place: there it is the sharded module itself).
                out = scan_loss(
                    self.wrapped,
                    codes,
                    labels,
                    self.model_config,
                    self.loss_config,
                    self.generators["loss"],
                    teacher_heads=self.heads,
                )
            self._check_finite(out.loss, "the loss")
            (out.loss / self.config.grad_accum).backward()
        return out.metrics

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics."""
        self.optimizer.zero_grad(set_to_none=True)
        accum, sums = self.config.grad_accum, {}
        for micro in range(accum):
            for key, value in self._micro_step(sync=micro == accum - 1).items():
                sums[key] = sums.get(key, 0.0) + value / accum
        clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.heads.parameters(), clip)
        self._check_finite(grad_norm, "the gradient norm")
        self.optimizer.step()
        self.scheduler.step()
        self._update_ema()
        self.step += 1
        lrs = self.scheduler.get_last_lr()
        return sums | {"grad_norm": float(grad_norm), "lr": max(lrs)}

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        weight = 1.0 - self.config.ema_decay
        for ema_param, param in zip(self.ema.parameters(), self.model.parameters(), strict=True):
            ema_param.lerp_(param.detach().to(ema_param.dtype), weight)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop_at: int | None = None) -> dict[str, float]:
        """Train until ``max_steps`` (or ``stop_at``); returns the last logged metrics."""
        end = min(self.config.max_steps, stop_at or self.config.max_steps)
        logger = MetricsLogger(self.out, self.config.tensorboard, self.dist.is_main)
        bar = tqdm(
            total=self.config.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (self.config.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        window, last, started = [], {}, time.perf_counter()
        try:
            while self.step < end:
                window.append(self.train_step())
                bar.update(1)
                bar.set_postfix(loss=f"{window[-1]['loss']:.3f}", refresh=False)
                if self.step % self.config.log_every == 0 or self.step == end:
                    last = self._reduce(window)
                    seconds, started = time.perf_counter() - started, time.perf_counter()
                    logger.write(
                        self.step, self.epoch, last, len(window) / seconds * self._global_batch()
                    )
                    window = []
                if (
                    self.step % self.config.checkpoint_every == 0
                    or self.step == self.config.max_steps
                ):
                    self.save()
                if self.config.preview_every and self.step % self.config.preview_every == 0:
                    self.preview()
        finally:
            bar.close()
            logger.close()
        return last

    def _global_batch(self) -> int:
        return self.config.batch_size * self.config.grad_accum * self.dist.world_size

    def _reduce(self, window: list[dict[str, float]]) -> dict[str, float]:
        """Mean of each metric over the window (NaNs skipped), then over ranks."""
        keys = sorted(window[0])
        means = []
        for key in keys:
            values = [row[key] for row in window if not math.isnan(row[key])]
            means.append(sum(values) / len(values) if values else math.nan)
        if self.dist.enabled:
            tensor = torch.tensor(means, dtype=torch.float64, device=self.device)
            dist.all_reduce(tensor)
            means = (tensor / self.dist.world_size).tolist()
        return dict(zip(keys, means, strict=True))

    # -- checkpoints and previews ------------------------------------------------------------

    def train_state(self) -> dict:
        """Everything besides the weights that an exact resume needs (collective under DDP)."""
        rng = capture_rng(self.generators)
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        return {
            "format": TRAIN_STATE_FORMAT,
            "version": TRAIN_STATE_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "epoch_offset": self.epoch_offset,
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "world_size": self.dist.world_size,
            "config": self.config_dict(),
            "data": self._data_summary(),
        }

    def _optimizer_state(self) -> dict:
        if self.config.fsdp:
            return full_optimizer_state(self.heads, self.optimizer)
        return self.optimizer.state_dict()

    def save(self) -> str | None:
        """Write a checkpoint on rank 0; every rank raises CheckpointSaveError if it failed."""
        if self._saved_step == self.step:
            return None  # already saved at this step (e.g. a resumed run that is finished)
        state = self.train_state()
        model = self._full_model()
        error, name = None, None
        if self.dist.is_main:
            try:
                name = self.checkpoints.save(
                    self.step, model, state, self.ema, metadata={"step": self.step}
                )
            except CheckpointSaveError as failure:
                error = str(failure)
        if self.dist.enabled:
            message = [error]
            dist.broadcast_object_list(message, src=0)
            error = message[0]
        if error:
            raise CheckpointSaveError(error)
        self._saved_step = self.step
        return name

    def _full_model(self) -> torch.nn.Module:
        if self.config.fsdp:
            return full_model_copy(self.heads, self.model_config)
        return self.model

    def preview(self) -> Path | None:
        """A PNG grid of samples at T=0 (top row) and T=30 (bottom row); rank 0 only."""
        if not self.dist.is_main:
            return None
        reason = self._preview_blocker()
        if reason:
            if reason not in self._notes:
                log.info("sample previews skipped: %s", reason)
                self._notes.add(reason)
            return None
        from scan_core.training.report import render_preview

        model = self.ema if self.ema is not None else self.model
        path = self.out / "previews" / f"step_{self.step:08d}.png"
        model.eval()
        try:
            render_preview(model, self.config, self.loss_config, path)
        finally:
            set_train_mode(self.model, self.config.head_only)
        return path

    def _preview_blocker(self) -> str | None:
        try:
            import scan_core.sampling.sampler  # noqa: F401
        except ImportError as error:
            return f"scan_core.sampling.sampler is not available ({error})"
        if not self.config.tokenizer:
            return "no --tokenizer to decode codes into pixels"
        if self.config.fsdp:
            return "previews need the full weights on one process; not done under --fsdp"
        return None
