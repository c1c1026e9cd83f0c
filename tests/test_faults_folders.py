"""Fault suite: model folders are untrusted input.

Crafted hostile folders: overlapping tensor byte ranges, index entries outside the folder,
malformed indexes, shard and tokenizer symlinks pointing at files elsewhere (a "secret").
Each must be a one-line error naming the file, or (side files) be left out of OUT and of the
provenance; links into the Hugging Face cache's blob store are still followed.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from metamerge.errors import MergeError
from metamerge.io import ModelReader

from models import derive, run_merge

LABEL = "model 'x'"


def error_of(path) -> str:
    with pytest.raises(MergeError) as info:
        ModelReader(path, LABEL)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(LABEL + ":")
    return msg


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_overlapping_byte_ranges_are_refused(tmp_path):
    # two tensors over the same 16 bytes: b would silently be read as a's bytes
    _raw_safetensors(tmp_path / "model.safetensors", {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))
    assert "overlaps" in error_of(tmp_path)


def test_a_hole_between_byte_ranges_is_refused(tmp_path):
    _raw_safetensors(tmp_path / "model.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16))
    assert "does not start at 0" in error_of(tmp_path)


def test_real_files_with_out_of_name_order_offsets_still_load(tmp_path):
    save_file({"z": torch.ones(3), "a": torch.zeros(5, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    assert sorted(ModelReader(tmp_path, LABEL).names()) == ["a", "z"]


@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside/model.safetensors", "sub/model.safetensors", ".."])
def test_index_entries_must_be_plain_names_inside_the_folder(tmp_path, entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"b": torch.ones(4)}, str(outside / "model.safetensors"))
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": torch.ones(4)}, str(folder / "model-00001-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": entry}}))
    assert "not a plain file name inside the model folder" in error_of(folder)


@pytest.mark.parametrize("text", ["[1, 2]", '{"weight_map": ["a"]}', '{"weight_map": {"a": 3}}', "\"x\"",
                                  b"\xff\xfe".decode("latin-1")])
def test_malformed_index_is_one_line(tmp_path, text):
    save_file({"a": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(text, encoding="latin-1")
    assert "model.safetensors.index.json is not a valid index" in error_of(tmp_path)


def test_a_shard_linked_out_of_the_folder_is_refused(tmp_path):
    save_file({"a": torch.ones(4)}, str(tmp_path / "elsewhere.safetensors"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    assert "link out of the model folder" in error_of(folder)


def test_links_into_the_hub_blob_store_are_followed(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    save_file({"a": torch.ones(4)}, str(repo / "blobs" / "0123abcd"))
    snap = repo / "snapshots" / ("f" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to("../../blobs/0123abcd")
    assert ModelReader(snap, LABEL).names() == ["a"]


def test_a_tokenizer_link_to_a_secret_is_not_copied_nor_hashed(tiny_llama_bf16, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("AWS_SECRET_ACCESS_KEY=do-not-upload\n")
    base = derive(tiny_llama_bf16.base, tmp_path / "base")
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").symlink_to(secret)
    (base / "tokenizer_config.json").unlink()
    (base / "tokenizer_config.json").symlink_to(secret)
    result = run_merge({"merge_method": "metagpt", "base_model": str(base),
                        "models": [{"model": m} for m in tiny_llama_bf16.refs]}, tmp_path / "out")
    out = tmp_path / "out"
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    assert all("do-not-upload" not in f.read_text(errors="replace") for f in out.iterdir() if f.is_file())
    recorded = [item for item in result.provenance["inputs"] if item["path"] == str(base)][0]["files"]
    assert "tokenizer.json" not in recorded and "config.json" in recorded


def test_a_config_link_to_elsewhere_is_refused(tiny_llama_bf16, tmp_path):
    base = derive(tiny_llama_bf16.base, tmp_path / "base")
    (tmp_path / "other.json").write_text((base / "config.json").read_text())
    (base / "config.json").unlink()
    (base / "config.json").symlink_to(tmp_path / "other.json")
    with pytest.raises(MergeError, match=r"config.json is a link out of the model folder"):
        run_merge({"merge_method": "metagpt", "base_model": str(base),
                   "models": [{"model": m} for m in tiny_llama_bf16.refs]}, tmp_path / "out")


@pytest.mark.parametrize("rev", ["a", "abc12", "ABCDEF12", "zzzzzzzz"])
def test_a_local_revision_must_be_seven_hex_characters(tiny_llama_bf16, rev):
    from metamerge.refs import resolve

    with pytest.raises(MergeError, match=r"at least 7 lowercase hex characters"):
        resolve(f"{tiny_llama_bf16.base}@{rev}", hash_files=False)


def test_a_seven_character_local_revision_pins(tiny_llama_bf16):
    from metamerge.refs import resolve

    full = resolve(str(tiny_llama_bf16.base)).revision
    assert resolve(f"{tiny_llama_bf16.base}@{full[:7]}").revision == full
