"""Checkpoints: own-format round trips, every foreign layout, atomic saves, and every bad input."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import random_model
from raster_reference import raster_layout
from safetensors.torch import save_file

from scan_core.checkpoint import files as checkpoint  # save_file is patched where it is called
from scan_core.checkpoint.cli import main
from scan_core.checkpoint.convert import average, convert
from scan_core.checkpoint.loading import (
    CheckpointError,
    inspect,
    load_model,
    load_pair,
    load_tokenizer,
    model_preset_name,
    pair_mismatch,
    resolve_path,
    save_checkpoint,
)
from scan_core.model.config import MODEL_PRESETS, ModelConfig, vq_preset
from scan_core.model.network import Transformer
from scan_core.model.sequence import scan_layout
from scan_core.tokenizer.vq import VQModel

REPO = Path(__file__).resolve().parents[1]
HEAD_ADDED = (
    "dis_norm.weight, dis_output.weight (quality head untrained: fine-tune before trusting scores)"
)


def small_config(arch: str = "scan", **changes) -> ModelConfig:
    """head_dim 64 like every published model, so n_head is inferable; 4x4 grid."""
    base = ModelConfig(
        dim=128, n_layer=2, n_head=2, vocab_size=64, num_classes=10, grid_size=4, arch=arch
    )
    return base.replace(**changes)


def plain(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def random_tokenizer(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    model = VQModel(vq_preset("VQ-tiny"))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model.eval()


@torch.no_grad()
def scan_outputs(model: Transformer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token logits at p slots and quality logits at x slots of a full SCAN sequence."""
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 64, (2, 16), generator=generator)
    order = torch.stack([torch.randperm(16, generator=generator) for _ in range(2)])
    layout = scan_layout(torch.tensor([3, 10]), codes, order, [1, 3, 5, 7])
    hidden = model(layout.kinds, layout.values, layout.cells, layout.mask())
    tokens = model.token_logits(hidden[:, layout.position_slots])
    quality = None
    if model.config.has_quality_head:
        quality = model.quality_logits(hidden[:, layout.code_slots])
    return tokens, quality


@torch.no_grad()
def raster_outputs(model: Transformer) -> torch.Tensor:
    codes = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    layout = raster_layout(torch.tensor([0, 7]), codes)
    return model.token_logits(model(layout.kinds, layout.values, layout.cells, layout.mask()))


@torch.no_grad()
def decoded(tokenizer: VQModel) -> torch.Tensor:
    codes = torch.randint(0, 64, (1, 8, 8), generator=torch.Generator().manual_seed(3))
    return tokenizer.decode_codes(codes)


def assert_same_outputs(source: Transformer, loaded: Transformer) -> None:
    if source.config.has_pos_instruct:
        (t1, q1), (t2, q2) = scan_outputs(source), scan_outputs(loaded)
        torch.testing.assert_close(t2, t1, rtol=0, atol=0)
        if q1 is not None:
            torch.testing.assert_close(q2, q1, rtol=0, atol=0)
    else:
        torch.testing.assert_close(raster_outputs(loaded), raster_outputs(source), rtol=0, atol=0)


# ------------------------------------------------------------------------------ foreign layouts


def test_scan_safetensors_loads_as_scan(tmp_path):
    source = random_model(small_config())
    save_file(plain(source), tmp_path / "scan.safetensors")
    model, report = load_model(tmp_path / "scan.safetensors", grid_size=4)
    assert model.config.arch == "scan" and report.layout == "SCAN"
    assert model.config.ffn_dim == source.config.ffn_dim and not model.training
    assert not report.added and not report.dropped
    assert report.num_parameters == source.num_parameters()
    assert_same_outputs(source, model)


def test_a_file_without_its_grid_takes_the_paired_tokenizers(tmp_path):
    tokenizer = random_tokenizer()  # VQ-tiny: 16 px images, an 8x8 grid
    vq_path = save_checkpoint(tmp_path / "vq.safetensors", tokenizer, "tokenizer")
    source = random_model(small_config("randar", grid_size=8))
    save_file(plain(source), tmp_path / "randar.safetensors")
    alone, report = load_model(tmp_path / "randar.safetensors")
    assert alone.config.grid_size == 16 and "using 16" in " ".join(report.notes)

    model, tokenizer, report = load_pair(tmp_path / "randar.safetensors", vq_path)
    assert model.config.grid_size == tokenizer.config.grid_size == 8
    assert "grid_size not stored in the weights: using 8, the tokenizer's" in report.notes
    assert_same_outputs(source, model)

    # A file that stores its grid keeps it, and a real conflict is refused.
    own = random_model(small_config(grid_size=8))
    own_path = save_checkpoint(tmp_path / "own.safetensors", own, "model")
    assert load_pair(own_path, vq_path)[0].config.grid_size == 8
    narrow_path = save_checkpoint(
        tmp_path / "narrow.safetensors", random_model(small_config()), "model"
    )
    with pytest.raises(CheckpointError, match="model grid 4.*tokenizer grid 8"):
        load_pair(narrow_path, vq_path)


