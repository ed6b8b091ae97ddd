"""Markdown tables from ``python -m scan_core evaluate --out`` reports, so the figures in the
model card and docs/results.md are printed by code rather than copied by hand.

    python -m scan_core eval_tables table2 eval.json
    python -m scan_core eval_tables table3 all=all.json random=random.json ...

``table2`` is the refinement sweep of one report (the paper's Table 2). ``table3`` puts several
reports side by side, one per training run, labelled ``NAME=FILE`` (the paper's Table 3: which
negative sources the quality head was trained with).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scan_core.files import read_json

SUMMARY_KEYS = ("fd_t0", "fd_refined", "refined_T", "precision_t0", "precision_refined")


class TableError(ValueError):
    """A report that cannot be tabulated (missing, not JSON, or without the needed keys)."""


def _number(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def load_report(path: str | Path) -> dict:
    """An evaluation report; TableError names the file and what is missing."""
    report = read_json(Path(path))
    if not isinstance(report, dict):
        raise TableError(f"{path}: missing or not a JSON object (write one with evaluate --out)")
    summary = report.get("summary")
    missing = [key for key in SUMMARY_KEYS if not isinstance(summary, dict) or key not in summary]
    if missing:
        raise TableError(
            f"{path}: not a scan_core.evaluation.evaluate report (missing {', '.join(missing)})"
        )
    return report


def table2(report: dict) -> str:
    """FD, precision, recall, class accuracy, cells changed and time per image for each T."""
    rows = report.get("table2") or []
    if not rows:
        raise TableError("the report has no refinement sweep (table2)")
    lines = [
        "| T | FD | precision | recall | class acc | cells changed | time / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seconds = row.get("seconds_per_image")
        time_text = "–" if seconds is None else f"{seconds * 1000:.0f} ms"
        lines.append(
            f"| {row['T']} | {_number(row.get('fd'), 1)} | {_number(row.get('precision'), 3)} "
            f"| {_number(row.get('recall'), 3)} | {_number(row.get('class_acc'), 3)} "
            f"| {_number(row.get('changed_cells'), 1)} | {time_text} |"
        )
    control = report.get("random_control")
    if control:
        lines.append(
            f"| random control | {_number(control.get('fd'), 1)} "
            f"| {_number(control.get('precision'), 3)} | {_number(control.get('recall'), 3)} "
            f"| {_number(control.get('class_acc'), 3)} | same count | |"
        )
    return "\n".join(lines)


def table3(runs: list[tuple[str, dict]]) -> str:
    """One row per training run: FD before and after refinement, the change, FD of the control
    that resamples as many random cells, precision, class accuracy and the quality head's AUROC
    per corruption source."""
    lines = [
        "| negatives | FD T=0 | FD refined (T) | change | FD random control "
        "| precision T=0 → refined | class acc refined | AUROC random | AUROC permuted "
        "| AUROC teacher |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, report in runs:
        s = report["summary"]
        change = 100.0 * (s["fd_refined"] - s["fd_t0"]) / s["fd_t0"] if s["fd_t0"] else None
        lines.append(
            f"| {name} | {_number(s['fd_t0'], 1)} | {_number(s['fd_refined'], 1)} "
            f"({s['refined_T']}) | {'–' if change is None else f'{change:+.1f} %'} "
            f"| {_number(s.get('fd_random_control'), 1)} "
            f"| {_number(s['precision_t0'], 3)} → {_number(s['precision_refined'], 3)} "
            f"| {_number(s.get('class_acc_refined'), 3)} | {_number(s.get('auroc_random'), 3)} "
            f"| {_number(s.get('auroc_permuted'), 3)} | {_number(s.get('auroc_teacher'), 3)} |"
        )
    return "\n".join(lines)


def _labelled(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise TableError(f"{spec!r}: give each run as NAME=FILE, e.g. random=eval_random.json")
    return name, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scan_core eval_tables", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("table2", help="the refinement sweep of one report")
    one.add_argument("report")
    many = commands.add_parser("table3", help="several reports side by side (NAME=FILE each)")
    many.add_argument("runs", nargs="+", metavar="NAME=FILE")
    args = parser.parse_args(argv)
    try:
        if args.command == "table2":
            print(table2(load_report(args.report)))
        else:
            labelled = [_labelled(spec) for spec in args.runs]
            print(table3([(name, load_report(path)) for name, path in labelled]))
    except TableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
