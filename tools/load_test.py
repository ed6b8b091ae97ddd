"""Bounded load test: N concurrent ``gradio_client`` sessions against a studio on this machine.

    python -m tools.load_test                        # 16 sessions x 5 runs, embedded default model
    python -m tools.load_test --sessions 4 --runs 2 --threads 1
    python -m tools.load_test --url http://127.0.0.1:7860/ --server-pid 1234

Without ``--url`` it launches the studio in this process (the embedded default model, through
``app.serving.launch`` with a private Gradio cache folder); with ``--url`` it drives a running one
(its memory is read when ``--server-pid`` is given). Each session repeats ``--runs`` times:
generate (streamed), scrub to the middle of the timeline, brush a region (regenerate_region)
and export, so the test stops by itself after at most sessions x runs x 4 requests (a cycle whose
generate is refused or fails sends nothing more).

Every request ends as ``ok``, ``busy`` (a clean "Queue is full" refusal) or ``error`` (anything
else: an exception, a failed job, a warning status line, missing outputs). Before the sessions
start, one warm-up cycle runs alone: it gives ``cycle_alone_s``, the time one session's model work
takes without contention. Then (unless ``--no-warm-burst``) every session runs one cycle at once,
not counted: shared runs meet batch sizes a lone session never does, and kernel libraries keep
what they build per shape (bfloat16 matmuls: about 13 MB for each batch size, ``python -m
tools.batch_memory``; bounded by the set of shapes, ``rss_after_solo_warmup_mb`` shows it).
The memory baseline is taken after it, so the growth counts what the load itself leaves behind.
With every model event in one concurrency group, a generate can wait for every other session's
cycle, so the first-frame bound is
``FIRST_FRAME_FACTOR * cycle_alone_s * sessions``. Memory is the server's resident set (psutil if
installed, else /proc): peak, after the warm-up (baseline), at the end, and the growth per run
fitted over the second half of the runs. In this process the clients' own memory counts too, so
for the server alone run ``python app.py`` and pass ``--url`` and ``--server-pid``; the readings
then wait ``--settle`` seconds for the studio's own heap trim. The last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.engine import STUDIO_SETTINGS
from app.process_memory import release_free_memory
from scan_core.sampling.setting_inputs import add_setting_flags, settings_from_args
from scan_core.sampling.settings import SamplerSettings
from tools.memory import MemorySampler, cache_usage, settled_cache_usage

ENDPOINTS = ("generate", "scrub", "regenerate_region", "export")
FIRST_FRAME_FACTOR = 2.0  # p95 time to first frame may be this many full rounds of cycles
MAX_GROWTH_MB = 64.0  # resident memory may end at most this far above the baseline
MAX_GROWTH_PER_RUN_MB = 1.0  # and may not keep climbing by more than this per run
REQUEST_TIMEOUT_S = 600.0
POLL_S = 0.01
LOOK = {"heatmap": True, "opacity": 0.5}
# What a session sends unless flags say otherwise: the embedded model card's K, T and c.
DEFAULTS = SamplerSettings(num_steps=16, num_rounds=16, tokens_per_round=2)


# --------------------------------------------------------------------------------- statistics


@dataclass
class Stats:
    """Outcomes and latencies of every request, shared by the session threads."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {e: [] for e in ENDPOINTS})
    first_frames: list[float] = field(default_factory=list)
    requests: int = 0
    busy: int = 0
    errors: list[str] = field(default_factory=list)
    runs_done: list[tuple[int, float]] = field(default_factory=list)  # (runs so far, RSS MiB)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, endpoint: str, seconds: float, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.requests += 1
            if outcome == "ok":
                self.latencies[endpoint].append(seconds)
            elif outcome == "busy":
                self.busy += 1
            else:
                self.errors.append(f"{endpoint}: {detail}"[:300])


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def growth_per_run(points: list[tuple[int, float]]) -> float | None:
    """Slope (MiB per run) of RSS over completed runs, fitted on the second half of the runs."""
    half = [(runs, rss) for runs, rss in points if rss is not None][len(points) // 2 :]
    if len(half) < 3 or len({runs for runs, _ in half}) < 2:
        return None
    runs, rss = np.array(half, dtype=float).T
    return round(float(np.polyfit(runs, rss, 1)[0]), 4)


# ----------------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class Workload:
    """What every session sends: the generate arguments and the brush canvas files."""

    class_name: str
    settings: dict  # sampler settings by name (STUDIO_SETTINGS)
    background: str
    layer: str


def brush_files(folder: Path, size: int = 256) -> tuple[str, str]:
    """A plain background and a brush layer painting the top-left sixteenth of the image."""
    from PIL import Image

    layer = np.zeros((size, size, 4), np.uint8)
    layer[: size // 4, : size // 4] = (255, 0, 255, 255)
    Image.fromarray(layer).save(folder / "layer.png")
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(folder / "background.png")
    return str(folder / "background.png"), str(folder / "layer.png")


def _is_busy(error: BaseException) -> bool:
    return type(error).__name__ == "QueueError" or "Queue is full" in str(error)


def _status_problem(status) -> str | None:
    if not isinstance(status, str):
        return f"no status line ({type(status).__name__})"
    return status if status.startswith("⚠️") else None


def _stream(client, stats: Stats, endpoint: str, *args, **named) -> tuple | None:
    """Submit a streaming request; record its outcome (and first frame for generate)."""
    start = time.perf_counter()
    job = client.submit(*args, **named, api_name=f"/{endpoint}")
    first = None
    while not job.done():
        if first is None and job.outputs():
            first = time.perf_counter() - start
        if time.perf_counter() - start > REQUEST_TIMEOUT_S:
            job.cancel()
            stats.record(endpoint, 0, "error", "timed out")
            return None
        time.sleep(POLL_S)
    elapsed = time.perf_counter() - start
    try:
        job.result()
    except Exception as error:  # noqa: BLE001 (classified, never re-raised)
        outcome = "busy" if _is_busy(error) else "error"
        stats.record(endpoint, elapsed, outcome, f"{type(error).__name__}: {error}")
        return None
    outputs = job.outputs()
    problem = "no outputs" if not outputs or not job.status().success else None
    problem = problem or _status_problem(outputs[-1][4])
    if problem:
        stats.record(endpoint, elapsed, "error", problem)
        return None
    if endpoint == "generate":
        with stats.lock:
            stats.first_frames.append(first if first is not None else elapsed)
    stats.record(endpoint, elapsed, "ok")
    return outputs[-1]


def _is_file(value) -> bool:
    """A downloaded file's path, or the file's description when downloads are off."""
    if isinstance(value, dict):
        return bool(value.get("url") or value.get("path"))
    return isinstance(value, str) and os.path.exists(value)


def _call(client, stats: Stats, endpoint: str, *args, **named) -> tuple | None:
    start = time.perf_counter()
    try:
        result = client.predict(*args, **named, api_name=f"/{endpoint}")
    except Exception as error:  # noqa: BLE001
        outcome = "busy" if _is_busy(error) else "error"
        stats.record(endpoint, time.perf_counter() - start, outcome, f"{error}")
        return None
    status = result[3] if endpoint == "export" else result[4]
    problem = _status_problem(status)
    if endpoint == "export" and not problem and not _is_file(result[0]):
        problem = "export returned no GIF"
    stats.record(endpoint, time.perf_counter() - start, "error" if problem else "ok", problem)
    return None if problem else result


def run_cycle(client, stats: Stats, work: Workload, seed: int) -> None:
    """One run of a session: generate, scrub to the middle, brush a region, export."""
    from gradio_client import handle_file

    final = _stream(client, stats, "generate", work.class_name, seed, 1, **work.settings, **LOOK)
    if final is None:  # refused (busy) or failed: nothing to scrub, brush or export
        return
    length = final[3]["value"] if isinstance(final[3], dict) else 2
    _call(client, stats, "scrub", max(1, int(length) // 2), **LOOK)
    editor = {
        "background": handle_file(work.background),
        "layers": [handle_file(work.layer)],
        "composite": None,
    }
    _stream(client, stats, "regenerate_region", editor, False, seed, **work.settings, **LOOK)
    _call(client, stats, "export", True, 60, 600)


def session(url, index, runs, work: Workload, stats: Stats, sampler, downloads, first_seed=0):
    from gradio_client import Client

    try:
        client = Client(url, verbose=False, download_files=downloads)
    except Exception as error:  # noqa: BLE001 (the session never started: 4 errors per run)
        for _ in range(runs):
            for endpoint in ENDPOINTS:
                stats.record(endpoint, 0, "error", f"could not connect: {error}")
        return
    for run in range(runs):
        run_cycle(client, stats, work, seed=first_seed + 1000 * index + run)
        rss = sampler.sample()
        with stats.lock:
            stats.runs_done.append((len(stats.runs_done) + 1, rss))
    client.close()


def class_choice(url: str) -> str:
    """The first class the studio's dropdown offers (a remote studio's names are unknown)."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    info = client.view_api(return_format="dict", print_info=False)
    client.close()
    for parameter in info["named_endpoints"]["/generate"]["parameters"]:
        choices = (parameter.get("type") or {}).get("enum")
        if choices:  # the class dropdown is /generate's only parameter with fixed choices
            return choices[0]
    raise RuntimeError(f"{url} offers no class choices on /generate; pass --class-name")


# ---------------------------------------------------------------------------------- the test


def run_load(
    url: str,
    sessions: int,
    runs: int,
    work: Workload,
    pid: int | None = None,
    settle_s: float = 1.0,
    warmup: bool = True,
    warm_burst: bool = True,
) -> dict:
    """Warm up alone (unless ``warmup`` is False), then with every session at once (unless
    ``warm_burst`` is False; module docstring), then ``sessions`` concurrent sessions of
    ``runs`` cycles; the report. ``settle_s``: pause before the baseline and the final memory
    readings (a studio in another process trims its heap every ``serving.TRIM_EVERY_S``; in
    this process the test trims it itself)."""
    from gradio_client import Client

    in_process = pid is None or pid == os.getpid()
    sampler = MemorySampler(pid)
    sampler.start()
    downloads = tempfile.mkdtemp(prefix="scan-load-downloads-")
    try:
        warm, cycle_alone = Stats(), 0.0
        if warmup:
            client = Client(url, verbose=False, download_files=downloads)
            start = time.perf_counter()
            run_cycle(client, warm, work, seed=999_999)
            cycle_alone = time.perf_counter() - start - sum(warm.latencies["scrub"])
            client.close()
        solo = baseline = _settled(sampler, in_process, settle_s)
        if warmup and warm_burst:
            _sessions(url, sessions, 1, work, warm, sampler, downloads, first_seed=500_000)
            baseline = _settled(sampler, in_process, settle_s)
        stats = Stats()
        wall = _sessions(url, sessions, runs, work, stats, sampler, downloads)
        end = _settled(sampler, in_process, settle_s)
    finally:
        sampler.stop()
        import shutil

        shutil.rmtree(downloads, ignore_errors=True)
    report = _report(sessions, runs, stats, warm, cycle_alone, wall, baseline, end, sampler.peak)
    report["rss_after_solo_warmup_mb"] = None if solo is None else round(solo, 1)
    return report


def _settled(sampler, in_process: bool, settle_s: float) -> float | None:
    """The server's resident set once freed memory went back: trimmed here in this process,
    else after ``settle_s`` (the studio trims its own heap)."""
    if in_process:
        release_free_memory()
    time.sleep(settle_s)
    return sampler.sample()


def _sessions(url, count, runs, work, stats, sampler, downloads, first_seed=0) -> float:
    """``count`` concurrent sessions of ``runs`` cycles each; the seconds they took."""
    threads = [
        threading.Thread(
            target=session, args=(url, i, runs, work, stats, sampler, downloads, first_seed)
        )
        for i in range(count)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def _report(sessions, runs, stats, warm, cycle_alone, wall, baseline, end, peak) -> dict:
    bound = FIRST_FRAME_FACTOR * cycle_alone * sessions
    p95_first = percentile(stats.first_frames, 95)
    growth = None if baseline is None or end is None else round(end - baseline, 1)
    per_run = growth_per_run(stats.runs_done)
    report = {
        "sessions": sessions,
        "runs": runs,
        "requests": stats.requests,
        "ok": stats.requests - stats.busy - len(stats.errors),
        "errors": len(stats.errors),
        "busy": stats.busy,
        "warmup_requests": warm.requests,
        "warmup_errors": len(warm.errors),
        "wall_s": round(wall, 1),
        # finished images per second: generations and region regenerations that ended ok
        "images_per_s": round(
            (len(stats.latencies["generate"]) + len(stats.latencies["regenerate_region"])) / wall,
            3,
        ),
        "cycle_alone_s": round(cycle_alone, 3),
        "p50_first_frame_s": percentile(stats.first_frames, 50),
        "p95_first_frame_s": p95_first,
        "first_frame_bound_s": round(bound, 1),
        "latency_s": {
            endpoint: {
                "p50": percentile(values, 50),
                "p95": percentile(values, 95),
                "n": len(values),
            }
            for endpoint, values in stats.latencies.items()
        },
        "rss_baseline_mb": None if baseline is None else round(baseline, 1),
        "rss_end_mb": None if end is None else round(end, 1),
        "rss_peak_mb": round(peak, 1) if peak else None,
        "rss_growth_mb": growth,
        "rss_growth_per_run_mb": per_run,
        "error_samples": stats.errors[:5] + warm.errors[:2],
    }
    report["targets_met"] = {
        "no_errors": not stats.errors and not warm.errors,
        "first_frame": p95_first is not None and p95_first <= bound,
        "memory": growth is not None
        and growth <= MAX_GROWTH_MB
        and (per_run is None or per_run <= MAX_GROWTH_PER_RUN_MB),
    }
    return report


# ------------------------------------------------------------------------------ command line


def serve_default(
    threads: int | None, batching: bool = True, **launch_options
) -> tuple[object, str]:
    """Launch the embedded default studio in this process on a free local port, sharing runs
    among sessions unless ``batching`` is off (as ``app.py`` does everywhere but ZeroGPU);
    ``launch_options`` go to ``app.serving.launch`` (``session_ttl_s``, for one)."""
    import socket

    import torch

    from app import serving
    from app.engine import Engine
    from app.ui import build_demo

    if threads:
        torch.set_num_threads(threads)
    engine = Engine()
    engine.batching = batching
    engine.load()
    demo = build_demo(engine)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serving.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True, **launch_options)
    return demo, f"http://127.0.0.1:{port}/"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running studio (default: launch the embedded one here)")
    parser.add_argument("--server-pid", type=int, help="with --url: read this process's memory")
    parser.add_argument(
        "--settle",
        type=float,
        help="seconds to wait before each memory reading (default: 1; with --url, one heap "
        "trim period of the studio plus 5)",
    )
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5, help="cycles per session")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (in-process only)")
    parser.add_argument("--class-name", help="default: the first class the studio offers")
    parser.add_argument(
        "--batching",
        choices=("on", "off"),
        default="on",
        help="in-process only: share generation runs among sessions (on, as app.py does) or "
        "run every request alone (off, the studio before batching)",
    )
    parser.add_argument(
        "--no-warm-burst",
        dest="warm_burst",
        action="store_false",
        help="take the memory baseline after the lone warm-up cycle, before any shared run "
        "(the growth then includes what kernel libraries keep per batch shape)",
    )
    add_setting_flags(parser, STUDIO_SETTINGS, DEFAULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    cache = None
    if not args.url:  # a private cache folder, so its growth can be measured and removed
        cache = tempfile.mkdtemp(prefix="scan-load-cache-")
        os.environ["GRADIO_TEMP_DIR"] = cache
    from app import serving  # after the environment is set: it imports Gradio

    batching = args.batching == "on"
    demo, url = serve_default(args.threads, batching) if not args.url else (None, args.url)
    pid = os.getpid() if demo is not None else args.server_pid
    try:
        with tempfile.TemporaryDirectory() as folder:
            background, layer = brush_files(Path(folder))
            chosen = settings_from_args(args, DEFAULTS, STUDIO_SETTINGS)
            settings = {name: getattr(chosen, name) for name in STUDIO_SETTINGS}
            work = Workload(args.class_name or class_choice(url), settings, background, layer)
            settle = args.settle
            if settle is None:
                settle = 1.0 if demo is not None else serving.TRIM_EVERY_S + 5.0
            report = run_load(
                url, args.sessions, args.runs, work, pid, settle, warm_burst=args.warm_burst
            )
        report["batching"] = args.batching if demo is not None else "as the server runs"
        if cache:
            report["cache"] = cache_usage(cache)
    finally:
        if demo is not None:
            demo.close()
    if cache:  # Gradio deletes the files it tracks at shutdown; serving sweeps the others
        serving.sweep_image_cache(older_than_s=-1)
        report["cache_after_close"] = settled_cache_usage(cache)
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    for key in ("requests", "ok", "busy", "errors", "p95_first_frame_s", "rss_growth_mb"):
        print(f"{key}: {report[key]}")
    print(json.dumps(report))
    return 0 if report["errors"] == 0 and report["warmup_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
