"""The speed benchmark's plumbing on a tiny model: every figure present, positive and finite.

Timings and ratios are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config

from scan_core.evaluation import bench
from scan_core.model.network import Transformer
from scan_core.sampling import sampler as sampler_module
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.settings import SamplerSettings

SMALL = {"num_steps": 4, "num_rounds": 2, "tokens_per_round": 2}
CASES = ("raster", "scan_t0", "scan_t30", "scan_t30_exact", "scan_t30_lookahead")
POSITIVE = (
    "raster_s",
    "scan_t0_s",
    "scan_t30_s",
    "scan_t30_exact_s",
    "scan_t30_lookahead_s",
    "speedup_t0",
    "speedup_t30",
    "speedup_t30_exact",
    "speedup_t30_lookahead",
    "step_s",
    "round_s",
    "round_over_step",
    "round_over_step_lookahead",
    "round_over_step_cpu",
    "step_over_floor",
    "raster_step_over_floor",
    "round_over_floor",
    "floor_s",
    "bandwidth_gbps",
    "weight_bytes",
    "peak_memory_mb",
    "parameters",
)


@pytest.fixture(scope="module")
def figures():
    return bench.run_benchmark(tiny_config(), repeats=1, settings=SamplerSettings(**SMALL))


def test_every_figure_is_present_positive_and_finite(figures):
    for key in POSITIVE:
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    for name in CASES:
        assert figures["forwards"][name] > 0
        assert 0 < figures["network_fraction"][name] <= 1.0 + 1e-6
    assert figures["forwards"]["raster"] == 16  # one forward per code of the 4x4 grid
    assert figures["forwards"]["scan_t0"] == SMALL["num_steps"] + 1  # + the scoring chunk
    assert figures["forwards"]["scan_t30_lookahead"] == SMALL["num_steps"] + 1 + 2 + 1
    assert set(figures["cache_bytes"]) == set(figures["speedup_cpu"]) == set(CASES[1:])
    assert all(math.isfinite(v) and v > 0 for v in figures["speedup_cpu"].values())
    assert figures["device"] == "cpu" and figures["dtype"] == "float32"
    json.dumps(figures, allow_nan=False)  # the CLI's last line must be strict JSON


def test_report_names_every_case(figures):
    report = bench.format_report(figures)
    assert all(name in report for name in CASES)


@pytest.mark.parametrize(
    "changes, batch",
    [
        ({}, 1),
        ({"context": "exact"}, 1),
        ({"cfg_scale": 1.0}, 2),
        ({"num_rounds": 0}, 1),
        ({"lookahead": True}, 1),
    ],
)
def test_planned_cache_matches_the_samplers_allocation(monkeypatch, changes, batch):
    """The bench reports the size of the one cache a real generation allocates."""
    made = []

    class RecordedCanvas(sampler_module.Canvas):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(sampler_module, "Canvas", RecordedCanvas)
    config = tiny_config()
    settings = SamplerSettings(**SMALL, cfg_scale=2.0).replace(**changes)
    run_all(ScanSampler(Transformer(config).eval()).generate([1] * batch, settings))
    planned = bench.planned_cache_bytes(config, settings, batch, torch.float32)
    assert len(made) == 1 and made[0].cache.nbytes() == planned


def test_random_model_is_fully_materialised_and_frozen():
    config = tiny_config()
    model = bench.build_random_model(config)
    assert model.num_parameters() == Transformer(config).num_parameters()
    assert not any(p.is_meta or p.requires_grad for p in model.parameters())
    assert model.dis_output.weight.abs().sum() > 0  # a quality head that discriminates


def test_compile_falls_back_to_eager_with_a_message(monkeypatch):
    # Compilation is lazy, so a backend failure surfaces in the warm-up; simulate one there
    # (and skip importing the compiler stack, which alone takes seconds).
    monkeypatch.setattr(torch, "compile", lambda function, **_: function)
    model = bench.build_random_model(tiny_config())
    runs = []

    def warm_up():
        runs.append("compiled" if "forward" in vars(model) else "eager")
        if runs[-1] == "compiled":
            raise RuntimeError("no C compiler found\nmore detail")

    status = bench.warm_up_model(model, warm_up, compile_model=True)
    assert status.startswith("torch.compile failed") and "no C compiler found" in status
    assert "\n" not in status and runs == ["compiled", "eager"]
    assert "forward" not in vars(model)  # the class's eager forward is back
    assert bench.warm_up_model(model, warm_up, compile_model=False).startswith("eager")


def test_cli_last_line_is_the_json_summary(monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_CONFIG", tiny_config())
    argv = ["--quick", "--num-steps", "4", "--num-rounds", "2", "--tokens-per-round", "2"]
    argv += ["--device", "cpu"]
    assert bench.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    assert {"raster_s", "scan_t0_s", "scan_t30_s", "speedup_t0", "speedup_t30"} <= set(figures)
