"""The command line: ``python -m scan_core COMMAND [ARGS]``; ``python -m scan_core`` lists them.

Each command is the ``main(argv)`` of one module, imported only when it runs, so listing the
commands (or running one) never loads the others.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("scan_core.sampling.generate", "sample images (and traces) from a checkpoint"),
    "train": ("scan_core.training.train", "train the transformer on pre-extracted codes"),
    "train_vq": ("scan_core.training.vq.train", "train a VQ tokenizer on images"),
    "extract_codes": ("scan_core.datasets.extract_codes", "turn an image folder into VQ codes"),
    "data": ("scan_core.datasets.codes", "write synthetic codes for smoke runs"),
    "emoji_data": ("scan_core.datasets.emoji", "build the emoji image dataset and examples"),
    "evaluate": ("scan_core.evaluation.evaluate", "FD, precision/recall, AUROC and refinement"),
    "eval_tables": ("scan_core.evaluation.tables", "tables from evaluation reports"),
    "bench": ("scan_core.evaluation.bench", "sampler speed against raster decoding"),
    "classifier": ("scan_core.evaluation.classifier_cli", "train or evaluate the feature net"),
    "checkpoint": ("scan_core.checkpoint.cli", "inspect, convert or average checkpoints"),
    "ship": ("scan_core.evaluation.ship", "package the embedded model with its card"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m scan_core COMMAND [ARGS]  (COMMAND --help for its flags)", ""]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
