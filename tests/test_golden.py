"""Golden slices: the sampler's exact output for fixed weights and seeds, committed as JSON.

Two files under ``tests/golden/``:
- ``sampler_tiny.json``: a tiny model with seeded weights (``conftest.random_model``), K = 4 sets,
  T = 2 rounds of c = 2 cells, in every path through the sampler: cached and exact context,
  lookahead, rescoring, a continued refinement, a branch from mid-generation, a forced region
  regeneration with refinement inside it, and scoring a given grid.
- ``sampler_shipped.json``: ``checkpoints/scan-emoji.safetensors`` with its card's recommended
  settings, the first image (class 0) at seed 0.

Every step's kind, positions, codes and accept flags must match exactly; its probabilities and
the quality scores after it to 1e-5 (CPUs with other vector extensions may differ in the last
bits). A refactor that changes none of the sampler's behaviour leaves these files valid.

To regenerate after an intended change of behaviour, run
``SCAN_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py`` (the tests write the files and
skip), then review ``git diff tests/golden`` and commit it with the change that explains it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import random_model, tiny_config

from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.settings import SamplerSettings, recommended_settings
from scan_core.sampling.trace import Trace

GOLDEN = Path(__file__).parent / "golden"
SHIPPED = Path(__file__).parent.parent / "checkpoints" / "scan-emoji.safetensors"
UPDATE = os.environ.get("SCAN_UPDATE_GOLDEN") == "1"
TOLERANCE = 1e-5
TINY = SamplerSettings(num_steps=4, num_rounds=2, tokens_per_round=2, cfg_scale=2.0)
CLASSES = [3, 4]


def _floats(array: np.ndarray) -> list:
    """Rows of floats for JSON, NaN as null, at full float32 precision."""
    return [[None if math.isnan(v) else float(v) for v in row] for row in array.tolist()]


def _slice(trace: Trace) -> dict:
    """What a golden case holds: every step's draws, accept flags and scores, no settings."""
    steps = [
        {
            "kind": step.kind,
            "positions": step.positions.tolist(),
            "codes": step.codes.tolist(),
            "accepted": step.accepted.tolist(),
            "probs": _floats(step.probs),
            "scores": _floats(step.scores),
        }
        for step in trace.steps
    ]
    return {"final_codes": trace.codes_at(-1).tolist(), "steps": steps}


def _dumps(cases: dict[str, dict]) -> str:
    """JSON with one line per step, so a regenerated file's diff shows which steps changed."""
    blocks = []
    for name, case in cases.items():
        steps = ",\n".join(f"   {json.dumps(step)}" for step in case["steps"])
        head = f' "final_codes": {json.dumps(case["final_codes"])},\n "steps": [\n'
        blocks.append(f"{json.dumps(name)}: {{\n{head}{steps}\n ]}}")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def _unfloat(rows: list) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in rows])


def _compare(name: str, got: dict, want: dict) -> None:
    where = f"golden case {name!r}"
    assert [s["kind"] for s in got["steps"]] == [s["kind"] for s in want["steps"]], where
    for index, (a, b) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        at = f"{where}, step {index}"
        for key in ("positions", "codes", "accepted"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{at}: {key}")
        for key in ("probs", "scores"):
            np.testing.assert_allclose(
                _unfloat(a[key]), _unfloat(b[key]), rtol=0, atol=TOLERANCE, err_msg=f"{at}: {key}"
            )
    np.testing.assert_array_equal(got["final_codes"], want["final_codes"], err_msg=where)


def _check(file_name: str, cases: dict[str, Trace]) -> None:
    """Compare with the committed file, or (SCAN_UPDATE_GOLDEN=1) write it and skip."""
    path = GOLDEN / file_name
    got = {name: _slice(trace) for name, trace in cases.items()}
    if UPDATE:
        path.write_text(_dumps(got))
        pytest.skip(f"wrote {path.name}; review the diff before committing")
    want = json.loads(path.read_text())
    assert sorted(got) == sorted(want), "golden cases differ from the committed file"
    for name in want:
        _compare(name, got[name], want[name])


def _tiny_cases(sampler: ScanSampler) -> dict[str, Trace]:
    cached = run_all(sampler.generate(CLASSES, TINY, seed=0))
    base = run_all(sampler.generate(CLASSES, TINY.replace(num_rounds=0), seed=0))
    region = np.zeros((4, 4), dtype=bool)
    region[1:3, 1:3] = True
    grid = (np.arange(32).reshape(2, 16) * 7) % 64
    return {
        "cached": cached,
        "exact": run_all(sampler.generate(CLASSES, TINY.replace(context="exact"), seed=0)),
        "lookahead": run_all(sampler.generate(CLASSES, TINY.replace(lookahead=True), seed=0)),
        "rescore": run_all(sampler.generate(CLASSES, TINY.replace(rescore=True), seed=0)),
        "refine_again": run_all(sampler.refine(cached, TINY, seed=1)),
        "branch_mid_generation": run_all(sampler.refine(cached.truncated(1), TINY, seed=2)),
        "regenerate_region": run_all(
            sampler.regenerate_region(base, region, TINY, seed=3, refine_inside=True)
        ),
        "score_grid": sampler.score(grid, CLASSES, TINY, seed=4),
    }


def test_tiny_model_matches_its_golden_slices():
    sampler = ScanSampler(random_model(tiny_config(), seed=1234), model_id="golden-tiny")
    _check("sampler_tiny.json", _tiny_cases(sampler))


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped checkpoint is not in this checkout")
def test_shipped_model_first_image_matches_its_golden_slice():
    from scan_core.checkpoint.loading import load_model

    model, report = load_model(SHIPPED)
    settings = recommended_settings(report.card, model.config.num_tokens)
    sampler = ScanSampler(model)
    # The card's context is "cached"; "exact" adds the rebuild, and this image has a round
    # that accepts nothing, which rewinds the cache instead.
    cases = {
        "class_0_seed_0": run_all(sampler.generate([0], settings, seed=0)),
        "class_0_seed_0_exact": run_all(
            sampler.generate([0], settings.replace(context="exact"), seed=0)
        ),
    }
    _check("sampler_shipped.json", cases)
