"""Markdown tables from evaluation reports: the numbers in the card come from the files."""

from __future__ import annotations

import json

import pytest

from scan_core.evaluation.tables import TableError, load_report, main, table2, table3


def report(fd_t0=50.0, fd_refined=40.0, **extra) -> dict:
    summary = {
        "fd_t0": fd_t0,
        "fd_refined": fd_refined,
        "refined_T": 16,
        "precision_t0": 0.9,
        "precision_refined": 0.85,
        "auroc_random": 0.81,
    }
    summary |= extra
    table = [
        {
            "T": 0,
            "fd": fd_t0,
            "precision": 0.9,
            "recall": 0.3,
            "class_acc": 0.2,
            "changed_cells": 0.0,
            "seconds_per_image": 0.065,
        },
        {
            "T": 16,
            "fd": fd_refined,
            "precision": 0.85,
            "recall": 0.31,
            "class_acc": 0.25,
            "changed_cells": 19.25,
            "seconds_per_image": 0.114,
        },
    ]
    return {"summary": summary, "table2": table, "random_control": {"fd": 49.0}}


def test_table2_has_a_row_per_T_and_the_control():
    lines = table2(report()).splitlines()
    assert lines[2] == "| 0 | 50.0 | 0.900 | 0.300 | 0.200 | 0.0 | 65 ms |"
    assert lines[3] == "| 16 | 40.0 | 0.850 | 0.310 | 0.250 | 19.2 | 114 ms |"
    assert lines[4].startswith("| random control | 49.0 |")


def test_table3_computes_the_change_and_marks_missing_metrics():
    text = table3([("all", report()), ("random", report(fd_refined=55.0))])
    all_row, random_row = text.splitlines()[2:]
    assert all_row.startswith("| all | 50.0 | 40.0 (16) | -20.0 % | – | 0.900 → 0.850 |")
    assert "| +10.0 % |" in random_row
    assert all_row.endswith("| 0.810 | – | – |")  # no permuted or teacher AUROC in the report


def test_bad_reports_are_named(tmp_path):
    with pytest.raises(TableError, match="missing or not a JSON object"):
        load_report(tmp_path / "absent.json")
    (tmp_path / "other.json").write_text(json.dumps({"summary": {"fd_t0": 1.0}}))
    with pytest.raises(TableError, match="missing fd_refined"):
        load_report(tmp_path / "other.json")
    with pytest.raises(TableError, match="no refinement sweep"):
        table2({"summary": {}})


def test_cli_prints_table3_and_refuses_unlabelled_runs(tmp_path, capsys):
    path = tmp_path / "all.json"
    path.write_text(json.dumps(report()))
    assert main(["table3", f"all={path}"]) == 0
    assert "| all | 50.0 |" in capsys.readouterr().out
    assert main(["table3", str(path)]) == 2
    assert "NAME=FILE" in capsys.readouterr().err
