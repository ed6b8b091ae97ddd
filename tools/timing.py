"""Studio timing on the loaded model: time to the first streamed frame and to the end of a run,
through the same handler the UI calls (rendering included), batch 1, median after a warm-up;
then what one view of a finished run costs to draw: a live frame without and with the score
plot, and the final view.

    python -m tools.timing [--threads 1] [--runs 5] [--num-rounds 16 30] [--num-steps 16 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from app import handlers
from app.engine import STUDIO_SETTINGS, Engine
from app.state import SessionState
from scan_core import run_all
from scan_core.sampling.setting_inputs import add_setting_flags, flag_type, settings_from_args
from scan_core.sampling.settings import FIELDS, SamplerSettings

OTHER_SETTINGS = tuple(name for name in STUDIO_SETTINGS if name != "num_rounds")


def time_runs(engine: Engine, settings: SamplerSettings, runs: int) -> dict:
    """Median first-frame and full-run seconds over ``runs`` generations (after one warm-up)."""
    values = {name: getattr(settings, name) for name in STUDIO_SETTINGS}
    name = engine.bundle.class_names[0]
    firsts, totals, frames = [], [], 0
    for seed in range(runs + 1):
        start = time.perf_counter()
        stream = handlers.generate(engine, SessionState(), name, seed, 1, True, 0.6, **values)
        next(stream)
        firsts.append(time.perf_counter() - start)
        frames = 1 + sum(1 for _ in stream)
        totals.append(time.perf_counter() - start)
    return {
        "T": settings.num_rounds,
        "frames": frames,
        "first_frame_s": statistics.median(firsts[1:]),
        "full_run_s": statistics.median(totals[1:]),
    }


def frame_costs(engine: Engine, settings: SamplerSettings, runs: int) -> dict:
    """Median seconds to draw one view of a finished run (after a warm-up), by kind."""
    trace = run_all(engine.generate([0], settings, seed=0))
    state = SessionState().with_trace(trace)
    kinds = {
        "live_frame_s": {"live": True, "plot": False},
        "live_frame_with_plot_s": {"live": True, "plot": True},
        "final_view_s": {},
    }
    costs = {}
    for kind, options in kinds.items():
        seconds = []
        for _ in range(runs + 1):
            start = time.perf_counter()
            handlers.view(engine, state, True, 0.6, "timing", **options)
            seconds.append(time.perf_counter() - start)
        costs[kind] = statistics.median(seconds[1:])
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.timing", description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    rounds = FIELDS["num_rounds"]
    parser.add_argument(
        rounds.flag, type=flag_type(rounds), nargs="+", help=f"{rounds.help}; one run each"
    )
    add_setting_flags(parser, OTHER_SETTINGS, title="sampler settings (default: the model card's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine()
    engine.load()
    settings = settings_from_args(args, engine.default_settings(), OTHER_SETTINGS)
    for num_rounds in args.num_rounds or [settings.num_rounds]:
        print(json.dumps(time_runs(engine, settings.replace(num_rounds=num_rounds), args.runs)))
    print(json.dumps(frame_costs(engine, settings, args.runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
