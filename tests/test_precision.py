"""--dtype: which precision ``auto`` picks, and how close bfloat16 stays to float32.

The agreement bounds are measured on the embedded emoji model (36 images, one thread): greedy
codes agreed with float32 on 96% of cells at T = 0 and 95% at T = 16; scores of the same codes
differed by at most 0.016 (head) and 0.012 (confidence), 0.0008 on average. The tests hold a
margin below those figures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine import Engine
from scan_core import SamplerSettings, ScanSampler, choose_dtype, load_model, run_all
from scan_core.model.precision import cpu_flags, native_bf16

EMBEDDED = "checkpoints/scan-emoji.safetensors"
AVX2 = {"sse4_2", "avx", "avx2", "fma"}
AVX512_BF16 = AVX2 | {"avx512f", "avx512_bf16"}
CODES_AGREE = 0.90  # fraction of cells where greedy bf16 codes equal fp32's
SCORE_MAX_ERROR = 0.05
SCORE_MEAN_ERROR = 0.005


def test_auto_takes_bf16_only_where_the_cpu_computes_it():
    assert choose_dtype("auto", "cpu", AVX512_BF16)[0] == torch.bfloat16
    assert choose_dtype("auto", "cpu", AVX2 | {"amx_bf16"})[0] == torch.bfloat16
    dtype, why = choose_dtype("auto", "cpu", AVX2)
    assert dtype == torch.float32 and "no native bfloat16" in why
    assert choose_dtype("float32", "cpu", AVX512_BF16)[0] == torch.float32
    dtype, why = choose_dtype("bfloat16", "cpu", AVX2)  # allowed, with the cost said
    assert dtype == torch.bfloat16 and "slower" in why


def test_auto_on_cuda_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_dtype("auto", "cuda")[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_dtype("auto", "cuda")[0] == torch.float32


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="float16.*auto, float32, bfloat16"):
        choose_dtype("float16", "cpu")


def test_cpu_flags_read_x86_and_arm_text():
    assert "avx512_bf16" in cpu_flags("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert native_bf16("cpu", cpu_flags("processor\t: 0\nflags\t\t: fpu avx2\n")) is False
    assert cpu_flags("Features\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}


@pytest.fixture(scope="module")
def samplers():
    torch.set_num_threads(1)
    fp32, _ = load_model(EMBEDDED)
    bf16, _ = load_model(EMBEDDED, dtype=torch.bfloat16)
    return ScanSampler(fp32, "fp32"), ScanSampler(bf16, "bf16")


@pytest.mark.parametrize("rounds", [0, 16])
def test_greedy_bf16_codes_agree_with_fp32(samplers, rounds):
    settings = SamplerSettings(num_steps=16, num_rounds=rounds, tokens_per_round=2, top_k=1)
    classes = list(range(18))
    fp32, bf16 = (run_all(s.generate(classes, settings, seed=0)).codes_at() for s in samplers)
    assert (fp32 >= 0).all() and (bf16 >= 0).all()
    assert (fp32 == bf16).mean() >= CODES_AGREE


@pytest.mark.parametrize("scorer", ["head", "confidence"])
def test_bf16_scores_of_the_same_codes_stay_close(samplers, scorer):
    classes = list(range(18))
    codes = run_all(samplers[0].generate(classes, SamplerSettings(num_steps=16, num_rounds=0)))
    settings = SamplerSettings(scorer=scorer)
    fp32, bf16 = (s.score(codes.codes_at(), classes, settings).scores_at() for s in samplers)
    error = np.abs(fp32 - bf16)
    assert np.isfinite(bf16).all()
    assert error.max() <= SCORE_MAX_ERROR and error.mean() <= SCORE_MEAN_ERROR


def test_engine_runs_the_model_in_the_chosen_dtype():
    engine = Engine(device="cpu", dtype="bfloat16")
    bundle = engine.load()
    assert next(bundle.model.parameters()).dtype == torch.bfloat16
    assert next(bundle.tokenizer.parameters()).dtype == torch.float32  # codes need fp32 distances
    assert engine.precision.startswith("bfloat16")
    settings = SamplerSettings(num_steps=4, num_rounds=2, tokens_per_round=2)
    trace = run_all(engine.generate([0], settings, seed=1))
    assert (trace.codes_at() >= 0).all() and engine.decode(trace.codes_at()).dtype == np.uint8
    assert Engine(device="cpu").dtype == torch.float32  # the library default stays exact
    with pytest.raises(ValueError, match="unknown dtype"):
        Engine(device="cpu", dtype="half")
