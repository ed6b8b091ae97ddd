"""Emoji dataset preparation on a fake emoji-datasource tarball (no network, no npm)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from scan_core.datasets import emoji as emoji_data
from scan_core.datasets import emoji_package
from scan_core.datasets.emoji import (
    CATEGORIES,
    EXAMPLES,
    load_rgba,
    load_split,
    prepare,
    read_package,
    render,
)

TONES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")


def png_bytes(mode: str, seed: int) -> bytes:
    """A 64x64 PNG in ``mode`` with a transparent border and an opaque coloured square."""
    rng = np.random.default_rng(seed)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if mode == "RGBA":
        image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # transparent *red*
        image.paste((*colour, 255), (16, 16, 48, 48))
    elif mode == "LA":
        image = Image.new("LA", (64, 64), (0, 0))
        image.paste((colour[0], 255), (16, 16, 48, 48))
    else:  # palette with a transparent index 0
        image = Image.new("P", (64, 64), 0)
        image.putpalette([255, 0, 0, *colour] + [0] * 762)
        image.paste(1, (16, 16, 48, 48))
        image.info["transparency"] = 0
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0) if mode == "P" else image.save(buffer, "PNG")
    return buffer.getvalue()


def fake_entries(style: str) -> tuple[list[dict], dict[str, bytes]]:
    """emoji.json entries and PNGs: 6 bases per category, skin tones in People & Body."""
    entries, pngs, order = [], {}, 0
    # the example emoji (write_examples looks them up by short name), one per category
    example_categories = [CATEGORIES[i] for i in (0, 2, 3, 4, 5, 6)]
    short_names = {cat: name for cat, (name, _) in zip(example_categories, EXAMPLES, strict=True)}
    for index, category in enumerate((*CATEGORIES, "Component")):
        for number in range(6):
            order += 1
            unified = f"1F{index:02X}{number:X}"
            default = f"e{order}"
            entry = {
                "name": f"EMOJI {order}",
                "unified": unified,
                "image": f"{unified.lower()}.png",
                "short_name": short_names.get(category, default) if number == 0 else default,
                "category": category,
                "subcategory": "x",
                "sort_order": order,
                f"has_img_{style}": True,
            }
            pngs[entry["image"]] = png_bytes(("RGBA", "LA", "P")[order % 3], order)
            if category == "People & Body":
                keys = TONES if number % 2 else [f"{a}-{b}" for a in TONES[:2] for b in TONES[:2]]
                entry["skin_variations"] = {}
                for position, key in enumerate(keys):
                    variant = f"{unified}-{key}"
                    image = f"{variant.lower()}.png"
                    entry["skin_variations"][key] = {
                        "unified": variant,
                        "image": image,
                        f"has_img_{style}": True,
                    }
                    pngs[image] = png_bytes("RGBA", 1000 + 10 * order + position)
            entries.append(entry)
    return entries, pngs


def fake_tarball(path, style: str = "google"):
    source = emoji_data.SOURCES[style]
    entries, pngs = fake_entries(style)
    files = {
        "package/package.json": json.dumps({"name": source.package, "version": source.version}),
        "package/emoji.json": json.dumps(entries),
        **{f"package/img/{style}/64/{name}": data for name, data in pngs.items()},
        f"package/img/{style}/sheets/64.png": b"not read",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def google(tmp_path):
    return read_package(fake_tarball(tmp_path / "google.tgz"))


def test_every_mode_becomes_rgba_and_keeps_its_transparency():
    for mode in ("RGBA", "LA", "P"):
        assert Image.open(io.BytesIO(png_bytes(mode, 1))).mode == mode
        image = load_rgba(png_bytes(mode, 1))
        assert image.mode == "RGBA" and image.size == (64, 64)
        alpha = np.asarray(image)[..., 3]
        assert alpha[0, 0] == 0 and alpha[32, 32] == 255, mode


def test_transparent_red_is_white_after_compositing():
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (16, 16, 48, 48))
    image.paste((0, 0, 0, 128), (0, 0, 8, 8))  # half-transparent black -> mid grey
    pixels = render(image, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert (pixels[:, 28:] == 255).all() and (pixels[28:] == 255).all()  # no pink fringe
    assert tuple(pixels[16, 16]) == (0, 0, 255)
    assert abs(int(pixels[1, 1, 0]) - 127) <= 2 and len(set(pixels[1, 1])) == 1
    assert tuple(render(image, 64)[63, 63]) == (255, 255, 255)


def test_prepare_writes_a_consistent_dataset(tmp_path, google):
    manifest = prepare(tmp_path / "out", [google], size=16, seed=3, val_fraction=0.2)
    train, val = load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "val")
    assert train["images"].shape[1:] == (16, 16, 3) and train["images"].dtype == np.uint8
    assert train["labels"].dtype == np.int64 and set(train["labels"]) <= set(range(9))
    # the split is by base emoji: no base (or its variants) on both sides, every category in val
    assert not set(train["base_ids"]) & set(val["base_ids"])
    assert set(val["labels"]) == set(range(9))
    # Component dropped
    assert not any(base.startswith("1F09") for base in train["base_ids"])
    assert manifest["skipped"]["google"]["dropped_category"] == 6
    # cap: the base plus at most one uniform-tone variant per People & Body emoji
    bases = np.concatenate([train["base_ids"], val["base_ids"]])
    unified = np.concatenate([train["unified"], val["unified"]])
    people = [base for base in set(bases) if base.startswith("1F01")]
    assert len(people) == 6
    for base in people:
        codes = sorted(unified[bases == base])
        assert codes[0] == base and len(codes) == 2
        assert len(set(codes[1].split("-")[1:])) == 1  # uniform tone
    assert manifest["skipped"]["google"]["skin_variant_cap"] == 3 * 4 + 3 * 3
    # manifest
    names = json.loads((tmp_path / "out" / "class_names.json").read_text())
    assert names == list(CATEGORIES) == manifest["class_names"]
    source = manifest["sources"][0]
    assert source["package"] == "emoji-datasource-google" and source["version"] == "16.0.0"
    expected_sha = hashlib.sha256((tmp_path / "google.tgz").read_bytes()).hexdigest()
    assert source["tarball_sha256"] == expected_sha
    assert source["licence"] == "Apache-2.0" and "Noto Emoji" in source["attribution"]
    assert manifest["split"]["seed"] == 3 and manifest["image_size"] == 16
    assert manifest["totals"] == {"train": len(train["labels"]), "val": len(val["labels"])}
    assert sum(manifest["counts"]["val"].values()) == len(val["labels"])
    for file, digest in manifest["files"].items():
        assert hashlib.sha256((tmp_path / "out" / file).read_bytes()).hexdigest() == digest


def test_same_inputs_give_identical_files(tmp_path, google):
    for name in ("a", "b"):
        prepare(tmp_path / name, [google], size=32, seed=0)
    for file in ("train.npz", "val.npz", "class_names.json", "manifest.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    prepare(tmp_path / "c", [google], size=32, seed=1)
    split = {name: set(load_split(tmp_path / name, "val")["base_ids"]) for name in ("a", "c")}
    assert split["a"] != split["c"]


def test_skin_variant_cap_settings(tmp_path, google):
    every = prepare(tmp_path / "all", [google], max_skin_variants=-1)
    bases_only = prepare(tmp_path / "none", [google], max_skin_variants=0)
    people = CATEGORIES[1]
    assert every["counts"]["train"][people] + every["counts"]["val"][people] == 6 + 3 * 5 + 3 * 4
    assert bases_only["counts"]["train"][people] + bases_only["counts"]["val"][people] == 6


def test_twemoji_is_a_second_style_with_the_same_split(tmp_path, google):
    twitter = read_package(fake_tarball(tmp_path / "twitter.tgz", "twitter"))
    manifest = prepare(tmp_path / "out", [google, twitter])
    assert len(manifest["class_names"]) == 18
    assert manifest["class_names"][9] == "Twemoji / Smileys & Emotion"
    assert manifest["sources"][1]["licence"] == "CC-BY-4.0"
    val = load_split(tmp_path / "out", "val")
    noto = set(val["base_ids"][val["labels"] < 9])
    assert noto == set(val["base_ids"][val["labels"] >= 9])


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji_package.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm is not installed.*--tarball"):
        emoji_data.fetch_tarball(emoji_data.SOURCES["google"], tmp_path)
    assert emoji_data.main(["prepare", "--out", str(tmp_path / "out")]) == 1


def test_cli_and_examples(tmp_path, capsys):
    tarball = str(fake_tarball(tmp_path / "google.tgz"))
    assert emoji_data.main(["prepare", "--out", str(tmp_path / "out"), "--tarball", tarball]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["train"] > 0
    assert emoji_data.main(["examples", "--out", str(tmp_path / "ex"), "--tarball", tarball]) == 0
    written = sorted(path.name for path in (tmp_path / "ex").iterdir())
    assert len(written) == 7 and "ATTRIBUTION.md" in written
    assert "Apache" in (tmp_path / "ex" / "ATTRIBUTION.md").read_text()
