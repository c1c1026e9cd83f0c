"""metamerge.io.writer: shard planning, the index, and a round trip through safetensors itself."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open

from metamerge.errors import MergeError
from metamerge.io import ModelReader, ShardedWriter, parse_size

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(4, 4, generator=g),                       # 64 bytes
        "b": torch.randn(8, generator=g).to(torch.float16),        # 16 bytes
        "c": torch.randn(2, 3, generator=g).to(torch.bfloat16),    # 12 bytes
    }


def write_all(out_dir, ts: dict[str, torch.Tensor], max_shard_size: int) -> tuple[ShardedWriter, dict[str, str]]:
    plan = [(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
    w = ShardedWriter(out_dir, plan, max_shard_size=max_shard_size)
    for n, t in ts.items():
        w.write(n, t)
    return w, w.close()


def read_back(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_shards_are_cut_by_size(tmp_path):
    ts = tensors()
    w, _ = write_all(tmp_path, ts, max_shard_size=80)   # a + b = 80 fits; + c = 92 does not
    assert [(s.filename, s.names, s.nbytes) for s in w.shards] == [(SHARD1, ["a", "b"], 80), (SHARD2, ["c"], 12)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SHARD1, SHARD2, "model.safetensors.index.json"])
    got1, got2 = read_back(tmp_path / SHARD1), read_back(tmp_path / SHARD2)
    assert sorted(got1) == ["a", "b"] and sorted(got2) == ["c"]
    for n, t in (got1 | got2).items():
        _assert_same(t, ts[n])


def test_index_contents(tmp_path):
    write_all(tmp_path, tensors(), max_shard_size=80)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 92}, "weight_map": {"a": SHARD1, "b": SHARD1, "c": SHARD2}}


def test_a_tensor_larger_than_the_limit_gets_a_shard_of_its_own(tmp_path):
    ts = tensors()
    w, _ = write_all(tmp_path, ts, max_shard_size=10)
    assert [s.names for s in w.shards] == [["a"], ["b"], ["c"]]
    assert [s.filename for s in w.shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for s in w.shards:
        for n, t in read_back(tmp_path / s.filename).items():
            _assert_same(t, ts[n])


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    ts = tensors()
    _, hashes = write_all(tmp_path, ts, max_shard_size=92)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert list(hashes) == ["model.safetensors"]
    got = read_back(tmp_path / "model.safetensors")
    assert sorted(got) == sorted(ts)
    for n, t in got.items():
        _assert_same(t, ts[n])


def test_metadata_and_header_alignment(tmp_path):
    write_all(tmp_path, tensors(), max_shard_size=10**9)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    assert path.stat().st_size == 8 + n + 92


def test_hashes_are_of_the_bytes_on_disk(tmp_path):
    _, hashes = write_all(tmp_path, tensors(), max_shard_size=80)
    assert set(hashes) == {SHARD1, SHARD2, "model.safetensors.index.json"}
    for name, digest in hashes.items():
        assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


def test_every_dtype_and_odd_shapes_round_trip(tmp_path):
    ts = {
        "f64": torch.arange(6, dtype=torch.float64).reshape(2, 3),
        "i64": torch.tensor([-(2**62), 2**62]),
        "i32": torch.tensor([-7, 7], dtype=torch.int32),
        "i16": torch.tensor([-3], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 2),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),   # not contiguous
    }
    write_all(tmp_path, ts, max_shard_size=10**9)
    got = read_back(tmp_path / "model.safetensors")
    assert sorted(got) == sorted(ts)
    for n, t in ts.items():
        _assert_same(got[n], t)
    r = ModelReader(tmp_path)
    for n, t in ts.items():
        _assert_same(r.get(n), t)


def test_sharded_output_reads_back_through_model_reader(tmp_path):
    ts = tensors()
    write_all(tmp_path, ts, max_shard_size=80)
    r = ModelReader(tmp_path)
    assert sorted(r.names()) == ["a", "b", "c"]
    assert r.tensors["c"].file == SHARD2
    for n, t in ts.items():
        _assert_same(r.get(n), t)


# ------------------------------------------------------------------------------ misuse


def _writer(tmp_path) -> ShardedWriter:
    return ShardedWriter(tmp_path, [("a", (2,), torch.float32), ("b", (3,), torch.float16)])


def test_write_out_of_order(tmp_path):
    w = _writer(tmp_path)
    with pytest.raises(RuntimeError, match="expected tensor 'a', got 'b'"):
        w.write("b", torch.zeros(3, dtype=torch.float16))


def test_write_past_the_plan(tmp_path):
    w = _writer(tmp_path)
    w.write("a", torch.zeros(2))
    w.write("b", torch.zeros(3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="expected tensor 'nothing', got 'c'"):
        w.write("c", torch.zeros(1))


@pytest.mark.parametrize("tensor", [torch.zeros(3), torch.zeros(2, dtype=torch.float16), torch.zeros(1, 2)])
def test_write_wrong_shape_or_dtype(tmp_path, tensor):
    w = _writer(tmp_path)
    with pytest.raises(RuntimeError, match="writer: 'a' is .* planned \\(2,\\) torch.float32"):
        w.write("a", tensor)


def test_close_before_the_end(tmp_path):
    w = _writer(tmp_path)
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="closed after 1 of 2 tensors"):
        w.close()
    w.abort()


# ------------------------------------------------------------------------------ parse_size


@pytest.mark.parametrize("text, size", [
    ("5GB", 5_000_000_000),
    ("500MiB", 500 * 2**20),
    ("2.5KB", 2500),
    ("10kib", 10 * 1024),
    ("1T", 10**12),
    ("  7 MB ", 7_000_000),
    ("123", 123),
    (456, 456),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5 XB", "-1GB", "five"])
def test_parse_size_refuses(text):
    with pytest.raises(MergeError, match="bad size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["5GB", "0.5GB", "2.5 KB", " 7 mb ", "3TB"])
def test_decimal_sizes_mean_what_they_mean_to_huggingface_hub(text):
    from huggingface_hub.serialization._base import parse_size_to_int

    assert parse_size(text) == parse_size_to_int(text.strip().replace(" ", "").upper())
