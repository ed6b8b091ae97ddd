"""The confidence scorer (``SamplerSettings.scorer``, ``sampling/judge.py``): each cell is judged
by the token head's probability of its code with its group hidden, checked against a forward
without cache; rounds accept by the scores under both scorers; locks hold; traces record the
scorer; the flag reaches the sampler from both command lines; a model without a trained quality
head defaults to confidence and refuses "head" by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config, tiny_vq
from safetensors.torch import save_file
from test_sampler import _peaks

from scan_core.checkpoint.loading import load_model, save_checkpoint
from scan_core.model.network import SLOT_CODE, SLOT_POSITION
from scan_core.model.sequence import refine_round_masks, scan_layout
from scan_core.sampling import generate
from scan_core.sampling.judge import spread_groups
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.schedule import cosine_set_sizes, generation_order
from scan_core.sampling.settings import SamplerSettings
from scan_core.sampling.trace import TraceError
from scan_core.sampling.trace_files import parse_trace

GOLDEN = Path(__file__).parent / "golden"
N = 16
SETTINGS = SamplerSettings(num_steps=5, num_rounds=6, tokens_per_round=3, cfg_scale=2.0)
CONFIDENCE = SETTINGS.replace(scorer="confidence")


@pytest.fixture(scope="module")
def scan():
    return ScanSampler(random_model(tiny_config(), seed=31), "scan-tiny")


@pytest.fixture(scope="module")
def randar():
    return ScanSampler(random_model(tiny_config(arch="randar"), seed=32), "randar-tiny")


def full_forward(model, class_ids, codes, order, sizes, queries) -> torch.Tensor:
    """Hidden states (B, S1 + S2 + ..., D) of query blocks appended to the SCAN layout of
    ``codes``, in one forward without a cache. ``queries``: per block (kinds, values, cells
    (B, S), mask (B, S, *)), each mask over the layout's slots and the query slots after it."""
    layout = scan_layout(class_ids, codes, order, sizes)
    length = layout.kinds.shape[1]
    total = length + sum(q[0].shape[1] for q in queries)
    mask = torch.zeros(codes.shape[0], total, total, dtype=torch.bool)
    mask[:, :length, :length] = layout.mask()
    row = length
    for query in queries:
        mask[:, row : row + query[0].shape[1], : query[3].shape[2]] = query[3]
        row += query[0].shape[1]
    layout_parts = (layout.kinds, layout.values, layout.cells)
    kinds, values, cells = (
        torch.cat([part, *(q[i] for q in queries)], dim=1) for i, part in enumerate(layout_parts)
    )
    return model(kinds, values, cells, mask)[:, length:]


def direct_confidence(model, class_ids, codes, order, sizes, cells, hide, block):
    """Token-head probabilities (B, S, V) at position queries for ``cells`` (B, S) after the
    layout: each sees every layout slot but the code slots of the cells ``hide`` (B, S, N) marks
    for it, and the queries ``block`` (S, S) marks. The confidence scorer's documented context.
    Conditional only: no guidance."""
    layout = scan_layout(class_ids, codes, order, sizes)
    batch, count = cells.shape
    slot_cells = layout.cells.clamp(min=0).unsqueeze(1).expand(batch, count, -1)
    hidden_code = (layout.kinds == SLOT_CODE).unsqueeze(1) & hide.gather(2, slot_cells)
    sees = torch.cat([~hidden_code, block.expand(batch, -1, -1)], dim=2)
    query = (torch.full_like(cells, SLOT_POSITION), torch.zeros_like(cells), cells, sees)
    hidden = full_forward(model, class_ids, codes, order, sizes, [query])
    return model.token_logits(hidden).softmax(-1)


