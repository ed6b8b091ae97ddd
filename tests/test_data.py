"""Code shards, manifests, the dataset and its sampler, and image -> code extraction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from scan_core.checkpoint.loading import save_checkpoint
from scan_core.datasets import extract_codes as extract_module
from scan_core.datasets.codes import (
    CodesDataset,
    ResumableDistributedSampler,
    read_manifest,
    synthetic_codes,
    write_code_directory,
)
from scan_core.datasets.extract_codes import ExtractionError, extract, file_sha256
from scan_core.images import center_crop_adm, load_image, pil_to_tensor
from scan_core.model.config import vq_preset
from scan_core.tokenizer.vq import VQModel


def _codes_dir(tmp_path, count=40, config=None, shard_size=16):
    config = config or tiny_config()
    codes, labels = synthetic_codes(count, config, generator=torch.Generator().manual_seed(0))
    write_code_directory(tmp_path / "codes", codes, labels, config.vocab_size, shard_size)
    return tmp_path / "codes", codes, labels


# --- shards and the dataset ---------------------------------------------------------------------


def test_dataset_round_trips_shards(tmp_path):
    directory, codes, labels = _codes_dir(tmp_path)
    dataset = CodesDataset(directory, tiny_config())
    assert len(dataset) == 40 and len(dataset.manifest["shards"]) == 3
    assert dataset.codes.dtype == np.uint16
    batch_codes, batch_labels = dataset.batch([3, 0, 39])
    assert torch.equal(batch_codes, codes[[3, 0, 39]].view(3, -1))
    assert torch.equal(batch_labels, labels[[3, 0, 39]])
    item_codes, item_label = dataset[5]
    assert item_codes.shape == (16,) and int(item_label) == int(labels[5])


def test_dataset_refuses_another_grid_or_vocabulary_naming_both(tmp_path):
    directory, _, _ = _codes_dir(tmp_path)
    with pytest.raises(ValueError, match=r"vocab 64, grid 4x4.*expects vocab 512, grid 8x8"):
        CodesDataset(directory, tiny_config(vocab_size=512, grid_size=8))
    with pytest.raises(ValueError, match="only 2"):
        CodesDataset(directory, tiny_config(num_classes=2))


def test_dataset_refuses_codes_from_another_tokenizer_file(tmp_path):
    config = tiny_config()
    codes, labels = synthetic_codes(8, config)
    tokenizer = {"sha256": "a" * 64, "path": "vq_a.safetensors", "config": None}
    write_code_directory(tmp_path, codes, labels, config.vocab_size, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"vq_a.safetensors \(sha256 aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        CodesDataset(tmp_path, config, tokenizer_sha256="b" * 64)
    CodesDataset(tmp_path, config, tokenizer_sha256="a" * 64)  # the same file is fine


def test_unfinished_or_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="extract codes first"):
        read_manifest(tmp_path)
    directory, _, _ = _codes_dir(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    with pytest.raises(ValueError, match="unfinished extraction"):
        CodesDataset(directory)


def test_flipped_codes_are_picked_at_random_per_row(tmp_path):
    directory, codes, _ = _codes_dir(tmp_path, count=8, shard_size=8)
    shard = dict(np.load(directory / "shard_00000.npz"))
    shard["codes_flip"] = shard["codes"][:, :, ::-1].copy()
    np.savez(directory / "shard_00000.npz", **shard)
    dataset = CodesDataset(directory)
    picked, _ = dataset.batch(np.zeros(64, dtype=np.int64), torch.Generator().manual_seed(0))
    plain = codes[0].reshape(-1)
    flipped = codes[0].flip(-1).reshape(-1)
    is_plain = (picked == plain).all(dim=1)
    is_flip = (picked == flipped).all(dim=1)
    assert (is_plain | is_flip).all() and is_plain.any() and is_flip.any()


def test_sampler_splits_ranks_and_resumes_mid_epoch(tmp_path):
    directory, _, _ = _codes_dir(tmp_path, count=20)
    dataset = CodesDataset(directory)
    ranks = [ResumableDistributedSampler(dataset, 2, rank, seed=3) for rank in range(2)]
    for sampler in ranks:
        sampler.set_position(epoch=1, start_index=0)
    shares = [list(sampler) for sampler in ranks]
    assert sorted(shares[0] + shares[1]) == list(range(20))
    ranks[0].set_position(epoch=1, start_index=4)
    assert list(ranks[0]) == shares[0][4:] and len(ranks[0]) == 6
    ranks[0].set_position(epoch=2, start_index=0)
    assert list(ranks[0]) != shares[0]  # a new shuffle every epoch


# --- extraction ---------------------------------------------------------------------------------


@pytest.fixture
def tokenizer_file(tmp_path):
    torch.manual_seed(0)
    tokenizer = VQModel(vq_preset("VQ-tiny")).eval()
    return save_checkpoint(tmp_path / "vq_tiny.safetensors", tokenizer, "tokenizer"), tokenizer


def _images(root, per_class=3, classes=("cat", "dog"), bad=1):
    generator = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            size = (20 + 3 * index, 18 + index)
            pixels = generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    for index in range(bad):
        (root / classes[0] / f"broken{index}.png").write_bytes(b"\x89PNG not really")
    (root / classes[0] / "notes.txt").write_text("not an image, ignored")


def test_extraction_writes_codes_equal_to_the_tokenizers(tmp_path, tokenizer_file):
    path, tokenizer = tokenizer_file
    _images(tmp_path / "images")
    manifest = extract(
        tmp_path / "images",
        path,
        tmp_path / "codes",
        shard_size=4,
        max_bad_fraction=0.5,
        progress=False,
        flip=True,
    )
    assert manifest["counts"]["codes"] == 6 and manifest["counts"]["bad"] == 1
    assert manifest["bad_files"][0]["path"] == "cat/broken0.png"
    assert manifest["class_names"] == ["cat", "dog"] and manifest["grid"] == [8, 8]
    assert manifest["tokenizer"]["sha256"] == file_sha256(path)
    dataset = CodesDataset(tmp_path / "codes", tiny_config(grid_size=8))
    image = center_crop_adm(load_image(tmp_path / "images" / "dog" / "1.png"), 16)
    expected = tokenizer.encode(pil_to_tensor(image)).reshape(-1)
    shard = np.load(tmp_path / "codes" / "shard_00001.npz")
    row = list(shard["paths"]).index("dog/1.png")
    assert np.array_equal(shard["codes"][row].reshape(-1), expected.numpy())
    assert shard["codes_flip"].shape == shard["codes"].shape
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_extraction_resumes_by_skipping_finished_shards(tmp_path, tokenizer_file, monkeypatch):
    path, _ = tokenizer_file
    _images(tmp_path / "images", bad=0)
    first = extract(tmp_path / "images", path, tmp_path / "codes", shard_size=2, progress=False)
    (tmp_path / "codes" / "shard_00002.npz").unlink()  # as if the run died before shard 2
    calls = []
    original = extract_module.encode_shard
    monkeypatch.setattr(
        extract_module, "encode_shard", lambda items, *a: calls.append(items) or original(items, *a)
    )
    second = extract(tmp_path / "images", path, tmp_path / "codes", shard_size=2, progress=False)
    assert len(calls) == 1 and [p for p, _ in calls[0]] == ["dog/1.png", "dog/2.png"]
    assert second["counts"] == first["counts"]


def test_extraction_refuses_a_different_extraction_in_the_same_folder(tmp_path, tokenizer_file):
    path, _ = tokenizer_file
    _images(tmp_path / "images", bad=0)
    extract(tmp_path / "images", path, tmp_path / "codes", shard_size=2, progress=False)
    with pytest.raises(ExtractionError, match="different extraction.*shard_size"):
        extract(tmp_path / "images", path, tmp_path / "codes", shard_size=3, progress=False)


def test_too_many_bad_images_stop_with_their_names(tmp_path, tokenizer_file):
    path, _ = tokenizer_file
    _images(tmp_path / "images", per_class=2, bad=2)
    with pytest.raises(ExtractionError, match=r"2 of 6 images are unreadable.*broken0.png"):
        extract(tmp_path / "images", path, tmp_path / "out", max_bad_fraction=0.1, progress=False)


def test_empty_or_unlabelled_folders_are_clear_errors(tmp_path, tokenizer_file):
    path, _ = tokenizer_file
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExtractionError, match="no images found"):
        extract(tmp_path / "empty", path, tmp_path / "out", progress=False)
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (16, 16)).save(loose / "a.png")
    with pytest.raises(ExtractionError, match="no class sub-folders"):
        extract(loose, path, tmp_path / "out", progress=False)


def test_labels_csv_and_the_command_line(tmp_path, tokenizer_file, capsys):
    path, _ = tokenizer_file
    images = tmp_path / "flat"
    images.mkdir()
    for index in range(3):
        Image.new("RGB", (16, 16), (40 * index, 0, 0)).save(images / f"{index}.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n0.png,zebra\n1.png,ant\n2.png,zebra\n")
    argv = [
        "--images",
        str(images),
        "--labels",
        str(labels),
        "--tokenizer",
        str(path),
        "--out",
        str(tmp_path / "codes"),
        "--no-progress",
    ]
    assert extract_module.main(argv) == 0
    assert "3 code grids (8x8) from 3 images, 0 unreadable" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "codes")
    assert manifest["class_names"] == ["ant", "zebra"]
    assert CodesDataset(tmp_path / "codes").labels.tolist() == [1, 0, 1]
    assert extract_module.main([*argv[:-3], "--out", str(tmp_path / "x"), "--images", "/nope"]) == 2


def test_extraction_reads_an_image_array_file(tmp_path, tokenizer_file):
    path, tokenizer = tokenizer_file
    pixels = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=pixels, labels=np.array([2, 0, 1, 2, 0]))
    (tmp_path / "class_names.json").write_text(json.dumps(["a", "b", "c"]))
    manifest = extract(tmp_path / "train.npz", path, tmp_path / "codes", progress=False)
    assert manifest["class_names"] == ["a", "b", "c"] and manifest["counts"]["codes"] == 5
    dataset = CodesDataset(tmp_path / "codes")
    expected = tokenizer.encode(pil_to_tensor(Image.fromarray(pixels[3]))).reshape(-1)
    assert torch.equal(dataset.batch([3])[0][0], expected)
    assert dataset.labels.tolist() == [2, 0, 1, 2, 0]
