"""Native memory the model keeps after runs at each batch size: the evidence for why a studio
that shares runs among sessions settles higher than one that runs them one at a time.

The studio's model generates one run at each batch size in turn (``--sizes``), through the
sampler alone, then the same sizes again. After each run it collects garbage, trims the heap and
reads the C heap's live blocks (``tools.memory.heap_mb``) and the resident set. Kernel libraries
keep what they build for each input shape (oneDNN primitives and their weight layouts for
bfloat16 matmuls), so live memory rises with every new batch size and stays put on the second
pass: bounded by the set of shapes, not a leak. Prints the machine, one JSON line per run, and a
table.

    python -m tools.batch_memory [--dtype bfloat16] [--sizes 1 2 3 4 5 6 7 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json

import torch

from app.engine import Engine
from app.process_memory import release_free_memory
from scan_core import run_all
from tools.batch_sizes import machine
from tools.memory import heap_mb, memory_mb


def reading(label: str, batch: int | None) -> dict:
    release_free_memory()
    heap = heap_mb() or {}
    rss, _ = memory_mb()
    return {
        "after": label,
        "batch": batch,
        "heap_in_use_mb": heap.get("in_use"),
        "heap_free_mb": heap.get("free"),
        "rss_mb": None if rss is None else round(rss, 1),
    }


def measure(engine: Engine, sizes: list[int], num_rounds: int) -> list[dict]:
    """Readings after loading, then after a run of each size, twice over."""
    settings = engine.default_settings().replace(num_rounds=num_rounds)
    rows = [reading("load", None)]
    for label in ("first pass", "second pass"):
        for size in sizes:
            run_all(engine.sampler.generate([0] * size, settings, seed=size))
            rows.append(reading(label, size))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.batch_memory", description=__doc__)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument("--num-rounds", type=int, default=16, help="refinement rounds T")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine(dtype=args.dtype)
    engine.load()
    print(
        json.dumps(
            {"machine": machine(), "model": engine.bundle.model_id, "precision": engine.precision}
        )
    )
    rows = measure(engine, args.sizes, args.num_rounds)
    for row in rows:
        print(json.dumps(row))
    print("| after | batch | C heap in use (MB) | RSS (MB) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        cells = (row["after"], row["batch"] or "", row["heap_in_use_mb"], row["rss_mb"])
        print("| {} | {} | {} | {} |".format(*cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
