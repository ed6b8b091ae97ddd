"""Benchmark results: the record of one timed case, the figures derived, the text report.

``scan_core.evaluation.bench`` fills one :class:`CaseResult` per case; :func:`case_figures`,
:func:`ratio_figures` and :func:`roofline_figures` turn them into the JSON figures that
:func:`format_report` tabulates.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field

from scan_core.evaluation.machine import describe_machine
from scan_core.evaluation.roofline import roofline_seconds
from scan_core.sampling.settings import SamplerSettings

CASE_NAMES = ("raster", "scan_t0", "scan_t30", "scan_t30_exact", "scan_t30_lookahead")


@dataclass
class CaseResult:
    """One timed configuration: times per repeat and per step, forwards, memory, acceptance."""

    name: str
    seconds: list[float] = field(default_factory=list)  # wall time per repeat
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time per repeat
    step_seconds: dict[str, list[float]] = field(default_factory=dict)  # step kind -> times
    step_cpu_seconds: dict[str, list[float]] = field(default_factory=dict)  # the same, CPU
    # step kind -> per step, the matmul FLOPs of each of its forwards (aligned with step_seconds)
    step_flops: dict[str, list[list[int]]] = field(default_factory=dict)
    forwards: int = 0  # per repeat
    network_seconds: float = 0.0  # per repeat: transformer forwards and output heads
    cache_bytes: int = 0
    memory_growth_bytes: int = 0  # memory after the last step minus after the first
    proposed: int = 0  # refinement candidates, per repeat
    accepted: int = 0

    def median_step(self, kind: str, cpu: bool = False) -> float:
        times = (self.step_cpu_seconds if cpu else self.step_seconds).get(kind, [])
        return statistics.median(times) if times else math.nan


def case_figures(results: dict[str, CaseResult], cases: dict[str, SamplerSettings]) -> dict:
    """Per-case medians, speedups over raster, forwards, and where the time went."""
    raster = statistics.median(results["raster"].seconds)
    out: dict = {"forwards": {}, "network_fraction": {}, "cpu_s": {}}
    for name, case in results.items():
        out[f"{name}_s"] = statistics.median(case.seconds)
        out["cpu_s"][name] = statistics.median(case.cpu_seconds)
        out["forwards"][name] = case.forwards
        out["network_fraction"][name] = case.network_seconds / case.seconds[-1]
        if name == "raster":
            continue
        out[name.replace("scan_", "speedup_")] = raster / out[f"{name}_s"]
        # CPU time is what a busy machine distorts least (other processes steal wall time).
        out.setdefault("speedup_cpu", {})[name] = out["cpu_s"]["raster"] / out["cpu_s"][name]
        out.setdefault("cache_bytes", {})[name] = case.cache_bytes
        out.setdefault("memory_growth_bytes", {})[name] = case.memory_growth_bytes
        if case.proposed:
            out.setdefault("accept_rate", {})[name] = case.accepted / case.proposed
    settings = cases["scan_t30_exact"]
    base = settings.num_steps + 1 + 2 * settings.num_rounds  # forwards without rebuilds
    out["exact_rebuilds"] = results["scan_t30_exact"].forwards - base
    return out


def ratio_figures(results: dict[str, CaseResult], floor_s: float) -> dict:
    """Refinement round vs generation step, and step times as multiples of the floor."""
    step = results["scan_t0"].median_step("generate")
    round_s = results["scan_t30"].median_step("refine")
    lookahead = results["scan_t30_lookahead"].median_step("refine")
    raster_step = results["raster"].median_step("raster")
    return {
        "step_s": step,
        "round_s": round_s,
        "raster_step_s": raster_step,
        "round_over_step": round_s / step,
        "round_over_step_lookahead": lookahead / step,
        "round_over_step_cpu": results["scan_t30"].median_step("refine", cpu=True)
        / results["scan_t0"].median_step("generate", cpu=True),
        "step_over_floor": step / floor_s,
        "raster_step_over_floor": raster_step / floor_s,
        "round_over_floor": round_s / floor_s,
    }


# figure prefix -> (case, step kind): the steps that ratio_figures and roofline_figures compare
STEP_KINDS = {
    "raster_step": ("raster", "raster"),
    "step": ("scan_t0", "generate"),
    "round": ("scan_t30", "refine"),
}


def roofline_figures(
    results: dict[str, CaseResult],
    weight_bytes: int,
    bandwidth: float,
    peak_flops: float,
    threads: int = 1,
) -> dict:
    """Each step kind against its roofline floor (``roofline.roofline_seconds``), per step.

    ``{prefix}_over_roofline`` is the median over steps of time / that step's floor (the
    floors differ: a SCAN step's rows follow the schedule); ``{prefix}_roofline_s`` and
    ``{prefix}_gflop`` are the medians of the floors and of the matmul GFLOP per step;
    ``over_bandwidth_floor[prefix]`` is the same median against the bandwidth-only floor of the
    step's forwards (a round runs two: ``round_over_floor`` counts one); ``compute_bound[prefix]``
    is the share of those forwards that the matmul peak, not the bandwidth, bounds.
    ``over_roofline_cpu[prefix]`` uses CPU seconds / ``threads`` for the time: on a shared
    machine the nearest to an idle machine's wall time (exact for one thread; with more it
    leaves out the time threads wait for each other).
    """
    out: dict = {"compute_bound": {}, "over_bandwidth_floor": {}, "over_roofline_cpu": {}}
    streaming = weight_bytes / bandwidth
    for prefix, (case, kind) in STEP_KINDS.items():
        result = results[case]
        steps = result.step_flops.get(kind, [])
        floors = [roofline_seconds(calls, weight_bytes, bandwidth, peak_flops) for calls in steps]
        wall = _ratios(result.step_seconds.get(kind, []), floors)
        cpu = _ratios([t / threads for t in result.step_cpu_seconds.get(kind, [])], floors)
        out[f"{prefix}_over_roofline"] = _median(wall)
        out["over_roofline_cpu"][prefix] = _median(cpu)
        out[f"{prefix}_roofline_s"] = _median(floors)
        out[f"{prefix}_gflop"] = _median([sum(step) / 1e9 for step in steps])
        streamed = _ratios(result.step_seconds.get(kind, []), [len(s) * streaming for s in steps])
        out["over_bandwidth_floor"][prefix] = _median(streamed)
        bound = [flops / peak_flops > streaming for step in steps for flops in step]
        out["compute_bound"][prefix] = sum(bound) / len(bound) if bound else math.nan
    return out


def _ratios(times: list[float], floors: list[float]) -> list[float]:
    return [t / f for t, f in zip(times, floors, strict=True)]


def _threads(figures: dict) -> str:
    return f"{figures['threads']} thread{'' if figures['threads'] == 1 else 's'}"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def format_report(figures: dict) -> str:
    """A human-readable table of ``run_benchmark``'s figures."""
    settings, mb = figures["settings"], 2**20
    lines = [
        f"SCAN benchmark: {figures['preset']} ({figures['parameters'] / 1e6:.1f}M params), "
        f"{figures['dtype']} on {figures['device']} ({_threads(figures)}), batch 1, "
        f"CFG {settings['cfg_scale']}, median of {figures['repeats']}; K={settings['num_steps']}"
        f" T={settings['num_rounds']} c={settings['tokens_per_round']}",
        f"{'case':<20}{'forwards':>9}{'wall s':>9}{'cpu s':>9}{'x raster':>9}{'(cpu)':>7}"
        f"{'network':>9}{'KV cache MB':>12}{'accepted':>9}",
    ]
    for name in CASE_NAMES:
        speed = figures.get(name.replace("scan_", "speedup_"), 1.0)
        accept = figures.get("accept_rate", {}).get(name)
        lines.append(
            f"{name:<20}{figures['forwards'][name]:>9}{figures[name + '_s']:>9.2f}"
            f"{figures['cpu_s'][name]:>9.2f}{speed:>9.2f}"
            f"{figures.get('speedup_cpu', {}).get(name, 1.0):>7.2f}"
            f"{figures['network_fraction'][name]:>9.0%}"
            f"{figures.get('cache_bytes', {}).get(name, 0) / mb:>12.1f}"
            f"{'' if accept is None else f'{accept:.0%}':>9}"
        )
    lines += [
        f"generation step {figures['step_s'] * 1e3:.1f} ms, refinement round "
        f"{figures['round_s'] * 1e3:.1f} ms (round/step {figures['round_over_step']:.2f}, cpu "
        f"{figures['round_over_step_cpu']:.2f}, "
        f"lookahead {figures['round_over_step_lookahead']:.2f}), raster step "
        f"{figures['raster_step_s'] * 1e3:.1f} ms; exact rebuilds {figures['exact_rebuilds']}",
        f"bandwidth {figures['bandwidth_gbps']:.1f} GB/s, streamed weights "
        f"{figures['weight_bytes'] / mb:.0f} MB -> floor {figures['floor_s'] * 1e3:.1f} ms per "
        f"forward; step {figures['step_over_floor']:.1f}x floor, raster step "
        f"{figures['raster_step_over_floor']:.1f}x, round {figures['round_over_floor']:.1f}x",
        *roofline_lines(figures),
        f"peak memory {figures['peak_memory_mb']:.0f} MB ({figures['peak_memory_kind']}); growth "
        "first->last step (MB): "
        + ", ".join(f"{k} {v / mb:.1f}" for k, v in figures["memory_growth_bytes"].items()),
        f"compile: {figures['compile']}; kernels: {figures['kernels']}; cuda: {figures['cuda']}; "
        "load average "
        f"{figures['load_average']} on {os.cpu_count()} CPUs",
        f"machine: {describe_machine(figures['machine'])}",
    ]
    return "\n".join(lines)


