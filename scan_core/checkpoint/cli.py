"""Command line for checkpoints: ``python -m scan_core checkpoint inspect|convert|average ...``.

Bad input ends with exit code 2 and a one-line ``error: ...`` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from scan_core.checkpoint.convert import average, convert
from scan_core.checkpoint.loading import CheckpointError, inspect

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_QUALITY_HEAD = {"auto": None, "yes": True, "no": False}


def _add_shared(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow .pt files holding arbitrary Python objects (runs their code: trusted only)",
    )
    parser.add_argument("--grid-size", type=int, help="code grid side (not in upstream weights)")
    parser.add_argument("--n-head", type=int, help="attention heads (default dim // 64)")
    parser.add_argument("--image-size", type=int, help="tokenizer image side in pixels")
    parser.add_argument(
        "--quality-head",
        choices=sorted(_QUALITY_HEAD),
        default="auto",
        help="yes: build SCAN (RandAR weights get a fresh head); no: build RandAR; auto: as stored",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scan_core checkpoint",
        description="Inspect SCAN / RandAR / LlamaGen checkpoints, convert them to the "
        "scan-studio format, or average runs of one model. FILE may be a local path or "
        "hf://owner/repo/filename.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("inspect", help="print kind, preset, parameter count, key report")
    show.add_argument("file")
    _add_shared(show)
    write = commands.add_parser("convert", help="write FILE as a scan-studio safetensors file OUT")
    write.add_argument("file")
    write.add_argument("out")
    write.add_argument("--dtype", choices=sorted(_DTYPES), help="cast floating tensors")
    write.add_argument("--card", help="model card as a JSON object, stored in the metadata")
    _add_shared(write)
    mean = commands.add_parser("average", help="write the mean of several checkpoints as OUT")
    mean.add_argument("files", nargs="+", metavar="FILE", help="two or more runs of one model")
    mean.add_argument("--out", required=True, help="output safetensors file")
    mean.add_argument("--trust-pickle", action="store_true", help="allow pickled .pt files")
    return parser


def _run(args: argparse.Namespace) -> str:
    if args.command == "average":
        report = average(args.files, args.out, trust_pickle=args.trust_pickle)
        return f"{report}\nwrote the mean of {len(args.files)} checkpoints to {args.out}"
    shared = dict(
        grid_size=args.grid_size,
        n_head=args.n_head,
        image_size=args.image_size,
        want_quality_head=_QUALITY_HEAD[args.quality_head],
        trust_pickle=args.trust_pickle,
    )
    if args.command == "inspect":
        return str(inspect(args.file, **shared))
    try:
        card = json.loads(args.card) if args.card else None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"--card is not valid JSON: {error}") from None
    if card is not None and not isinstance(card, dict):
        raise CheckpointError("--card must be a JSON object")
    dtype = _DTYPES[args.dtype] if args.dtype else None
    report = convert(args.file, args.out, dtype=dtype, card=card, **shared)
    return f"{report}\nwrote {args.out}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        print(_run(args))
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
