"""Quality-head AUROC on held-out grids, split by how much each corruption changes the picture:
the measurement behind the model card's "AUROC rises with how much a random code changes the
picture".

    python -m tools.flaw_visibility [--model M] [--tokenizer T] [--codes DIR] [--source S]
                                      [--orders K] [--max-grids N]

A quarter of the cells of each held-out grid get a negative of one source (as in
``scan_core.evaluation.quality.detection_auroc``, seed 0), the grid is scored in full context
(``ScanSampler.score``), and both the true and the corrupted grid are decoded. A corrupted
cell's change is the mean absolute pixel difference over its own patch ([-1, 1] scale). The
AUROC of ``1 - score`` is then reported for each quarter of the corrupted cells by change,
each against all clean cells. ``--orders K`` averages each cell's score over K prefill orders
(K seeds of ``ScanSampler.score``): the test-time ensemble the model card reports.
``--codes data/emoji2-codes --max-grids 448`` probes as many training grids (a seeded random
subset), the card's check that the head is not mainly overfitting.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from scan_core.checkpoint.loading import load_model, load_tokenizer
from scan_core.datasets.codes import CodesDataset
from scan_core.evaluation.quality import corrupt
from scan_core.sampling.sampler import ScanSampler
from scan_core.sampling.settings import SamplerSettings
from scan_core.training.metrics import auroc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/scan-emoji.safetensors")
    parser.add_argument("--tokenizer", default="runs/vq_s/best.safetensors")
    parser.add_argument("--codes", default="data/emoji2-codes-val", help="held-out code shards")
    parser.add_argument("--source", default="random", choices=("random", "permuted"))
    parser.add_argument("--batch-size", type=int, default=224)
    parser.add_argument(
        "--orders",
        type=int,
        default=1,
        help="average each cell's score over this many prefill orders",
    )
    parser.add_argument(
        "--max-grids", type=int, default=0, help="probe a seeded random subset of N grids (0: all)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model(args.model)
    vq, _ = load_tokenizer(args.tokenizer)
    sampler = ScanSampler(model, "probe")
    held_out = CodesDataset(args.codes, model.config)
    codes, labels = held_out.codes.reshape(len(held_out), -1).astype(int), held_out.labels
    if 0 < args.max_grids < len(codes):
        keep = np.random.default_rng(0).choice(len(codes), args.max_grids, replace=False)
        codes, labels = codes[keep], labels[keep]
    settings = SamplerSettings(num_steps=16, num_rounds=0, tokens_per_round=2, cfg_scale=1.0)
    generator, grid = torch.Generator().manual_seed(0), model.config.grid_size
    scores, flawed, change = [], [], []
    for start in range(0, len(codes), args.batch_size):
        truth = torch.as_tensor(codes[start : start + args.batch_size])
        classes = [int(c) for c in labels[start : start + args.batch_size]]
        bad, flaws = corrupt(truth, args.source, 0.25, model.config.vocab_size, None, generator)
        runs = [
            sampler.score(bad.numpy(), classes, settings, seed=start + 100_003 * k)
            for k in range(args.orders)
        ]
        scores.append(np.mean([run.scores_at(-1) for run in runs], axis=0))
        with torch.no_grad():
            diff = (vq.decode_codes(truth).clamp(-1, 1) - vq.decode_codes(bad).clamp(-1, 1)).abs()
        side = diff.shape[-1] // grid
        per_cell = diff.mean(1).reshape(len(truth), grid, side, grid, side).mean((2, 4))
        flawed.append(flaws.numpy())
        change.append(per_cell.reshape(len(truth), -1).numpy())
    scores, flawed, change = (np.concatenate(x).ravel() for x in (scores, flawed, change))
    print(
        f"{args.source}: AUROC {auroc(torch.as_tensor(1 - scores), torch.as_tensor(flawed)):.4f}"
        f" over {int(flawed.sum())} corrupted cells, scores averaged over {args.orders} "
        f"prefill order(s)"
    )
    edges = np.quantile(change[flawed], [0, 0.25, 0.5, 0.75, 1])
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        keep = ~flawed | (flawed & (change >= low) & (change <= high))
        value = auroc(torch.as_tensor(1 - scores[keep]), torch.as_tensor(flawed[keep]))
        print(f"  change {low:.3f}-{high:.3f}: AUROC {value:.3f}")


if __name__ == "__main__":
    main()