def roofline_lines(figures: dict) -> list[str]:
    """The compute roof, and each step kind against its roofline and bandwidth-only floors."""
    size = figures["matmul_size"]
    lines = [
        f"matmul peak {figures['peak_gflops']:.0f} GFLOP/s ({size}x{size} {figures['dtype']} "
        f"GEMM, {_threads(figures)}); the roofs meet at "
        f"{figures['ridge_rows']:.1f} rows per forward (CFG doubles a step's rows)",
        f"{'per step':<20}{'GFLOP':>8}{'roofline ms':>13}{'x roofline':>12}{'(cpu)':>7}"
        f"{'x bandwidth floor':>19}{'compute-bound':>15}",
    ]
    names = {"raster_step": "raster step", "step": "generation step", "round": "refinement round"}
    for prefix, name in names.items():
        lines.append(
            f"{name:<20}{figures[prefix + '_gflop']:>8.3g}"
            f"{figures[prefix + '_roofline_s'] * 1e3:>13.1f}"
            f"{figures[prefix + '_over_roofline']:>12.2f}"
            f"{figures['over_roofline_cpu'][prefix]:>7.2f}"
            f"{figures['over_bandwidth_floor'][prefix]:>19.2f}"
            f"{figures['compute_bound'][prefix]:>15.0%}"
        )
    return lines
