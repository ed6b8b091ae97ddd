"""Studio timing on the loaded model: time to the first streamed frame and to the end of a run,
through the same handler the UI calls (rendering included), batch 1, median after a warm-up.

    python -m tools.timing [--threads 1] [--runs 5] [--num-rounds 16 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from app import handlers
from app.engine import Engine
from app.state import SessionState


def time_runs(engine: Engine, rounds: int, runs: int) -> dict:
    """Median first-frame and full-run seconds over ``runs`` generations (after one warm-up)."""
    d = engine.default_settings()
    name = engine.bundle.class_names[0]
    firsts, totals, frames = [], [], 0
    for seed in range(runs + 1):
        start = time.perf_counter()
        stream = handlers.generate(
            engine,
            SessionState(),
            name,
            seed,
            1,
            d.cfg_scale,
            d.temperature,
            d.top_k,
            d.top_p,
            d.num_steps,
            rounds,
            d.tokens_per_round,
            True,
            0.6,
        )
        next(stream)
        firsts.append(time.perf_counter() - start)
        frames = 1 + sum(1 for _ in stream)
        totals.append(time.perf_counter() - start)
    return {
        "T": rounds,
        "frames": frames,
        "first_frame_s": statistics.median(firsts[1:]),
        "full_run_s": statistics.median(totals[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.timing", description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--num-rounds", type=int, nargs="+", help="T values (default: the card's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine()
    engine.load()
    for rounds in args.num_rounds or [engine.default_settings().num_rounds]:
        print(json.dumps(time_runs(engine, rounds, args.runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
