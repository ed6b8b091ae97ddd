"""Train SCAN on pre-extracted codes: ``python -m scan_core train`` (or under ``torchrun``).

Examples::

    # CPU smoke run on synthetic codes (tests/conftest sizes)
    python -m scan_core data synthetic --out runs/tiny-codes --preset SCAN-tiny
    python -m scan_core train --data runs/tiny-codes --out runs/tiny --preset SCAN-tiny \
        --max-steps 200 --batch-size 32 --lr 1e-3 --warmup-steps 20

    # 8 GPUs, SCAN-L fine-tuned from RandAR-L
    torchrun --nproc-per-node 8 -m scan_core train --data codes/imagenet256 --out runs/scan-l \
        --preset SCAN-L --init-from randar_0.3b_llamagen_360k_bs_1024_lr_0.0004.safetensors \
        --batch-size 32 --max-steps 50000 --backbone-lr-scale 0.25

    # A quality head for RandAR-L's frozen backbone (the head-only recipe, one GPU)
    python -m scan_core train --data codes/imagenet256 --out runs/randar-l-head --preset SCAN-L \
        --init-from randar_0.3b_llamagen_360k_bs_1024_lr_0.0004.safetensors --head-only \
        --batch-size 64 --max-steps 20000 --lr 1e-3

Every field of ``TrainConfig`` and ``LossConfig`` is a flag (``--max-steps``, ``--no-teacher-
negatives``, ...); ``--help`` lists them with their defaults. Exit codes: 0 done, 2 bad
arguments or refused resume, 3 training diverged (NaN/inf), 4 a checkpoint could not be saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from scan_core.training.distributed import DistInfo, init_distributed, shutdown_distributed
from scan_core.training.losses import LossConfig
from scan_core.training.state import (
    CheckpointSaveError,
    ConfigMismatchError,
    TrainConfig,
    TrainingDiverged,
)

__all__ = ["LossConfig", "TrainConfig", "build_parser", "main", "parse_configs", "train"]

_LOSS_HELP = {
    "eva_weight": "w in L = L_gen + w * L_eva",
    "max_negative_ratio": "negatives per image: r ~ U(0, this) per iteration",
    "random_negatives": "negatives from random codebook indices",
    "permuted_negatives": "negatives from the truth of another cell of the same image",
    "teacher_negatives": "negatives from the model's own prediction (no-grad pass)",
    "teacher_sample": "sample teacher negatives (else argmax)",
    "num_steps": "K sets per image; 0 = N // 4",
    "raster_order": "train in raster order instead of a random order",
    "num_rounds": "T simulated refinement rounds per sequence",
    "tokens_per_round": "c positions per simulated round",
    "refine_focus": "chance a negative cell is first in line for a round",
}
_SCALARS = {"int": int, "float": float, "str": str}


def _add_fields(parser: argparse.ArgumentParser, cls: type, help_texts: dict[str, str]) -> None:
    """One flag per dataclass field: scalars typed, bools as --x/--no-x, tuples as lists."""
    for item in dataclasses.fields(cls):
        flag = "--" + item.name.replace("_", "-")
        text = item.metadata.get("help") or help_texts.get(item.name, "")
        if item.type == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=item.default, help=text
            )
        elif item.type.startswith("tuple["):
            scalar = _SCALARS[item.type[len("tuple[") :].split(",")[0]]
            parser.add_argument(flag, nargs="*", type=scalar, default=item.default, help=text)
        else:
            parser.add_argument(flag, type=_SCALARS[item.type], default=item.default, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scan_core train",
        description="Train a SCAN model (L = L_gen + w L_eva) on extracted VQ codes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_fields(parser.add_argument_group("run"), TrainConfig, {})
    _add_fields(parser.add_argument_group("loss"), LossConfig, _LOSS_HELP)
    parser.add_argument("--log-level", default="INFO", help="logging level on rank 0")
    return parser


def parse_configs(argv: list[str] | None = None) -> tuple[TrainConfig, LossConfig, str]:
    args = vars(build_parser().parse_args(argv))

    def pick(cls):
        values = {f.name: args[f.name] for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    return pick(TrainConfig), pick(LossConfig), args["log_level"]


def train(
    config: TrainConfig, loss_config: LossConfig, dist_info: DistInfo | None = None
) -> dict[str, float]:
    """Run (or resume) a whole training run; returns the last logged metrics."""
    from scan_core.training.loop import Trainer

    if not config.data:
        raise ValueError(
            "--data is required: a code directory from scan_core.datasets.extract_codes"
        )
    return Trainer(config, loss_config, dist_info).run()


def main(argv: list[str] | None = None) -> int:
    try:
        config, loss_config, level = parse_configs(argv)
    except ValueError as error:  # a LossConfig check
        print(f"error: {error}", file=sys.stderr)
        return 2
    dist_info = init_distributed()
    logging.basicConfig(
        level=level if dist_info.is_main else "WARNING",
        format=f"[rank {dist_info.rank}] %(levelname)s %(message)s",
    )
    try:
        metrics = train(config, loss_config, dist_info)
    except (ConfigMismatchError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except CheckpointSaveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 4
    finally:
        shutdown_distributed()
    if dist_info.is_main and metrics:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        print(f"done: {summary}")
    return 0
