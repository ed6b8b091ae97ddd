"""Seconds per image at several batch sizes, side by side in one run: the evidence for the
scheduler's default maximum batch (``app.batching.MAX_BATCH``).

The studio's model (the embedded checkpoint, or the demo weights without one) generates
``B`` images per run through the sampler alone (no decoding, no rendering), with the model
card's settings and ``--num-rounds`` refinement rounds. Batch sizes take turns within every
repeat, so a change in the machine's load (a shared box) falls on all of them alike; each
figure is the median over ``--runs`` repeats after one warm-up. Prints the machine, then one
JSON line per batch size, then a table.

With ``--together`` each size also runs as that many one-image runs stepped at once
(``scan_core.Together``: separate runs, caches and seeds, their forwards merged), the way the
studio's scheduler serves sessions that arrive at different times, beside the one stacked run.

    python -m tools.batch_sizes [--threads 1] [--runs 5] [--sizes 1 2 4 8 16] [--num-rounds 16]
                                [--together]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from app.engine import Engine
from scan_core import STEP_END, SamplerSettings, ScanSampler, Together, run_all


def machine() -> dict:
    """What ran it: CPU model, cores, vector extensions, torch and its threads."""
    info = {"cpu": platform.processor() or platform.machine(), "logical_cpus": None}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("Flags", "").split())
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    info |= {
        "cpu": fields.get("Model name", info["cpu"]),
        "logical_cpus": fields.get("CPU(s)"),
        "threads_per_core": fields.get("Thread(s) per core"),
        "vector_flags": vector,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return info


def run_together(sampler: ScanSampler, settings: SamplerSettings, size: int, seed: int) -> int:
    """``size`` one-image generations stepped at once; the merged forwards they made."""
    together = Together()
    shared = sampler.with_model(together.model(sampler.model))
    streams = [shared.generate([0], settings, seed=seed + b) for b in range(size)]
    while streams:
        items = together.step(streams)
        for item in items:
            if isinstance(item, BaseException):
                raise item
        streams = [s for s, item in zip(streams, items, strict=True) if item is not STEP_END]
    return together.forwards


def time_batches(
    sampler: ScanSampler,
    settings: SamplerSettings,
    sizes: list[int],
    runs: int,
    together: bool = False,
) -> list[dict]:
    """Median seconds per run and per image for each batch size (after one warm-up each);
    with ``together``, also for as many one-image runs stepped at once."""
    ways = ("stacked", "together") if together else ("stacked",)
    seconds = {(way, size): [] for way in ways for size in sizes}
    for repeat in range(runs + 1):
        for size in sizes:
            for way in ways:
                start = time.perf_counter()
                if way == "stacked":
                    run_all(sampler.generate([0] * size, settings, seed=repeat))
                else:
                    run_together(sampler, settings, size, seed=repeat)
                if repeat:  # repeat 0 warms up
                    seconds[way, size].append(time.perf_counter() - start)
    single = statistics.median(seconds["stacked", sizes[0]]) / sizes[0]
    rows = []
    for size in sizes:
        run = statistics.median(seconds["stacked", size])
        row = {
            "batch": size,
            "run_s": round(run, 4),
            "per_image_s": round(run / size, 4),
            "speedup_per_image": round(single / (run / size), 2),
            "spread_s": round(max(seconds["stacked", size]) - min(seconds["stacked", size]), 4),
        }
        if together:
            merged = statistics.median(seconds["together", size])
            row |= {
                "together_run_s": round(merged, 4),
                "together_per_image_s": round(merged / size, 4),
                "together_over_stacked": round(merged / run, 2),
            }
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.batch_sizes", description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--num-rounds", type=int, default=16, help="refinement rounds T")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--together", action="store_true", help="also time one-image runs stepped at once"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine(device=args.device)
    settings = engine.default_settings().replace(num_rounds=args.num_rounds)
    model = engine.bundle.model_id
    print(json.dumps({"machine": machine(), "model": model, "device": args.device}))
    print(json.dumps({"settings": settings.to_dict()}))
    rows = time_batches(engine.sampler, settings, args.sizes, args.runs, args.together)
    for row in rows:
        print(json.dumps(row))
    extra = " s per image, runs together | together / stacked |" if args.together else ""
    print("| batch | s per run | s per image | per-image speed-up |" + extra)
    print("|---:|---:|---:|---:|" + ("---:|---:|" if args.together else ""))
    for row in rows:
        line = (row["batch"], row["run_s"], row["per_image_s"], row["speedup_per_image"])
        text = "| {} | {:.3f} | {:.3f} | {:.2f}x |".format(*line)
        if args.together:
            text += " {:.3f} | {:.2f} |".format(
                row["together_per_image_s"], row["together_over_stacked"]
            )
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
