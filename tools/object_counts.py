"""Live Python objects and threads in a studio between load tests: the procedure behind the
docs/results.md's object counts (19,313 -> 19,484 -> ...).

    python -m tools.object_counts [--tests 6] [--sessions 4] [--runs 2] [--ttl 60]

The embedded studio and the clients run in this process (``tools.load_test``). After each test
it waits one session lifetime plus one housekeeping period (so idle sessions are forgotten, as
in a real server), collects garbage, and prints one JSON line: live objects, the types that
grew since the last test, Python's allocated blocks, threads and the resident set.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=6)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--ttl", type=float, default=60.0, help="session lifetime (s)")
    args = parser.parse_args()
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="scan-objects-")
    from app import serving
    from tools import load_test
    from tools.memory import memory_mb

    demo, url = load_test.serve_default(1, session_ttl_s=args.ttl)  # as app.py --session-ttl
    background, layer = load_test.brush_files(Path(tempfile.mkdtemp()))
    settings = (4.0, 1.0, 0, 1.0, 16, 16, 2)  # cfg, temperature, top-k, top-p, K, T, c
    work = load_test.Workload(load_test.class_choice(url), settings, background, layer)
    previous: collections.Counter | None = None
    for test in range(args.tests):
        report = load_test.run_load(url, args.sessions, args.runs, work, warmup=test == 0)
        time.sleep(args.ttl + serving.TRIM_EVERY_S + 5)  # idle sessions forgotten, heap trimmed
        gc.collect()
        counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
        grew = (
            {}
            if previous is None
            else {
                name: n - previous[name]
                for name, n in counts.most_common()
                if n - previous[name] > 20
            }
        )
        previous = counts
        print(
            json.dumps(
                {
                    "test": test,
                    "errors": report["errors"],
                    "objects": sum(counts.values()),
                    "grew": dict(list(grew.items())[:12]),
                    "blocks": sys.getallocatedblocks(),
                    "threads": threading.active_count(),
                    "rss_mb": round(memory_mb()[0], 1),
                }
            ),
            flush=True,
        )
    demo.close()


if __name__ == "__main__":
    main()
