"""SCAN Studio launcher: ``python app.py [--model PATH] [--tokenizer PATH] [--port 7860]``.

Thin on purpose: parse flags, build the engine, load it once (so a wrong local path fails here,
not in the first request), build the UI and serve it on localhost with the limits of
``app/serving.py``. Never ``share=True``. Only the checkpoints named here (or found in
``checkpoints/``) are ever loaded: no request can name a file. ``.pt`` files load with
``weights_only=True``; one that holds pickled objects needs ``--trust-pickle``.
"""

from __future__ import annotations

import argparse
import os

try:  # ZeroGPU on Hugging Face Spaces; must be imported before CUDA is initialised
    import spaces

    gpu = spaces.GPU
except ImportError:  # everywhere else: run handlers as they are (and Stop stops them in place)
    gpu = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        help="SCAN checkpoint: a local file, or hf://owner/repo/file "
        "(needs huggingface_hub; falls back to the embedded default, with a note)",
    )
    parser.add_argument("--tokenizer", help="VQ tokenizer checkpoint (same forms as --model)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="let .pt checkpoints that hold pickled Python objects run their code (only for "
        "files from a source you trust; safetensors and plain .pt state dicts never need it)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),  # scan_core.DTYPE_CHOICES (keeps --help fast)
        default="auto",
        help="the model's precision (default auto: bfloat16 where the GPU or CPU computes it "
        "natively, which is faster, else float32)",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; Spaces sets "
        "GRADIO_SERVER_NAME)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's own; "
        "1 is fastest for small models on a busy CPU)",
    )
    parser.add_argument(
        "--session-ttl",
        type=float,
        default=3600.0,  # app.serving.SESSION_TTL_S (not imported here: --help stays fast)
        help="seconds a session's studio state is kept after its last change (default: one "
        "hour); a busy public server may want less, so idle sessions free their memory sooner",
    )
    parser.add_argument(
        "--batching",
        choices=("on", "off"),
        default="on",
        help="on (default): concurrent sessions' model work shares batched forwards; "
        "off: one run at a time, for comparison (ZeroGPU is always off: a process per call)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=16,  # app.batching.MAX_BATCH (not imported here: --help stays fast)
        help="with batching on: images that step together at most (default 16); more requests "
        "wait for room. A request of more images than this runs when nothing else does",
    )
    parser.add_argument(
        "--max-runs",
        type=int,
        default=8,  # app.batching.MAX_RUNS (not imported here: --help stays fast)
        help="with batching on: runs that step together, their forwards merged (default 8; "
        "compatible requests arriving together stack into one run; a newcomer joins at the "
        "next step); "
        "1: one run at a time, a newcomer waits for the run going",
    )
    args = parser.parse_args(argv)
    for name in ("max_batch", "max_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 10 <= args.session_ttl <= 7 * 24 * 3600:
        parser.error("--session-ttl must be between 10 seconds and 7 days")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from app import serving
    from app.engine import Engine
    from app.ui import build_demo
    from scan_core import CheckpointError

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(
        args.model, args.tokenizer, args.device, trust_pickle=args.trust_pickle, dtype=args.dtype
    )
    # ZeroGPU runs each call in a process of its own, so calls cannot meet in one batch there.
    engine.batching = gpu is None and args.batching == "on"
    engine.scheduler.max_runs, engine.scheduler.max_batch = args.max_runs, args.max_batch
    try:
        bundle = engine.load()
    except CheckpointError as error:  # a wrong local path: say why in one line, no traceback
        raise SystemExit(f"error: {error}") from None
    print(f"precision: {engine.precision}")
    for note in bundle.notes:
        print(f"note: {note}")
    demo = build_demo(engine, gpu=gpu)
    serving.launch(demo, args.host, args.port, session_ttl_s=args.session_ttl)


if __name__ == "__main__":
    main()
