"""Speed benchmark: raster decoding vs SCAN generation and refinement, one model, one run.

``python -m scan_core bench`` times, at batch 1 with CFG, on a randomly initialised model of a
preset's shape (speed does not depend on the weights' values):
raster decoding (one code per forward), SCAN with K steps and no refinement, and SCAN with T
rounds of c codes for the "cached" and "exact" contexts and cached + lookahead. In the same
process it measures the machine's two roofs: memory bandwidth (the faster of a matrix-vector
product and a sum over as many bytes as the weights) and matmul peak (a large square GEMM in
the benchmark's dtype and threads).
Every forward must stream every weight once and do its matmul FLOPs (counted from the config
and the rows it runs: CFG doubles them), so each step time is stated against its roofline floor,
max(weight bytes / bandwidth, FLOPs / peak), and against the bandwidth-only floor.
The last line printed is one JSON object with every figure, the machine's description included.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from scan_core.evaluation.bench_report import (
    CASE_NAMES,
    CaseResult,
    case_figures,
    format_report,
    ratio_figures,
    roofline_figures,
)
from scan_core.evaluation.kernels import prepack_linears
from scan_core.evaluation.machine import (
    clock,
    default_matmul_size,
    machine_description,
    measure_bandwidth,
    measure_matmul_peak,
)
from scan_core.evaluation.roofline import NetworkTimer, ridge_rows
from scan_core.model.config import MODEL_PRESETS, ModelConfig
from scan_core.model.kv_cache import KVCache
from scan_core.model.network import Transformer
from scan_core.sampling.canvas import cache_rows
from scan_core.sampling.raster import raster_generate
from scan_core.sampling.sampler import ScanSampler, generation_capacity, run_all
from scan_core.sampling.setting_inputs import add_setting_flags, settings_from_args
from scan_core.sampling.settings import SamplerSettings

# --quick: big enough that per-forward costs dominate, small enough for a minute on 2 cores.
QUICK_CONFIG = ModelConfig(dim=256, n_layer=4, n_head=4, grid_size=16)
# The settings the benchmark takes; its cases vary the context, lookahead and T themselves.
BENCH_SETTINGS = ("num_steps", "num_rounds", "tokens_per_round")


def build_random_model(
    config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """A model of ``config``'s shape with N(0, 0.02) weights everywhere, heads included.

    The quality head gets random weights too (not LlamaGen's zero init) so that refinement
    accepts some candidates and the exact context really rebuilds, as a trained model would.
    """
    config = config.replace(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    dtype = dtype or torch.float32
    for module in model.modules():  # fill parameter by parameter: no throw-away init
        for name, param in list(module.named_parameters(recurse=False)):
            values = torch.randn(param.shape, generator=generator) * 0.02
            if name == "weight" and param.ndim == 1:  # RMSNorm scales
                values = torch.ones(param.shape)
            setattr(module, name, nn.Parameter(values.to(device, dtype), requires_grad=False))
    return model.eval()


def streamed_weight_bytes(model: nn.Module) -> int:
    """Bytes a batch-1 forward must read: every weight except the embedding tables (gathered)."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def _memory_now(device: torch.device) -> int:
    """Allocated device memory on CUDA; resident set size on CPU (Linux), else 0."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as stats:
            return int(stats.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def planned_cache_bytes(
    config: ModelConfig, settings: SamplerSettings, batch: int, dtype: torch.dtype
) -> int:
    """KV-cache bytes a generation allocates once, up front (built on meta: no memory).

    The capacity is the plan ``ScanSampler.generate`` makes (``generation_capacity``) for
    ``settings`` as resolved (``ScanSampler.resolve``: scorer "auto" plans as "head").
    """
    capacity = generation_capacity(settings, config.num_tokens)
    rows = cache_rows(batch, settings.uses_cfg)
    return KVCache.allocate(config, rows, capacity, "meta", dtype).nbytes()


def _time_case(case: CaseResult, timer: NetworkTimer, run: Callable[[], None]) -> None:
    timer.reset()
    wall, cpu = clock(timer.device), time.process_time()
    run()
    case.seconds.append(clock(timer.device) - wall)
    case.cpu_seconds.append(time.process_time() - cpu)
    case.forwards, case.network_seconds = timer.count, timer.seconds


def _time_scan(sampler, settings, case, timer, progress: bool) -> None:
    """One SCAN generation (+ refinement), recording every step's wall time and FLOPs by kind."""
    device = timer.device
    marks, memory = [], []
    total = settings.num_steps + 1 + settings.num_rounds
    bar = tqdm(total=total, desc=case.name, file=sys.stderr, leave=False, disable=not progress)

    def on_step(_trace, step) -> None:
        marks.append((clock(device), time.process_time()))
        flops = timer.take()
        if len(marks) > 1:  # the first step also allocates the cache
            case.step_flops.setdefault(step.kind, []).append(flops)
            case.step_seconds.setdefault(step.kind, []).append(marks[-1][0] - marks[-2][0])
            case.step_cpu_seconds.setdefault(step.kind, []).append(marks[-1][1] - marks[-2][1])
        memory.append(_memory_now(device))
        case.proposed += step.kind == "refine" and step.accepted.size
        case.accepted += step.kind == "refine" and int(step.accepted.sum())
        bar.update(1)

    case.proposed = case.accepted = 0
    seed = len(case.seconds)
    _time_case(case, timer, lambda: run_all(sampler.generate([1], settings, seed), on_step))
    bar.close()
    case.memory_growth_bytes = max(case.memory_growth_bytes, memory[-1] - memory[0])


def _time_raster(model, settings, case, timer) -> None:
    """One raster decoding; every forward is a step, credited the mean time (no per-step hook)."""
    generator = torch.Generator(device="cpu").manual_seed(len(case.seconds))
    classes = torch.tensor([1], device=timer.device)
    _time_case(case, timer, lambda: raster_generate(model, classes, settings, generator))
    steps = timer.take()
    case.step_flops.setdefault("raster", []).extend([flops] for flops in steps)
    for times, total in (
        (case.step_seconds, case.seconds),
        (case.step_cpu_seconds, case.cpu_seconds),
    ):
        times.setdefault("raster", []).extend([total[-1] / len(steps)] * len(steps))


def warm_up_model(model: Transformer, warm_up: Callable[[], None], compile_model: bool) -> str:
    """Run ``warm_up`` once, first trying torch.compile on the forward if asked.

    Compilation is lazy, so a backend failure (no C compiler, unsupported op) surfaces in the
    warm-up; then the eager forward is restored and warmed up. Returns a one-line status.
    """
    if compile_model:
        try:
            model.forward = torch.compile(model.forward, dynamic=True)
            warm_up()
            return "compiled (torch.compile, dynamic shapes)"
        except Exception as error:  # noqa: BLE001 - any backend failure means "run eager"
            del model.forward  # back to the class's eager forward
            first = (str(error).strip().splitlines() or [""])[0][:160]
            status = f"torch.compile failed, running eager: {type(error).__name__}: {first}"
    else:
        status = "eager (--compile not given)"
    warm_up()
    return status


def _cases(config: ModelConfig, settings: SamplerSettings) -> dict[str, SamplerSettings]:
    base = settings.replace(num_steps=min(settings.num_steps, config.num_tokens))
    return {
        "scan_t0": base.replace(num_rounds=0),
        "scan_t30": base,
        "scan_t30_exact": base.replace(context="exact"),
        "scan_t30_lookahead": base.replace(lookahead=True),
    }


def run_benchmark(
    config: ModelConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    repeats: int = 1,
    settings: SamplerSettings | None = None,
    compile_model: bool = False,
    progress: bool = False,
    matmul_size: int | None = None,
    prepack: bool = False,
) -> dict:
    """Time raster and SCAN decoding of one random model at batch 1; return every figure.

    ``settings`` is the T-round case (default: the paper's K, T, c); the others change only
    the context, lookahead or T. One short SCAN run (2 rounds) warms up the kernels every case
    shares. Within a repeat the cases alternate, so slow drifts of a shared machine spread over
    all of them; medians are reported. The roofs are measured after the cases, with the same
    dtype and threads (``matmul_size``: the GEMM's n, default per device). ``prepack`` routes the
    linear layers through oneDNN on pre-packed weights (``kernels.prepack_linears``, CPU only).
    ``format_report`` explains the keys.
    """
    device = torch.device(device)
    if dtype is None:  # bf16 where CUDA supports it (as the paper's timings), else fp32
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    load = [_load_average()]
    model = build_random_model(config, device, dtype)
    kernels = f"oneDNN, {prepack_linears(model)} linears pre-packed" if prepack else "F.linear"
    sampler = ScanSampler(model, model_id="random", device=device)
    cases = _cases(config, settings or SamplerSettings())
    compiled = _warm_up(sampler, cases, compile_model, progress)
    results = _measure(model, sampler, cases, repeats, progress)
    peak = _peak_memory(device)  # before the bandwidth matrix is allocated
    threads = torch.get_num_threads()
    _log(progress, "measuring memory bandwidth and matmul peak")
    roofs = measure_roofs(model, device, dtype, matmul_size)
    figures = {
        "preset": _preset_name(config),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "parameters": model.num_parameters(),
        "repeats": repeats,
        "settings": cases["scan_t30"].to_dict(),
        **roofs,
        "machine": machine_description(device),
        "peak_memory_mb": peak / 2**20,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
        "compile": compiled,
        "kernels": kernels,
        "cuda": {
            "available": torch.cuda.is_available(),
            "torch": torch.__version__,
            "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        },
        "load_average": [*load, _load_average()],  # how busy the machine was: before, after
    }
    return (
        figures
        | case_figures(results, cases)
        | ratio_figures(results, figures["floor_s"])
        | roofline_figures(
            results, roofs["weight_bytes"], roofs["bandwidth"], roofs["peak_flops"], threads
        )
    )


def _warm_up(sampler: ScanSampler, cases: dict, compile_model: bool, progress: bool) -> str:
    """One short SCAN run (2 rounds), and raster too when compiling; the compile status."""
    model, device = sampler.model, sampler.device
    warm = cases["scan_t30"].replace(num_rounds=min(2, cases["scan_t30"].num_rounds))

    def warm_up() -> None:
        run_all(sampler.generate([1], warm))
        if compile_model:  # raster's shapes compile separately: keep that out of its timing
            raster_generate(model, torch.tensor([1], device=device), cases["scan_t0"])

    _log(progress, "warming up" + (" and compiling" if compile_model else ""))
    return warm_up_model(model, warm_up, compile_model)


def measure_roofs(
    model: Transformer, device: torch.device, dtype: torch.dtype, matmul_size: int | None = None
) -> dict:
    """The model's streamed weight bytes, the machine's bandwidth and matmul peak (per second),
    the bandwidth-only floor of one forward, and the rows per forward where the roofs meet."""
    weight_bytes = streamed_weight_bytes(model)
    # best of 10: a roof is the best the machine does, and a shared machine hides it at times
    bandwidth = measure_bandwidth(weight_bytes, model.config.dim, device, dtype, repeats=10)
    matmul_size = matmul_size or default_matmul_size(device)
    peak = measure_matmul_peak(device, dtype, matmul_size, repeats=10)
    return {
        "weight_bytes": weight_bytes,
        "bandwidth": bandwidth,
        "bandwidth_gbps": bandwidth / 1e9,
        "floor_s": weight_bytes / bandwidth,
        "peak_flops": peak,
        "peak_gflops": peak / 1e9,
        "matmul_size": matmul_size,
        "ridge_rows": ridge_rows(model.config, weight_bytes, bandwidth, peak),
    }


def _measure(model, sampler, cases, repeats: int, progress: bool) -> dict[str, CaseResult]:
    device, config = sampler.device, model.config
    timer = NetworkTimer(model, device)
    results = {name: CaseResult(name) for name in CASE_NAMES}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for repeat in range(repeats):
        _log(progress, f"repeat {repeat + 1}/{repeats}: raster, {config.num_tokens} steps")
        _time_raster(model, cases["scan_t0"], results["raster"], timer)
        for name, settings in cases.items():
            _time_scan(sampler, settings, results[name], timer, progress)
            dtype = next(model.parameters()).dtype
            resolved = sampler.resolve(settings)  # the scorer changes the plan
            results[name].cache_bytes = planned_cache_bytes(config, resolved, 1, dtype)
    timer.remove()
    return results


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is KiB on Linux (bytes on macOS); the process peak, weights included.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _preset_name(config: ModelConfig) -> str:
    for name, (preset, _) in MODEL_PRESETS.items():
        if preset == config:
            return name
    return "quick" if config == QUICK_CONFIG else "custom"


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def dtype_speedups(fp32: dict, bf16: dict) -> dict:
    """Per case: float32 seconds / bfloat16 seconds (> 1: bfloat16 is faster)."""
    return {name: fp32[f"{name}_s"] / bf16[f"{name}_s"] for name in CASE_NAMES}


def format_speedups(speedups: dict) -> str:
    cases = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in speedups.items())
    return f"bfloat16 against float32 (float32 s / bfloat16 s, same run): {cases}"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scan_core bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="SCAN-L", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--quick", action="store_true", help=f"use {QUICK_CONFIG}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "both"],
        help="default: bfloat16 on CUDA where supported, else float32; both: float32 then "
        "bfloat16 in this run, with their speed ratio per case",
    )
    parser.add_argument("--repeats", type=int, default=1)
    add_setting_flags(parser, BENCH_SETTINGS, SamplerSettings())
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="try torch.compile (else eager)")
    parser.add_argument(
        "--prepack", action="store_true", help="CPU: linear layers through oneDNN, pre-packed"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = _load_average()
    if load is not None and load > (os.cpu_count() or 1):
        _log(
            True,
            f"warning: the machine is busy (load {load:.1f} on {os.cpu_count()} CPUs);"
            " wall times will be inflated: compare the cpu s column, try --threads 1",
        )
    config = QUICK_CONFIG if args.quick else MODEL_PRESETS[args.preset][0]
    names = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    runs = {}
    for name in names:
        runs[name] = run_benchmark(
            config,
            device=args.device,
            dtype=getattr(torch, name) if name else None,
            repeats=args.repeats,
            settings=settings_from_args(args, SamplerSettings(), BENCH_SETTINGS),
            compile_model=args.compile,
            progress=True,
            prepack=args.prepack,
        )
        print(format_report(runs[name]), flush=True)
    if len(runs) == 1:
        figures = next(iter(runs.values()))
    else:  # the last line keeps one object: each dtype's figures and their ratios
        figures = runs | {"bf16_speedup": dtype_speedups(runs["float32"], runs["bfloat16"])}
        print(format_speedups(figures["bf16_speedup"]), flush=True)
    print(json.dumps(figures, sort_keys=True), flush=True)  # the last line: machine-readable
    return 0