def test_randar_loads_as_randar_or_gets_a_fresh_quality_head(tmp_path):
    source = random_model(small_config("randar"))
    save_file(plain(source), tmp_path / "randar.safetensors")
    model, report = load_model(tmp_path / "randar.safetensors", grid_size=4)
    assert model.config.arch == "randar" and report.layout == "RandAR" and not report.added
    assert_same_outputs(source, model)

    scan, report = load_model(tmp_path / "randar.safetensors", grid_size=4, want_quality_head=True)
    assert scan.config.arch == "scan"
    assert [str(change) for change in report.added] == [HEAD_ADDED]
    assert f"added:      {HEAD_ADDED}" in str(report)
    tokens, quality = scan_outputs(scan)
    torch.testing.assert_close(tokens, scan_outputs(source)[0], rtol=0, atol=0)
    assert torch.all(quality == 0)  # untrained head: every score is exactly 0.5


def test_scan_file_can_be_loaded_without_its_quality_head(tmp_path):
    source = random_model(small_config())
    save_file(plain(source), tmp_path / "scan.safetensors")
    model, report = load_model(tmp_path / "scan.safetensors", grid_size=4, want_quality_head=False)
    assert model.config.arch == "randar"
    assert report.dropped[0].keys == ("dis_norm.weight", "dis_output.weight")
    torch.testing.assert_close(scan_outputs(model)[0], scan_outputs(source)[0], rtol=0, atol=0)


@pytest.mark.parametrize("wrapped", [True, False], ids=["model-entry", "raw-dict"])
def test_llamagen_gpt_pt_drops_freqs_cis(tmp_path, wrapped):
    source = random_model(small_config("llamagen"))
    sd = plain(source) | {"freqs_cis": torch.randn(17, 32, 2)}
    torch.save({"model": sd, "steps": 100} if wrapped else sd, tmp_path / "gpt.pt")
    model, report = load_model(tmp_path / "gpt.pt", grid_size=4)
    assert model.config.arch == "llamagen" and report.layout == "LlamaGen GPT"
    assert [change.keys for change in report.dropped] == [("freqs_cis",)]
    assert "freqs_cis (derived RoPE table" in str(report)
    assert ("ignored file entries besides the weights: steps" in report.notes) == wrapped
    assert_same_outputs(source, model)
    with pytest.raises(CheckpointError, match="cannot become a SCAN model.*RandAR"):
        load_model(tmp_path / "gpt.pt", want_quality_head=True)


def test_llamagen_vq_pt_drops_codebook_used_and_decodes_identically(tmp_path):
    source = random_tokenizer()
    other = random_tokenizer(seed=1)
    sd = plain(source) | {"quantize.codebook_used": torch.zeros(65536)}
    entries = {"model": sd, "ema": plain(other), "optimizer": {"state": {}, "param_groups": []}}
    torch.save(entries, tmp_path / "vq.pt")
    tokenizer, report = load_tokenizer(tmp_path / "vq.pt")
    assert report.kind == "tokenizer" and report.layout == "LlamaGen VQ"
    assert report.preset == "VQ-tiny" and tokenizer.config == source.config
    assert [change.keys for change in report.dropped] == [("quantize.codebook_used",)]
    assert "ignored file entries besides the weights: ema, optimizer" in report.notes
    torch.testing.assert_close(decoded(tokenizer), decoded(source), rtol=0, atol=0)


def test_wrapper_prefix_is_stripped_and_reported(tmp_path):
    source = random_model(small_config("randar"))
    save_file({f"module.{k}": v for k, v in plain(source).items()}, tmp_path / "ddp.safetensors")
    model, report = load_model(tmp_path / "ddp.safetensors", grid_size=4)
    assert "module.* -> *" in str(report.renamed[0])
    assert_same_outputs(source, model)


