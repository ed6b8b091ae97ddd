"""Quality-head AUROC over several corruption seeds: how much the evaluation's single-seed figure
moves with the draw of corrupted cells (the model card's "mean over five corruption seeds").

    python -m tools.auroc_seeds [--model M] [--tokenizer T] [--data DIR] [--seeds 5]

Seed s corrupts the held-out grids exactly as ``python -m scan_core evaluate --seed s`` does
(``scan_core.evaluation.quality.detection_auroc``, with the evaluation's settings), so seed 0
reproduces the report's ``auroc_*`` figures. Prints one line per seed, then mean, range and
standard deviation per negative source.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from scan_core.checkpoint.loading import load_model, load_tokenizer
from scan_core.evaluation.evaluate import encode, load_split
from scan_core.evaluation.quality import detection_auroc
from scan_core.sampling.sampler import ScanSampler
from scan_core.sampling.settings import recommended_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/scan-emoji.safetensors")
    parser.add_argument("--tokenizer", default="checkpoints/vq-emoji.safetensors")
    parser.add_argument("--data", default="data/emoji2", help="prepared images with a val split")
    parser.add_argument("--seeds", type=int, default=5, help="corruption seeds 0 .. N-1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, report = load_model(args.model)
    tokenizer, _ = load_tokenizer(args.tokenizer)
    images, labels = load_split(Path(args.data))
    codes = encode(tokenizer, images)
    settings = recommended_settings(report.card, model.config.num_tokens)
    sampler = ScanSampler(model, Path(args.model).stem)
    runs = []
    for seed in range(args.seeds):
        runs.append(detection_auroc(sampler, codes, labels, settings, seed=seed))
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in runs[-1].items()), flush=True)
    for source in runs[0]:
        values = [run[source] for run in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"{source}: mean {statistics.mean(values):.5f}, range {min(values):.4f}-"
            f"{max(values):.4f}, sd {spread:.4f} over {len(values)} seeds"
        )


if __name__ == "__main__":
    main()
