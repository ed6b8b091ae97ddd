"""float32 against bfloat16, side by side in one run: the evidence for ``--dtype auto``'s choice
(``scan_core.model.precision.choose_dtype``).

For each model (the embedded emoji checkpoint, then random models of growing width), one
generation at batch 1 with CFG (K = 16, T rounds of c = 2) runs in float32 and in bfloat16,
the two dtypes taking turns within every repeat so a shared machine's load falls on both alike;
each figure is the median of ``--runs`` repeats after one warm-up. Prints the machine, one JSON
line per model, then a table with the ratio float32 / bfloat16 (> 1: bfloat16 is faster).

``--agreement N`` measures instead how close bfloat16 stays to float32 on the embedded model
(the figures behind tests/test_precision.py's bounds): the share of cells where greedy
decoding of N images (N / 18 per class) gives both dtypes the same code, at T = 0 and T = 16,
and the largest and mean difference of the scores each dtype gives float32's own T = 0 codes,
for each scorer.

    python -m tools.dtype_speed [--threads 1] [--runs 3] [--widths 512 1024] [--num-rounds 4]
    python -m tools.dtype_speed --agreement 36
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from scan_core import SamplerSettings, ScanSampler, load_model, run_all
from scan_core.evaluation.bench import build_random_model
from scan_core.evaluation.machine import describe_machine, machine_description
from scan_core.model.config import ModelConfig

EMBEDDED = "checkpoints/scan-emoji.safetensors"
DTYPES = (torch.float32, torch.bfloat16)


def random_config(width: int) -> ModelConfig:
    """A 16x16-grid model of ``width`` with the SCAN-L head size (64) and 12 layers."""
    return ModelConfig(dim=width, n_layer=12, n_head=width // 64, grid_size=16)


def time_dtypes(models: dict, settings: SamplerSettings, runs: int) -> dict:
    """Median seconds per generation for each dtype's copy of one model."""
    samplers = {dtype: ScanSampler(model, "timed") for dtype, model in models.items()}
    seconds: dict = {dtype: [] for dtype in models}
    for repeat in range(runs + 1):
        for dtype, sampler in samplers.items():
            start = time.perf_counter()
            run_all(sampler.generate([0], settings, seed=repeat))
            if repeat:  # repeat 0 warms up
                seconds[dtype].append(time.perf_counter() - start)
    return {dtype: statistics.median(values) for dtype, values in seconds.items()}


def agreement(images: int) -> dict:
    """bfloat16 against float32 on the embedded model (module docstring)."""
    samplers = {d: ScanSampler(load_model(EMBEDDED, dtype=d)[0], str(d)) for d in DTYPES}
    classes = [b % 18 for b in range(images)]
    report = {"images": images}
    for rounds in (0, 16):
        greedy = SamplerSettings(num_steps=16, num_rounds=rounds, tokens_per_round=2, top_k=1)
        codes = [run_all(s.generate(classes, greedy, seed=0)).codes_at() for s in samplers.values()]
        report[f"codes_agree_T{rounds}"] = float((codes[0] == codes[1]).mean())
    plain = SamplerSettings(num_steps=16, num_rounds=0)
    grid = run_all(samplers[torch.float32].generate(classes, plain, seed=0)).codes_at()
    for scorer in ("head", "confidence"):
        settings = SamplerSettings(scorer=scorer)
        scores = [s.score(grid, classes, settings).scores_at() for s in samplers.values()]
        error = abs(scores[0] - scores[1])
        report[f"{scorer}_max_error"] = float(error.max())
        report[f"{scorer}_mean_error"] = float(error.mean())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="*", default=[512, 1024])
    parser.add_argument("--num-rounds", type=int, default=4)
    parser.add_argument("--agreement", type=int, metavar="N", help="measure agreement instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(describe_machine(machine_description()), flush=True)
    if args.agreement:
        print(json.dumps(agreement(args.agreement)))
        return 0
    settings = SamplerSettings(num_steps=16, num_rounds=args.num_rounds, tokens_per_round=2)
    rows = []
    cases = [("embedded emoji (dim 256, 6 layers)", None)]
    cases += [(f"random dim {w}, 12 layers", random_config(w)) for w in args.widths]
    for name, config in cases:
        if config is None:
            models = {dtype: load_model(EMBEDDED, dtype=dtype)[0] for dtype in DTYPES}
        else:
            models = {dtype: build_random_model(config, dtype=dtype) for dtype in DTYPES}
        median = time_dtypes(models, settings, args.runs)
        fp32, bf16 = median[torch.float32], median[torch.bfloat16]
        row = {"model": name, "float32_s": fp32, "bfloat16_s": bf16, "ratio": fp32 / bf16}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'model':<38} {'float32 s':>10} {'bfloat16 s':>11} {'fp32/bf16':>10}")
    for row in rows:
        print(
            f"{row['model']:<38} {row['float32_s']:>10.3f} {row['bfloat16_s']:>11.3f} "
            f"{row['ratio']:>10.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