def test_legacy_torch_pickle_loads(tmp_path):
    source = random_model(small_config("llamagen"))
    torch.save({"model": plain(source)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    model, _ = load_model(tmp_path / "old.pt", grid_size=4)
    assert_same_outputs(source, model)


@pytest.mark.parametrize("first_byte", [0x80, ord("P")])
def test_container_is_sniffed_from_content_not_name(tmp_path, first_byte):
    """A safetensors header length can start with a pickle or zip byte; names can lie."""
    source = random_model(small_config("randar"))
    path = tmp_path / "weights.pt"
    save_file(plain(source), path, metadata={"pad": ""})
    # The header is padded to 8 bytes and both targets are multiples of 8: grow it exactly.
    pad = (first_byte - path.read_bytes()[0]) % 256
    save_file(plain(source), path, metadata={"pad": "x" * pad})
    assert path.read_bytes()[0] == first_byte
    assert_same_outputs(source, load_model(path, grid_size=4)[0])
    torch.save({"model": plain(source)}, tmp_path / "archive.safetensors")
    assert_same_outputs(source, load_model(tmp_path / "archive.safetensors", grid_size=4)[0])


def test_config_inference_finds_multiple_of_and_preset_head_counts(tmp_path):
    source = random_model(small_config("randar", multiple_of=32))  # ffn 352, not 512
    save_file(plain(source), tmp_path / "m.safetensors")
    assert inspect(tmp_path / "m.safetensors").config.multiple_of == 32
    tiny = random_model(MODEL_PRESETS["SCAN-tiny"][0])  # head_dim 16: n_head from the preset
    save_file(plain(tiny), tmp_path / "tiny.safetensors")
    model, report = load_model(tmp_path / "tiny.safetensors")
    assert report.preset == "SCAN-tiny" and model.config.n_head == 4
    assert model.config.grid_size == 4  # the preset's grid when the caller gives none
    assert_same_outputs(tiny, model)


@pytest.mark.parametrize(
    ("sizes", "arch", "name"),
    [
        ((768, 12, 12), "llamagen", "LlamaGen GPT-B"),
        ((1024, 24, 16), "llamagen", "LlamaGen GPT-L"),
        ((3200, 24, 32), "llamagen", "LlamaGen GPT-3B"),
        ((1024, 24, 16), "randar", "RandAR-L"),
        ((1280, 36, 20), "randar", "RandAR-XL"),
        ((1536, 48, 24), "scan", "SCAN-XXL"),
        ((768, 12, 12), "scan", None),
        ((256, 6, 4), "randar", None),
    ],
)
def test_preset_names(sizes, arch, name):
    dim, n_layer, n_head = sizes
    config = ModelConfig(dim=dim, n_layer=n_layer, n_head=n_head, arch=arch)
    assert model_preset_name(config) == name


# ---------------------------------------------------------------------------------- own format


@pytest.mark.parametrize("arch", ["scan", "randar", "llamagen"])
def test_own_format_round_trip(tmp_path, arch):
    source = random_model(small_config(arch, resid_dropout=0.0))
    card = {"trained_on": "noise", "steps": 3}
    path = save_checkpoint(tmp_path / "m.safetensors", source, "model", {"card": card})
    model, report = load_model(path)
    assert model.config == source.config  # grid, dropouts and arch come from the metadata
    assert report.layout == "scan-studio" and report.card == card and not report.notes
    assert_same_outputs(source, model)
    bf16, _ = load_model(path, dtype=torch.bfloat16)
    assert bf16.tok_embeddings.weight.dtype == torch.bfloat16


def test_own_format_tokenizer_round_trip_and_overrides(tmp_path):
    source = random_tokenizer()
    path = save_checkpoint(tmp_path / "vq.safetensors", source, "tokenizer")
    tokenizer, report = load_tokenizer(path)
    assert tokenizer.config == source.config and report.preset == "VQ-tiny"
    torch.testing.assert_close(decoded(tokenizer), decoded(source), rtol=0, atol=0)
    _, report = load_tokenizer(path, image_size=32)
    assert report.config.image_size == 32 and "image_size overridden: 16" in report.notes[0]


def test_average_writes_the_mean_of_runs_of_one_model(tmp_path):
    runs = [random_model(small_config(), seed=seed) for seed in (1, 2, 3)]
    paths = [
        save_checkpoint(tmp_path / f"s{i}.safetensors", m, "model") for i, m in enumerate(runs)
    ]
    out = tmp_path / "mean.safetensors"
    assert main(["average", *map(str, paths), "--out", str(out)]) == 0
    model, report = load_model(out)
    assert model.config == runs[0].config and report.layout == "scan-studio"
    for name, tensor in model.state_dict().items():
        expected = sum(m.state_dict()[name].double() for m in runs) / 3
        torch.testing.assert_close(tensor, expected.float(), rtol=0, atol=1e-6)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        averaged = json.loads(handle.metadata()["source"])["averaged"]
    assert averaged == ["s0.safetensors", "s1.safetensors", "s2.safetensors"]


def test_average_refuses_one_file_and_different_models(tmp_path, capsys):
    one = save_checkpoint(tmp_path / "a.safetensors", random_model(small_config()), "model")
    wide = random_model(small_config(dim=256, n_head=4))
    other = save_checkpoint(tmp_path / "b.safetensors", wide, "model")
    vq = save_checkpoint(tmp_path / "vq.safetensors", random_tokenizer(), "tokenizer")
    with pytest.raises(CheckpointError, match="at least two"):
        average([one], tmp_path / "out.safetensors")
    for second in (other, vq):
        out = str(tmp_path / "o.safetensors")
        assert main(["average", str(one), str(second), "--out", out]) == 2
        assert "average runs of one model only" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "out.safetensors").exists()


def test_convert_randar_to_scan_records_provenance(tmp_path):
    source = random_model(small_config("randar"))
    save_file(plain(source), tmp_path / "randar.safetensors")
    out = tmp_path / "scan.safetensors"
    report = convert(
        tmp_path / "randar.safetensors", out, grid_size=4, want_quality_head=True, card={"a": 1}
    )
    assert [str(change) for change in report.added] == [HEAD_ADDED]
    model, again = load_model(out)
    assert model.config.arch == "scan" and not again.added and again.card == {"a": 1}
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        source_meta = json.loads(handle.metadata()["source"])
    assert source_meta["file"] == "randar.safetensors" and source_meta["added"] == [HEAD_ADDED]
    torch.testing.assert_close(scan_outputs(model)[0], scan_outputs(source)[0], rtol=0, atol=0)


def test_convert_llamagen_vq_then_load(tmp_path):
    source = random_tokenizer()
    sd = plain(source) | {"quantize.codebook_used": torch.zeros(65536)}
    torch.save({"model": sd}, tmp_path / "vq.pt")
    report = convert(tmp_path / "vq.pt", tmp_path / "vq.safetensors")
    assert report.kind == "tokenizer" and report.dropped
    tokenizer, again = load_tokenizer(tmp_path / "vq.safetensors")
    assert again.layout == "scan-studio" and not again.dropped and again.preset == "VQ-tiny"
    torch.testing.assert_close(decoded(tokenizer), decoded(source), rtol=0, atol=0)


def test_save_handles_shared_and_strided_tensors(tmp_path):
    source = random_model(small_config())
    source.output.weight = source.tok_embeddings.weight  # tied: one storage, two keys
    wo = source.layers[0].attention.wo
    wo.weight = torch.nn.Parameter(wo.weight.detach().t().clone().t())  # non-contiguous
    compiled = torch.nn.Module()  # stands in for torch.compile's wrapper (keys "_orig_mod.*")
    compiled._orig_mod = source
    path = save_checkpoint(tmp_path / "m.safetensors", compiled, "model")
    model, report = load_model(path)
    assert not report.renamed
    assert_same_outputs(source, model)


def test_save_rejects_meta_modules_and_wrong_kind(tmp_path):
    with torch.device("meta"):
        ghost = Transformer(small_config())
    with pytest.raises(ValueError, match="meta device"):
        save_checkpoint(tmp_path / "m.safetensors", ghost, "model")
    with pytest.raises(ValueError, match="does not match"):
        save_checkpoint(tmp_path / "m.safetensors", random_tokenizer(), "model")
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "m.safetensors", random_tokenizer(), "tokenizer", {"kind": "x"})


