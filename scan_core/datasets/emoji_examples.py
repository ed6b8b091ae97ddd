"""Example pictures for the app (``python -m scan_core emoji_data examples``).

Copies the native 64 px PNGs of :data:`EXAMPLES` out of the Noto emoji package, unchanged, with
an ATTRIBUTION.md naming their source and licence.
"""

from __future__ import annotations

from pathlib import Path

from scan_core.datasets.emoji_package import Package

# (short name, file name) of the example pictures shipped in assets/examples: one per category,
# all held out (val) in the default split (seed 0), so the app shows unseen reconstructions.
EXAMPLES = (
    ("hot_face", "hot_face"),
    ("frog", "frog"),
    ("sushi", "sushi"),
    ("taxi", "taxi"),
    ("balloon", "balloon"),
    ("gem", "gem_stone"),
)


def write_examples(out: str | Path, package: Package) -> list[Path]:
    """Copy the native 64 px PNGs of :data:`EXAMPLES` to ``out`` with an ATTRIBUTION.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = {entry["short_name"]: entry for entry in package.entries}
    written, rows = [], []
    for short_name, stem in EXAMPLES:
        entry = entries[short_name]
        path = out / f"emoji_{stem}.png"
        path.write_bytes(package.pngs[entry["image"]])
        written.append(path)
        name, code = entry["name"].title(), entry["unified"].replace("-", " U+")
        rows.append(f"| `{path.name}` | {name} | U+{code} | {entry['category']} |")
    source = package.source
    text = [
        "# Example images",
        "",
        f"{source.attribution} Files copied unchanged (64 px PNG with alpha) from the npm package "
        f"`{source.package}@{source.version}` (iamcal/emoji-data, MIT).",
        "",
        "| file | emoji | code points | category |",
        "|---|---|---|---|",
        *rows,
        "",
        "All six are in the held-out (val) split of `python -m scan_core emoji_data prepare` "
        "with the default seed 0.",
        "",
        "Licence: Apache License 2.0, https://www.apache.org/licenses/LICENSE-2.0",
        "",
    ]
    (out / "ATTRIBUTION.md").write_text("\n".join(text))
    return written
