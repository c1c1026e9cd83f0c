"""The README's table of methods is `metamerge methods`' output, so documentation cannot drift."""

from __future__ import annotations

from pathlib import Path

from metamerge.methods.catalog import methods_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_catalog():
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- methods:start -->\n", 1)[1].split("<!-- methods:end -->", 1)[0]
    assert block.strip() == methods_table().strip()
