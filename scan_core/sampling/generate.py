"""Generate samples in bulk: a PNG and a Trace JSON per image, optional GIFs, an NPZ for FID.

    python -m scan_core generate --model M --tokenizer VQ --classes 1 2 3 --seeds 0 1 --out DIR
    torchrun --nproc-per-node 8 -m scan_core generate ... --npz   # shards jobs over 8 GPUs

Jobs are (class, seed) pairs; image (c, s) is the same whatever the batch size, sharding or
resumption, because the sampler draws image b of a batch from seed + b: a batch holds jobs of
consecutive seeds (``plan_shards``). Each batch is a *shard* with a "done" marker written last,
so a rerun skips finished shards. Output directory:

    run.json                    the run's plan (settings, checkpoints, jobs); a rerun must match
    samples/c0001_s0000.png     the image; .json its Trace; .gif (--gif) every step of the run
    shards/shard_000003.npy     uint8 (n, H, W, 3) images of shard 3, .done marks it finished
    samples.npz                 ADM layout for FID tools: arr_0 (N, H, W, 3) uint8, arr_1 labels

Caveat: ``--patience`` / ``--score-threshold`` stop refinement for a whole batch at once, so with
them an image depends on the batch it was generated in.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scan_core.checkpoint.loading import CheckpointError, load_model, load_tokenizer, pair_mismatch
from scan_core.files import (
    step_frames,
    write_done,
    write_gif,
    write_json,
    write_npy,
    write_png,
)
from scan_core.images import tensor_to_uint8
from scan_core.model.precision import DTYPE_CHOICES, choose_dtype
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.setting_inputs import add_setting_flags, settings_from_args
from scan_core.sampling.settings import SamplerSettings
from scan_core.sampling.shards import (
    GenerateError,
    Job,
    RunDir,
    check_manifest,
    distributed_env,
    is_done,
    make_jobs,
    merge_shards,
    plan_shards,
    shard_indices,
    wait_for_shards,
)
from scan_core.sampling.trace import Trace

MANIFEST_FORMAT = "scan-generate"


@dataclass(frozen=True)
class GifOptions:
    scale: int = 0  # nearest-neighbour upscale; 0: the smallest reaching 256 px
    duration_ms: int = 80
    hold_last_ms: int = 1500


# ------------------------------------------------------------------------------ images and GIFs


@torch.inference_mode()
def decode_images(tokenizer, codes: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Code grids (B, N) -> uint8 images (B, H, W, 3); decoded ``chunk`` grids at a time."""
    device = next(tokenizer.parameters()).device
    parts = [
        tensor_to_uint8(
            tokenizer.decode_codes(torch.as_tensor(codes[i : i + chunk], device=device))
        )
        for i in range(0, len(codes), chunk)
    ]
    return np.concatenate(parts)


def step_grids(trace: Trace) -> np.ndarray:
    """(S, B, N) codes after every step (-1 where a cell has no code yet), built incrementally."""
    codes = trace.start_codes.copy()
    rows = np.arange(trace.batch_size)[:, None]
    grids = []
    for step in trace.steps:
        keep = step.accepted
        codes[np.broadcast_to(rows, keep.shape)[keep], step.positions[keep]] = step.codes[keep]
        grids.append(codes.copy())
    return np.stack(grids)


def render_frames(tokenizer, grids: np.ndarray, scale: int = 0) -> list[np.ndarray]:
    """One GIF frame per step of one image, from its code grids (S, N) (-1: no code yet)."""
    known = grids >= 0
    images = decode_images(tokenizer, np.where(known, grids, 0))  # (S, H, W, 3)
    side = math.isqrt(grids.shape[1])
    return step_frames(images, known.reshape(-1, side, side), scale)


# ---------------------------------------------------------------------------------- generation


def generate_shard(
    sampler: ScanSampler,
    tokenizer,
    jobs: list[Job],
    settings: SamplerSettings,
    run_dir: RunDir,
    index: int,
    gif: GifOptions | None = None,
    rank: int = 0,
) -> np.ndarray:
    """Generate one shard, write its files, then its "done" marker; return its images."""
    classes = [job.class_id for job in jobs]
    trace = run_all(sampler.generate(classes, settings, seed=jobs[0].seed))
    images = decode_images(tokenizer, trace.codes_at(-1))
    grids = step_grids(trace) if gif else None
    for b, job in enumerate(jobs):
        # select() records seed + b, which is job.seed: a shard holds consecutive seeds.
        write_json(trace.select(b).to_json(), run_dir.sample(job, ".json"))
        if gif is not None:
            frames = render_frames(tokenizer, grids[:, b], gif.scale)
            write_gif(frames, run_dir.sample(job, ".gif"), gif.duration_ms, gif.hold_last_ms)
        write_png(images[b], run_dir.sample(job, ".png"))
    write_npy(images, run_dir.shard(index, ".npy"))
    write_done(
        run_dir.shard(index, ".done"), {"jobs": [[j.class_id, j.seed] for j in jobs], "rank": rank}
    )
    return images


