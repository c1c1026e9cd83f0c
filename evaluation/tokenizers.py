"""Whether a model folder has the tokenizer files evaluation loads (``AutoTokenizer``).

Why a check of its own: evaluation runs after the merge, so an expert or a tokenizer source without
tokenizer files used to fail only after minutes (or hours) of merging, in a transformers traceback.
The pipeline checks every folder evaluation will load before any merge work starts.

A folder has a tokenizer when it holds one of the sets ``AutoTokenizer`` can build one from:
``tokenizer.json`` (fast tokenizers), ``tokenizer.model`` (SentencePiece), ``vocab.json`` with
``merges.txt`` (byte-level BPE) or ``vocab.txt`` (WordPiece); each must be the folder's own regular
file (a link out of the folder is not read; see ``metamerge.io.untrusted``).
"""

from __future__ import annotations

from pathlib import Path

from metamerge.io.untrusted import own_file

TOKENIZER_SETS: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))


def missing_tokenizer_files(folder: str | Path) -> str | None:
    """``None`` when ``folder`` has a usable tokenizer set, else what is missing, in words."""
    folder = Path(folder)
    for files in TOKENIZER_SETS:
        if all(own_file(folder, folder / f) for f in files):
            return None
    return "no " + ", no ".join(" + ".join(s) for s in TOKENIZER_SETS)
