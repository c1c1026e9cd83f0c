"""The README's table of methods is `metamerge methods`' output, so documentation cannot drift."""

from __future__ import annotations

from pathlib import Path

from metamerge.methods import available_methods
from metamerge.methods.catalog import methods_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_catalog():
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- methods:start -->\n", 1)[1].split("<!-- methods:end -->", 1)[0]
    assert block.strip() == methods_table().strip()
def test_every_mergekit_method_is_registered():
    mergekit_methods = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                        "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher",
                        "sce", "ram", "ramplus_tl", "model_stock", "arcee_fusion", "nearswap", "passthrough"}
    assert mergekit_methods | {"metagpt"} == set(available_methods())