# ------------------------------------------------------------------------------------ CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scan_core generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model checkpoint (path or hf://...)")
    parser.add_argument("--tokenizer", required=True, help="VQ tokenizer checkpoint")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--classes", type=int, nargs="+", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK if available")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="the model's precision (default auto: bfloat16 where the GPU or CPU computes it "
        "natively, else float32; the same seed gives slightly different images in each)",
    )
    parser.add_argument("--npz", action="store_true", help="write samples.npz at the end")
    parser.add_argument("--merge", action="store_true", help="only build samples.npz")
    parser.add_argument(
        "--merge-timeout",
        type=float,
        default=24 * 3600,
        help="seconds rank 0 waits for the other ranks before merging",
    )
    parser.add_argument("--gif", action="store_true", help="a GIF of every step per sample")
    parser.add_argument("--gif-scale", type=int, default=0, help="0: auto (>= 256 px wide)")
    parser.add_argument("--gif-duration", type=int, default=80, help="ms per frame")
    parser.add_argument("--gif-hold", type=int, default=1500, help="ms on the last frame")
    add_setting_flags(parser, defaults=SamplerSettings(), title="sampler settings")
    args = parser.parse_args(argv)
    for name in ("batch_size", "gif_duration", "gif_hold"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.gif_scale < 0 or min(args.seeds) < 0:
        parser.error("--gif-scale and --seeds must be >= 0")
    if not args.classes:
        parser.error("give at least one class id with --classes")
    return args


def _device(spec: str, local_rank: int) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _where(spec: str) -> str:
    return spec if spec.startswith("hf://") else str(Path(spec).resolve())


def _manifest(args: argparse.Namespace, settings: SamplerSettings, jobs: list[Job]) -> dict:
    gif = [args.gif_scale, args.gif_duration, args.gif_hold] if args.gif else None
    return {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "model": _where(args.model),
        "tokenizer": _where(args.tokenizer),
        "settings": settings.to_dict(),
        "batch_size": args.batch_size,
        "gif": gif,
        # Only a pinned precision: runs written before --dtype existed stay resumable.
        **({"dtype": args.dtype} if args.dtype != "auto" else {}),
        "jobs": [[j.class_id, j.seed] for j in jobs],
    }


def _load(args: argparse.Namespace, device: torch.device, settings: SamplerSettings):
    """Model, tokenizer and sampler, with every check a user can fail reported in one line."""
    dtype, why = choose_dtype(args.dtype, device)
    model, _ = load_model(args.model, device=device, dtype=dtype)
    tokenizer, _ = load_tokenizer(args.tokenizer, device=device)
    config, mismatch = model.config, pair_mismatch(model.config, tokenizer.config)
    if mismatch:
        raise GenerateError(mismatch)
    bad = [c for c in args.classes if not 0 <= c <= config.num_classes]
    if bad:
        raise GenerateError(
            f"class ids {bad} out of range [0, {config.num_classes - 1}] "
            f"({config.num_classes} = unconditional)"
        )
    sampler = ScanSampler(model, model_id=Path(args.model).name, device=device)
    try:
        sampler.resolve(settings)  # the scorer too: "head" needs a quality head
    except ValueError as error:
        raise GenerateError(str(error)) from None
    print(f"precision: {why}", file=sys.stderr)  # once the run is known to be valid
    return sampler, tokenizer


def run(args: argparse.Namespace) -> int:
    """Generate this rank's unfinished shards, then (rank 0, --npz) merge; return exit code."""
    settings = settings_from_args(args, SamplerSettings())
    rank, world, local_rank = distributed_env()
    jobs = make_jobs(args.classes, args.seeds)
    shards = plan_shards(jobs, args.batch_size)
    run_dir = RunDir(args.out)
    manifest = _manifest(args, settings, jobs)
    new_run = check_manifest(run_dir, manifest)
    if args.merge:
        print(merge_shards(run_dir, shards))
        return 0
    mine = shard_indices(len(shards), rank, world)
    todo = [i for i in mine if not is_done(run_dir, i, shards[i])]
    if todo:
        sampler, tokenizer = _load(args, _device(args.device, local_rank), settings)
        if new_run:  # only once the request is known to be valid
            write_json(manifest, run_dir.manifest)
        gif = GifOptions(args.gif_scale, args.gif_duration, args.gif_hold) if args.gif else None
        total = sum(len(shards[i]) for i in mine)
        done = total - sum(len(shards[i]) for i in todo)
        desc = f"rank {rank}/{world}" if world > 1 else "generate"
        with tqdm(total=total, initial=done, unit="img", desc=desc) as bar:
            for index in todo:
                generate_shard(
                    sampler, tokenizer, shards[index], settings, run_dir, index, gif, rank
                )
                bar.update(len(shards[index]))
    if args.npz and rank == 0:
        wait_for_shards(run_dir, shards, args.merge_timeout)
        print(merge_shards(run_dir, shards))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        return run(args)
    except (GenerateError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # unwritable --out, full disk, ...: the OS's one-line reason
        print(f"error: {error.strerror or error}: {error.filename or ''}", file=sys.stderr)
        return 2
