"""Sampler settings: files written before the settings' rename still read under today's names.

``tests/golden/trace_before_rename.json`` was exported by the sampler before ``refine_rounds``
became ``num_rounds`` (tiny seeded model, class 3, K = 4, T = 2, c = 2, CFG 2, seed 0).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
from conftest import random_model, tiny_config

from scan_core.evaluation import ship
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.setting_inputs import (
    add_setting_flags,
    settings_from_args,
    settings_from_values,
)
from scan_core.sampling.settings import (
    SETTING_FIELDS,
    SamplerSettings,
    grid_defaults,
    recommended_settings,
    with_current_names,
)
from scan_core.sampling.trace_files import parse_trace
from scan_core.training.state import config_diff

ROOT = Path(__file__).parent.parent
OLD_TRACE = Path(__file__).parent / "golden" / "trace_before_rename.json"
SHIPPED = ROOT / "checkpoints" / "scan-emoji.safetensors"
EVALUATION = ROOT / "checkpoints" / "evaluation.json"


def test_a_trace_written_before_the_rename_reads_under_the_new_names():
    text = OLD_TRACE.read_text()
    assert '"refine_rounds":2' in text  # the file really is in the old format
    trace = parse_trace(text)
    assert "refine_rounds" not in trace.settings and trace.settings["num_rounds"] == 2
    settings = SamplerSettings.from_dict(trace.settings)
    assert (settings.num_steps, settings.num_rounds, settings.tokens_per_round) == (4, 2, 2)
    assert settings.cfg_scale == 2.0
    # Replaying its settings with today's sampler gives the codes it recorded.
    sampler = ScanSampler(random_model(tiny_config(), seed=1234))
    replay = run_all(sampler.generate(trace.class_ids, settings, seed=trace.seed))
    assert [s.kind for s in replay.steps] == [s.kind for s in trace.steps]
    assert (replay.codes_at(-1) == trace.codes_at(-1)).all()


def test_old_names_map_to_new_ones_and_a_new_name_wins():
    assert with_current_names({"refine_rounds": 3, "refine_size": 5, "top_k": 7}) == {
        "num_rounds": 3,
        "tokens_per_round": 5,
        "top_k": 7,
    }
    assert with_current_names({"refine_rounds": 3, "num_rounds": 9}) == {"num_rounds": 9}
    assert SamplerSettings.from_dict({"refine_rounds": 3, "unknown": 1}).num_rounds == 3


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped checkpoint is not in this checkout")
def test_the_shipped_cards_recommended_settings_still_load():
    from scan_core.checkpoint.loading import load_model

    model, report = load_model(SHIPPED)
    chosen = report.card["sampler"]
    settings = recommended_settings(report.card, model.config.num_tokens)
    rounds = chosen.get("num_rounds", chosen.get("refine_rounds"))
    assert settings.num_rounds == rounds == 16
    assert (settings.num_steps, settings.tokens_per_round) == (16, 2)


def test_an_evaluation_report_from_before_the_rename_ships_new_names(tmp_path):
    assert '"refine_rounds"' in EVALUATION.read_text()  # written before the rename
    args = argparse.Namespace(report=EVALUATION, note=None)
    card = ship.model_card(args, {}, ["a"])
    assert "refine_rounds" not in card["sampler"] and card["sampler"]["num_rounds"] == 16
    assert card["sampler"]["tokens_per_round"] == 2


def test_a_training_run_saved_before_the_rename_resumes():
    saved = {"loss": {"refine_rounds": 2, "refine_size": 4, "eva_weight": 1.0}}
    same = {"loss": {"num_rounds": 2, "tokens_per_round": 4, "eva_weight": 1.0}}
    assert config_diff(saved, same) == []
    other = {"loss": {"num_rounds": 3, "tokens_per_round": 4, "eva_weight": 1.0}}
    assert config_diff(saved, other) == ["  loss.num_rounds: saved 2, now 3"]


# ------------------------------------------------------------------ the table of fields


def test_the_table_describes_every_setting_once_with_its_type():
    fields = dataclasses.fields(SamplerSettings)
    assert [f.name for f in fields] == [row.name for row in SETTING_FIELDS]
    defaults = SamplerSettings()
    for row in SETTING_FIELDS:
        assert type(getattr(defaults, row.name)) is row.kind, row.name
        assert row.control in ("slider", "number", "checkbox", "radio"), row.name
        assert row.label and row.help and row.flag == "--" + row.name.replace("_", "-")
        assert (row.control == "radio") == bool(row.choices), row.name
    grid_defaults(16).validate(16)  # every default lies in its range


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_steps": 17}, r"num_steps \(steps K\) must be in \[1, 16\], got 17"),
        ({"num_rounds": -1}, r"num_rounds \(refinement rounds T\) must be >= 0"),
        ({"top_p": 0.0}, r"top_p \(top-p\) must be in \(0, 1\]"),
        ({"order": "spiral"}, r"order \(generation order\) must be one of"),
        ({"score_threshold": 1.5}, r"score_threshold .* must be in \[0, 1\]"),
    ],
)
def test_validate_checks_the_tables_ranges(changes, message):
    with pytest.raises(ValueError, match=message):
        grid_defaults(16).replace(**changes).validate(16)


def test_values_by_name_are_converted_checked_and_capped():
    base = grid_defaults(16)
    got = settings_from_values({"num_rounds": "3", "lookahead": True, "order": "raster"}, base, 16)
    assert (got.num_rounds, got.lookahead, got.order, got.num_steps) == (3, True, "raster", 4)
    with pytest.raises(ValueError, match="unknown sampler settings"):
        settings_from_values({"rounds": 3}, base, 16)
    with pytest.raises(ValueError, match=r"num_rounds .* must be in \[0, 200\], got 201"):
        settings_from_values({"num_rounds": 201}, base, 16, limits={"num_rounds": 200})
    with pytest.raises(ValueError, match=r"tokens_per_round .* must be in \[1, 16\]"):
        settings_from_values({"tokens_per_round": 17}, base, 16, limits={"tokens_per_round": "N"})
    with pytest.raises(ValueError, match="lookahead .* must be true or false"):
        settings_from_values({"lookahead": "yes"}, base, 16)


def _parser(names=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_setting_flags(parser, names, SamplerSettings())
    return parser


def test_flags_come_from_the_table_and_only_given_ones_change_the_base():
    args = _parser().parse_args(["--num-rounds", "3", "--no-rescore", "--context", "exact"])
    base = SamplerSettings(num_rounds=9, rescore=True, cfg_scale=2.5)
    got = settings_from_args(args, base)
    assert got == base.replace(num_rounds=3, rescore=False, context="exact")
    assert settings_from_args(_parser().parse_args([]), base) == base
    text = _parser(["num_steps", "tokens_per_round"]).format_help()
    assert "--num-steps" in text and "--tokens-per-round" in text and "--num-rounds" not in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-rounds", "-1"], r"num_rounds \(refinement rounds T\) must be >= 0, got -1"),
        (["--num-steps", "2.5"], "must be a whole number"),
        (["--top-p", "0"], r"must be in \(0, 1\]"),
        (["--order", "spiral"], "must be one of"),
    ],
)
def test_bad_flags_are_refused_with_the_settings_name(argv, message):
    with pytest.raises(argparse.ArgumentError, match=message):
        _parser().parse_args(argv)