@pytest.mark.parametrize("existing", [False, True])
def test_save_is_atomic(tmp_path, monkeypatch, existing):
    path = tmp_path / "m.safetensors"
    if existing:
        save_checkpoint(path, random_model(small_config()), "model")
    before = path.read_bytes() if existing else None

    def crash_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, random_model(small_config(), seed=1), "model")
    assert sorted(os.listdir(tmp_path)) == (["m.safetensors"] if existing else [])
    if existing:
        assert path.read_bytes() == before


# -------------------------------------------------------------------------------- bad inputs


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nope\.pt.*hf://"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="vq_ds16_c2i.pt"):
        load_tokenizer(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        inspect(tmp_path)


def test_truncated_and_corrupted_files(tmp_path):
    source = random_model(small_config("llamagen"))
    save_file(plain(source), tmp_path / "full.safetensors")
    torch.save({"model": plain(source)}, tmp_path / "full.pt")
    for name in ("full.safetensors", "full.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupted.*re-download"):
            load_model(tmp_path / f"cut-{name}")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or empty"):
        load_model(tmp_path / "empty.pt")
    (tmp_path / "notes.txt").write_text("these are not the weights you are looking for")
    with pytest.raises(CheckpointError, match="neither a safetensors file nor a torch.save"):
        load_model(tmp_path / "notes.txt")


def test_wrong_kind_says_which_flag(tmp_path):
    torch.save({"model": plain(random_tokenizer())}, tmp_path / "vq.pt")
    save_checkpoint(tmp_path / "own-vq.safetensors", random_tokenizer(), "tokenizer")
    save_file(plain(random_model(small_config())), tmp_path / "gpt.safetensors")
    for name in ("vq.pt", "own-vq.safetensors"):
        with pytest.raises(
            CheckpointError, match="VQ tokenizer checkpoint; pass it as --tokenizer"
        ):
            load_model(tmp_path / name)
    with pytest.raises(CheckpointError, match="transformer checkpoint; pass it as --model"):
        load_tokenizer(tmp_path / "gpt.safetensors")


def test_unknown_missing_and_inconsistent_keys(tmp_path):
    sd = plain(random_model(small_config()))
    save_file(sd | {"extra.weight": torch.ones(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="unknown keys extra.weight"):
        load_model(tmp_path / "extra.safetensors")
    save_file({k: v for k, v in sd.items() if k != "norm.weight"}, tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError, match="missing keys norm.weight"):
        load_model(tmp_path / "short.safetensors")
    bad = sd | {"layers.1.attention.wo.weight": torch.ones(128, 64)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(
        CheckpointError, match=r"at layers.1.attention.wo.weight: expected \(128, 128"
    ):
        load_model(tmp_path / "bad.safetensors")
    save_file({"weight": torch.ones(3)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a SCAN/RandAR/LlamaGen checkpoint"):
        inspect(tmp_path / "other.safetensors")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_model(tmp_path / "list.pt")


def own_format_file(path: Path, tensors: dict, config: dict, version: str = "1") -> Path:
    metadata = {"format": "scan-studio", "version": version, "kind": "model"}
    save_file(tensors, path, metadata=metadata | {"config": json.dumps(config), "preset": ""})
    return path


def test_own_format_config_mismatch_names_key_and_fitting_preset(tmp_path):
    tiny_config = MODEL_PRESETS["SCAN-tiny"][0]
    tensors = plain(random_model(tiny_config))
    claimed = tiny_config.replace(vocab_size=32).to_dict()
    path = own_format_file(tmp_path / "m.safetensors", tensors, claimed)
    message = r"tok_embeddings.weight: expected \(32, 64\).*found \(64, 64\).*fit SCAN-tiny"
    with pytest.raises(CheckpointError, match=message):
        load_model(path)
    path = own_format_file(tmp_path / "v2.safetensors", tensors, tiny_config.to_dict(), "2")
    with pytest.raises(CheckpointError, match="version '2'.*reads version 1"):
        load_model(path)
    randar = plain(random_model(small_config("randar")))
    path = own_format_file(tmp_path / "arch.safetensors", randar, small_config().to_dict())
    with pytest.raises(CheckpointError, match="missing keys dis_norm.weight, dis_output.weight"):
        load_model(path)
    broken = tiny_config.to_dict() | {"depth": 3}
    path = own_format_file(tmp_path / "cfg.safetensors", tensors, broken)
    with pytest.raises(CheckpointError, match="invalid config.*depth"):
        inspect(path)


def test_pickle_with_namespace_needs_the_trust_flag(tmp_path):
    source = random_tokenizer()
    args = argparse.Namespace(vq_model="VQ-16", lr=1e-4)
    torch.save({"model": plain(source), "args": args}, tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match=r"argparse.Namespace.*trust_pickle=True"):
        load_tokenizer(tmp_path / "vq.pt")
    tokenizer, report = load_tokenizer(tmp_path / "vq.pt", trust_pickle=True)
    assert any("trust_pickle=True" in note for note in report.notes)
    torch.testing.assert_close(decoded(tokenizer), decoded(source), rtol=0, atol=0)


# ------------------------------------------------------------------------------ hub and CLI


def test_resolve_path_local_and_hub_without_network(tmp_path, monkeypatch):
    local = tmp_path / "w.safetensors"
    local.write_bytes(b"x")
    assert resolve_path(str(local)) == local
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now fails
    with pytest.raises(CheckpointError, match="needs the huggingface_hub package"):
        resolve_path("hf://FoundationVision/LlamaGen/vq_ds16_c2i.pt")

    def offline(repo_id, filename):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    fake = types.SimpleNamespace(hf_hub_download=offline)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    with pytest.raises(CheckpointError, match="could not fetch.*offline.*download vq_ds16_c2i.pt"):
        resolve_path("hf://FoundationVision/LlamaGen/vq_ds16_c2i.pt")
    fake.hf_hub_download = lambda repo_id, filename: str(local)
    assert resolve_path("hf://someone/repo/sub/w.safetensors") == local
    with pytest.raises(CheckpointError, match="hf://owner/repo/filename"):
        resolve_path("hf://only-a-repo")


def test_cli_inspect_convert_and_errors(tmp_path, capsys):
    save_file(plain(random_model(small_config("randar"))), tmp_path / "r.safetensors")
    assert main(["inspect", str(tmp_path / "r.safetensors"), "--grid-size", "4"]) == 0
    shown = capsys.readouterr().out
    assert "RandAR layout" in shown and "parameters: " in shown and "grid=4x4" in shown
    out = tmp_path / "s.safetensors"
    argv = ["convert", str(tmp_path / "r.safetensors"), str(out), "--quality-head", "yes"]
    assert main([*argv, "--dtype", "bfloat16", "--card", '{"note": "demo"}']) == 0
    assert HEAD_ADDED in capsys.readouterr().out
    model, report = load_model(out)
    assert model.config.arch == "scan" and report.card == {"note": "demo"}
    assert model.output.weight.dtype == torch.bfloat16
    assert main(["inspect", str(tmp_path / "missing.pt")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no checkpoint at") and error.count("\n") == 1
    assert main([*argv, "--card", "[1]"]) == 2
    torch.save({"model": plain(random_tokenizer()), "args": argparse.Namespace(a=1)}, out)
    assert main(["inspect", str(out)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["inspect", str(out), "--trust-pickle"]) == 0
    assert "LlamaGen VQ layout" in capsys.readouterr().out


def sparse_safetensors(path: Path, config: ModelConfig) -> Path:
    """A full-size file whose data is a hole: the header is real, no bytes are allocated."""
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in Transformer(config).state_dict().items()}
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 4 * torch.Size(shape).numel()
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        handle.truncate(8 + len(text) + offset)
    return path


def test_inspect_scan_l_reads_the_header_only(tmp_path):
    """1.37 GB of SCAN-L weights: `python -m scan_core checkpoint inspect` stays far below that."""
    path = sparse_safetensors(tmp_path / "scan_l.safetensors", MODEL_PRESETS["SCAN-L"][0])
    # VmHWM is this process's own peak: getrusage's ru_maxrss would also count the memory of
    # the pytest process it was forked from (Linux keeps that high-water mark across exec).
    script = (
        "import runpy, sys\n"
        "sys.argv = ['scan_core', 'checkpoint', 'inspect', sys.argv[1]]\n"
        "try:\n    runpy.run_module('scan_core', run_name='__main__')\n"
        "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print('maxrss_kb', peak.split()[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "preset:     SCAN-L" in result.stdout and "parameters: 342,915,072" in result.stdout
    maxrss_mb = int(result.stdout.split("maxrss_kb")[-1]) / 1024
    assert maxrss_mb < 900, f"inspect used {maxrss_mb:.0f} MB for a header-only read"


def test_pair_mismatch_names_both_sides_and_passes_a_matching_pair():
    vq = vq_preset("VQ-S")  # 8 x 8 grid, 512 codes
    model = ModelConfig(dim=64, n_layer=1, n_head=2, grid_size=8, vocab_size=512)
    assert pair_mismatch(model, vq) is None
    message = pair_mismatch(ModelConfig(dim=64, n_layer=1, n_head=2, grid_size=16), vq)
    assert "model grid 16" in message and "tokenizer grid 8" in message
    assert "codebook 512" in message
