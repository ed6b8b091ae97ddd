"""Sampler settings: files written before the settings' rename still read under today's names.

``tests/golden/trace_before_rename.json`` was exported by the sampler before ``refine_rounds``
became ``num_rounds`` (tiny seeded model, class 3, K = 4, T = 2, c = 2, CFG 2, seed 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import random_model, tiny_config

from scan_core.checkpoint import ship
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.settings import SamplerSettings, recommended_settings, with_current_names
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
    args = argparse.Namespace(report=EVALUATION, default_t=None, note=None)
    card = ship.model_card(args, {}, ["a"])
    assert "refine_rounds" not in card["sampler"] and card["sampler"]["num_rounds"] == 16
    assert card["sampler"]["tokens_per_round"] == 2


def test_a_training_run_saved_before_the_rename_resumes():
    saved = {"loss": {"refine_rounds": 2, "refine_size": 4, "eva_weight": 1.0}}
    same = {"loss": {"num_rounds": 2, "tokens_per_round": 4, "eva_weight": 1.0}}
    assert config_diff(saved, same) == []
    other = {"loss": {"num_rounds": 3, "tokens_per_round": 4, "eva_weight": 1.0}}
    assert config_diff(saved, other) == ["  loss.num_rounds: saved 2, now 3"]