def chosen(probs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """probs (B, S, V) at codes (B, S) -> (B, S)."""
    return probs.gather(2, codes.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("arch", ["scan", "randar"])
def test_scores_are_the_token_heads_probability_of_each_code_with_its_group_hidden(arch):
    model = random_model(tiny_config(arch=arch), seed=33)
    sampler = ScanSampler(model, arch)
    codes = np.random.default_rng(4).integers(0, 64, (2, N))
    trace = sampler.score(codes, [3, 7], CONFIDENCE, seed=5)  # with CFG: the conditional half
    assert [s.kind for s in trace.steps] == ["score"] and trace.scorer_at(-1) == "confidence"
    order = generation_order(2, N, sampler._generators(5, 2))  # the order score() draws
    same = spread_groups(N, CONFIDENCE.tokens_per_round, "cpu")  # 6 groups: i, i + 6, i + 12
    assert same.sum(1).tolist() == [3, 3, 3, 3, 2, 2] * 2 + [3] * 4
    cells, truth = torch.arange(N).expand(2, -1), torch.as_tensor(codes)
    sizes = cosine_set_sizes(N, CONFIDENCE.num_steps)
    hide = same.expand(2, -1, -1)
    classes = torch.tensor([3, 7])
    expected = chosen(
        direct_confidence(model, classes, truth, order, sizes, cells, hide, same), truth
    )
    np.testing.assert_allclose(trace.scores_at(-1), expected.numpy(), atol=1e-5)
    # Seeing its own code changes the score, so the comparison above checks the hiding.
    seeing = direct_confidence(model, classes, truth, order, sizes, cells, hide & False, same)
    assert np.abs(trace.scores_at(-1) - chosen(seeing, truth).numpy()).max() > 1e-4  # 10 x atol


def round_scores(model, trace, index: int, scorer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(new, old) scores (B, c) of refinement step ``index`` in the exact context, recomputed by
    one forward without a cache: the layout of the image before the step, then the round's
    queries. Old is the stored score (head) or the old code's confidence in the same context."""
    step = trace.steps[index]
    before = torch.as_tensor(trace.codes_at(index - 1))
    order, cells = torch.as_tensor(trace.order), torch.as_tensor(step.positions)
    classes, candidates = torch.as_tensor(trace.class_ids), torch.as_tensor(step.codes)
    batch, count = cells.shape
    sizes = cosine_set_sizes(N, SETTINGS.num_steps)
    if scorer == "confidence":
        hide = torch.zeros(batch, count, N, dtype=torch.bool)
        hide.scatter_(2, cells.unsqueeze(1).expand(-1, count, -1), True)  # the round's cells
        block = torch.ones(count, count, dtype=torch.bool)
        probs = direct_confidence(model, classes, before, order, sizes, cells, hide, block)
        return chosen(probs, candidates), chosen(probs, before.gather(1, cells))
    layout = scan_layout(classes, before, order, sizes)
    length = layout.kinds.shape[1]
    visible = torch.zeros(batch, length + 2 * count, dtype=torch.bool)
    visible[:, :length] = True
    slots = torch.arange(length, length + 2 * count)
    code_slot = torch.empty(batch, N, dtype=torch.long)
    code_slot.scatter_(1, layout.order, layout.code_slots.expand(batch, -1))
    masks = refine_round_masks(visible, slots[:count], slots[count:], code_slot.gather(1, cells))
    queries = [
        (torch.full_like(cells, SLOT_POSITION), torch.zeros_like(cells), cells, masks[0]),
        (torch.full_like(cells, SLOT_CODE), candidates, cells, masks[1]),
    ]
    hidden = full_forward(model, classes, before, order, sizes, queries)
    new = model.quality_logits(hidden[:, count:]).softmax(-1)[..., 1]
    return new, torch.as_tensor(trace.scores_at(index - 1)).gather(1, cells)


@pytest.mark.parametrize("scorer", ["head", "confidence"])
def test_rounds_accept_exactly_where_the_candidate_scores_higher(scan, scorer):
    settings = SETTINGS.replace(context="exact", scorer=scorer, num_rounds=8)
    trace = run_all(scan.generate([2, 5], settings, seed=6))
    flags = []
    for index, step in enumerate(trace.steps):
        if step.kind != "refine":
            continue
        new, old = round_scores(scan.model, trace, index, scorer)
        accepted = torch.as_tensor(step.accepted)
        clear = (new - old).abs() > 1e-4  # a near tie may fall either way in the last bits
        assert torch.equal(accepted[clear], (new > old)[clear]), f"round at step {index}"
        cells = torch.as_tensor(step.positions)
        stored = torch.as_tensor(trace.scores_at(index - 1)).gather(1, cells)
        after = torch.as_tensor(step.scores).gather(1, cells)
        torch.testing.assert_close(after, torch.where(accepted, new, stored), atol=1e-5, rtol=0)
        flags.append(accepted)
    flags = torch.cat(flags)
    assert flags.any() and not flags.all()  # both outcomes occur: the checks above can fail


@pytest.mark.parametrize("changes", [{"context": "exact"}, {"lookahead": True}])
def test_contexts_agree_in_round_one(scan, changes):
    cached = run_all(scan.generate([3], CONFIDENCE, seed=9))
    other = run_all(scan.generate([3], CONFIDENCE.replace(**changes), seed=9))
    first = next(i for i, s in enumerate(cached.steps) if s.kind == "refine")
    for a, b in zip(cached.steps[: first + 1], other.steps[: first + 1], strict=True):
        assert a.kind == b.kind
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.accepted, b.accepted)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


@pytest.mark.parametrize("scorer", ["head", "confidence"])
@pytest.mark.parametrize("changes", [{}, {"context": "exact"}, {"lookahead": True}])
def test_locked_cells_never_change(scan, scorer, changes):
    locked = np.zeros((2, N), dtype=bool)
    locked[:, :10] = True
    settings = SETTINGS.replace(scorer=scorer, num_rounds=8, tokens_per_round=2, **changes)
    trace = run_all(scan.generate([1, 2], settings, 2, locked))
    refined = [i for i, s in enumerate(trace.steps) if s.kind == "refine"]
    assert refined and not any(locked[0][trace.steps[i].positions[0]].any() for i in refined)
    start = trace.codes_at(refined[0] - 1)
    np.testing.assert_array_equal(start[:, :10], trace.codes_at(-1)[:, :10])
    assert (start != trace.codes_at(-1)).any()  # refinement did change unlocked cells


def test_a_model_without_a_quality_head_refines_by_confidence_and_refuses_the_head(randar):
    trace = run_all(randar.generate([1, 2], SETTINGS, seed=3))  # scorer "auto"
    assert trace.settings["scorer"] == "confidence"  # recorded as resolved
    assert {s.scorer for s in trace.steps} == {"confidence"}
    kinds = [s.kind for s in trace.steps]
    assert kinds[:7] == ["generate"] * 5 + ["score"] * 2  # decoded, then judged in full context
    assert np.isnan(trace.scores_at(4)).all() and np.isfinite(trace.scores_at(6)).all()
    assert kinds[7:] == ["refine"] * SETTINGS.num_rounds
    assert trace.codes_at(-1).tolist() != trace.codes_at(6).tolist()
    for call in (
        lambda: run_all(randar.generate([1], SETTINGS.replace(scorer="head"))),
        lambda: randar.score(trace.codes_at(-1), [1, 2], SETTINGS.replace(scorer="head")),
        lambda: run_all(randar.refine(trace, SETTINGS.replace(scorer="head"))),
    ):
        with pytest.raises(ValueError, match="scorer 'head' needs a quality head") as error:
            call()
        assert "'randar-tiny' (arch randar)" in str(error.value)
        assert "scorer 'confidence' (--scorer confidence)" in str(error.value)


def test_a_quality_head_the_loader_adds_or_finds_all_zero_is_not_trusted(tmp_path):
    source = random_model(tiny_config(arch="randar"))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "r.st")
    added, _ = load_model(tmp_path / "r.st", grid_size=4, want_quality_head=True)
    assert added.config.has_quality_head and not added.quality_head_trained
    assert ScanSampler(added).resolve(SETTINGS).scorer == "confidence"
    assert ScanSampler(added).resolve(SETTINGS.replace(scorer="head")).scorer == "head"
    zero = save_checkpoint(tmp_path / "zero.safetensors", added, "model")  # e.g. a conversion
    again, report = load_model(zero)
    assert not again.quality_head_trained and "all zero" in report.notes[-1]
    trained, report = load_model(
        save_checkpoint(tmp_path / "s.safetensors", random_model(tiny_config()), "model")
    )
    assert trained.quality_head_trained and not report.notes
    assert ScanSampler(trained).resolve(SETTINGS).scorer == "head"


def test_traces_record_the_scorer_per_step_and_old_traces_load(scan):
    head = run_all(scan.generate([4], SETTINGS, seed=1))
    assert {s.scorer for s in head.steps} == {"head"} and head.settings["scorer"] == "head"
    # Switching scorer mid-timeline: the new operation first judges the image its own way.
    switched = run_all(scan.refine(head, CONFIDENCE, seed=2))
    new = switched.steps[len(head) :]
    assert [s.kind for s in new] == ["score"] + ["refine"] * CONFIDENCE.num_rounds
    assert {s.scorer for s in new} == {"confidence"} and np.isfinite(new[0].scores).all()
    assert [s.scorer for s in switched.steps[: len(head)]] == ["head"] * len(head)
    back = run_all(scan.refine(switched, SETTINGS, seed=3))
    assert back.steps[len(switched)].kind == "score" and back.scorer_at(-1) == "head"
    same = run_all(scan.refine(switched, CONFIDENCE, seed=3))  # nothing stale: no new judging
    assert {s.kind for s in same.steps[len(switched) :]} == {"refine"}
    loaded = parse_trace(switched.to_json())
    assert [s.scorer for s in loaded.steps] == [s.scorer for s in switched.steps]
    assert loaded.select(0).scorer_at(-1) == "confidence"
    old = parse_trace((GOLDEN / "trace_before_rename.json").read_text())
    assert old.steps and {s.scorer for s in old.steps} == {"head"}
    payload = json.loads(switched.to_json())
    payload["steps"][0]["scorer"] = "vibes"
    with pytest.raises(TraceError, match="scorer 'vibes'"):
        parse_trace(json.dumps(payload))


@pytest.mark.parametrize(
    "operation", ["cached", "exact", "lookahead", "switch", "branch", "regenerate", "score"]
)
def test_operations_reserve_exactly_their_planned_capacity(scan, monkeypatch, operation):
    base = run_all(scan.generate([2, 5], SETTINGS.replace(num_rounds=0), seed=4))  # head
    exact = CONFIDENCE.replace(context="exact")
    streams = {
        "cached": lambda: scan.generate([1, 2], CONFIDENCE, seed=1),
        "exact": lambda: scan.generate([1, 2], exact, seed=1),
        "lookahead": lambda: scan.generate([1, 2], CONFIDENCE.replace(lookahead=True), seed=1),
        "switch": lambda: scan.refine(base, exact, seed=2),
        "branch": lambda: scan.refine(base.truncated(1), CONFIDENCE, seed=2),
        "regenerate": lambda: scan.regenerate_region(
            base, np.eye(4, dtype=bool), exact, 3, None, True
        ),
    }
    peaks = _peaks(monkeypatch)
    if operation == "score":
        scan.score(base.codes_at(-1), [2, 5], CONFIDENCE)
    else:
        run_all(streams[operation]())
    canvas, peak = peaks.popitem()
    assert not peaks and peak == canvas.capacity


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("confidence")
    torch.manual_seed(0)
    paths = {
        "scan": save_checkpoint(root / "scan.safetensors", random_model(tiny_config()), "model"),
        "randar": save_checkpoint(
            root / "randar.safetensors", random_model(tiny_config(arch="randar")), "model"
        ),
        "vq": save_checkpoint(root / "vq.safetensors", tiny_vq(), "tokenizer"),
    }
    return {name: str(path) for name, path in paths.items()}


def generate_cli(checkpoints, model: str, out, *flags) -> int:
    fast = ["--num-steps", "3", "--num-rounds", "2", "--tokens-per-round", "2"]
    argv = ["--model", checkpoints[model], "--tokenizer", checkpoints["vq"], "--out", str(out)]
    return generate.main([*argv, "--classes", "1", *fast, *flags])


def test_the_generate_flag_reaches_the_sampler(checkpoints, tmp_path, capsys):
    assert generate_cli(checkpoints, "scan", tmp_path / "c", "--scorer", "confidence") == 0
    trace = parse_trace((tmp_path / "c" / "samples" / "c0001_s0000.json").read_text())
    assert trace.settings["scorer"] == "confidence"
    assert {s.scorer for s in trace.steps} == {"confidence"}
    assert (
        json.loads((tmp_path / "c" / "run.json").read_text())["settings"]["scorer"] == "confidence"
    )
    assert generate_cli(checkpoints, "scan", tmp_path / "h") == 0  # default: the trained head
    trace = parse_trace((tmp_path / "h" / "samples" / "c0001_s0000.json").read_text())
    assert {s.scorer for s in trace.steps} == {"head"}
    capsys.readouterr()  # the progress bars so far
    assert generate_cli(checkpoints, "randar", tmp_path / "r", "--scorer", "head") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "--scorer confidence" in err
    assert generate_cli(checkpoints, "randar", tmp_path / "r2") == 0


def test_evaluate_finds_flaws_with_confidence_on_a_model_without_a_quality_head(
    checkpoints, tmp_path, capsys
):
    from scan_core.evaluation import evaluate
    from scan_core.evaluation.classifier import ClassifierConfig, ImageClassifier, save_classifier

    config = ClassifierConfig(num_classes=10, image_size=8, channels=(8, 16), feature_dim=8)
    classifier = save_classifier(tmp_path / "c.safetensors", ImageClassifier(config).eval())
    rng = np.random.default_rng(0)
    for split, count in (("train", 20), ("val", 20)):
        images = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
        np.savez(tmp_path / f"{split}.npz", images=images, labels=np.arange(count) % 10)
    argv = ["--model", checkpoints["randar"], "--tokenizer", checkpoints["vq"]]
    argv += ["--classifier", str(classifier), "--data", str(tmp_path), "--no-progress"]
    argv += ["--num-steps", "4", "--num-rounds", "2", "--tokens-per-round", "2", "--quick"]
    argv += ["--samples", "10", "--batch-size", "5", "--batch1", "0"]
    assert evaluate.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["scorer"] == "confidence"
    for source in ("random", "permuted", "teacher"):
        assert 0 <= summary[f"auroc_{source}"] <= 1
    assert evaluate.parse_args([*argv, "--scorer", "head"]).scorer == "head"
    assert evaluate.main([*argv, "--scorer", "head"]) == 2
    assert "needs a quality head" in capsys.readouterr().err


def test_the_studio_engine_serves_a_model_without_a_quality_head():
    from app.engine import Engine

    engine = Engine.from_modules(random_model(tiny_config(arch="randar")), tiny_vq())
    assert "this model has no quality head: cells are scored by confidence" in engine.bundle.notes
    settings = engine.default_settings().replace(num_steps=4, num_rounds=2, tokens_per_round=2)
    assert settings.scorer == "auto"
    trace = run_all(engine.generate([1], settings, seed=0))
    assert trace.scorer_at(-1) == "confidence" and [s.kind for s in trace.steps][-1] == "refine"
    upload = engine.score(trace.codes_at(-1), [1], settings)  # an upload's heatmap
    assert upload.scorer_at(-1) == "confidence" and np.isfinite(upload.scores_at(-1)).all()
