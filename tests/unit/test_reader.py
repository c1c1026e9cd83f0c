"""metamerge.io.reader.ModelReader on small safetensors files written here with safetensors itself."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from metamerge.errors import MergeError
from metamerge.io import ModelReader


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f64": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "f32": torch.randn(5, generator=g),
        "f16": torch.randn(2, 3, generator=g).to(torch.float16),
        "bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 7]),
        "i32": torch.tensor([[-5, 6], [7, -(2**31)]], dtype=torch.int32),
        "i16": torch.tensor([-32768, 32767], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "f8_e4m3": torch.randn(3, 2, generator=g).to(torch.float8_e4m3fn),  # FP8 checkpoints (DeepSeek-V3 ...)
        "f8_e5m2": torch.randn(2, 2, generator=g).to(torch.float8_e5m2),
    }


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if want.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # no equality kernel for FP8: compare bits
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    assert torch.equal(got, want)


def raw_safetensors(path, header: object, data: bytes) -> None:
    """A safetensors file written byte by byte, to make the broken ones."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def error_of(path, *, label: str = "model 'x'", **kw) -> str:
    with pytest.raises(MergeError) as info:
        ModelReader(path, label, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(label + ":")
    return msg


# ------------------------------------------------------------------------------ reading


def test_single_file_every_dtype(tmp_path):
    tensors = every_dtype()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    r = ModelReader(tmp_path)
    assert sorted(r.names()) == sorted(tensors)
    for name, want in tensors.items():
        info = r.tensors[name]
        assert info.shape == tuple(want.shape) and info.dtype == want.dtype
        assert info.file == "model.safetensors"
        assert info.numel == want.numel()
        assert info.nbytes == want.numel() * want.element_size()
        _assert_same(r.get(name), want)
    r.close()


def test_offsets_point_at_the_tensor_bytes(tmp_path):
    tensors = every_dtype()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    raw = (tmp_path / "model.safetensors").read_bytes()
    r = ModelReader(tmp_path)
    for name, want in tensors.items():
        info = r.tensors[name]
        assert raw[info.offset:info.offset + info.nbytes] == _bytes(want)


def test_get_into_a_reused_buffer(tmp_path):
    tensors = every_dtype()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    r = ModelReader(tmp_path)
    buf = bytearray(max(t.numel() * t.element_size() for t in tensors.values()) + 16)
    for name, want in tensors.items():
        got = r.get(name, into=buf)
        _assert_same(got, want)
        n = want.numel() * want.element_size()
        assert bytes(buf[:n]) == _bytes(want)   # the bytes went into the caller's buffer
    got = r.get("f32", into=buf)
    buf[0:4] = struct.pack("<f", 123.0)
    assert got[0].item() == 123.0               # the tensor is a view of the buffer


def test_sharded_with_index(tmp_path):
    tensors = every_dtype()
    names = sorted(tensors)
    first, second = names[:5], names[5:]
    shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({n: tensors[n] for n in first}, str(tmp_path / shard1))
    save_file({n: tensors[n] for n in second}, str(tmp_path / shard2))
    weight_map = {n: shard1 for n in first} | {n: shard2 for n in second}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    r = ModelReader(tmp_path)
    assert sorted(r.names()) == names
    for name, want in tensors.items():
        assert r.tensors[name].file == weight_map[name]
        _assert_same(r.get(name), want)


def test_index_decides_which_files_are_read(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    save_file({"stale": torch.ones(2)}, str(tmp_path / "model.safetensors"))  # a leftover
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    assert ModelReader(tmp_path).names() == ["a"]


def test_several_files_without_index_are_all_read(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "part1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "part2.safetensors"))
    r = ModelReader(tmp_path)
    assert sorted(r.names()) == ["a", "b"]
    _assert_same(r.get("b"), torch.zeros(3))


def test_reading_after_close_reopens(tmp_path):
    save_file({"a": torch.arange(4.0)}, str(tmp_path / "model.safetensors"))
    r = ModelReader(tmp_path)
    r.get("a")
    r.close()
    _assert_same(r.get("a"), torch.arange(4.0))


def test_config(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    assert ModelReader(tmp_path).config() == {}
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2}')
    assert ModelReader(tmp_path).config() == {"num_hidden_layers": 2}
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MergeError, match="config.json is not valid JSON"):
        ModelReader(tmp_path).config()


# ------------------------------------------------------------------------------ pickle


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    torch.save(state, tmp_path / "pytorch_model.bin")
    msg = error_of(tmp_path)
    assert "pytorch_model.bin" in msg and "--allow-pickle" in msg
    r = ModelReader(tmp_path, allow_pickle=True)
    assert sorted(r.names()) == ["b", "w"]
    for name, want in state.items():
        _assert_same(r.get(name), want)


# ------------------------------------------------------------------------------ broken input


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert "no *.safetensors weights" in error_of(tmp_path)


def test_header_not_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"not json" + b"\0" * 16)
    msg = error_of(tmp_path)
    assert "model.safetensors is not a valid safetensors file" in msg


def test_header_not_an_object(tmp_path):
    raw_safetensors(tmp_path / "model.safetensors", [1, 2], b"")
    assert "model.safetensors is not a valid safetensors file (the header is not a JSON object)" in error_of(tmp_path)


def test_header_length_past_the_end(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    msg = error_of(tmp_path)
    assert "model.safetensors is not a valid safetensors file (header length past the end of the file)" in msg


def test_file_shorter_than_a_header(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\1\0\0")
    assert "model.safetensors is not a valid safetensors file (file shorter than a header)" in error_of(tmp_path)


def test_truncated_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])
    msg = error_of(tmp_path)
    assert "model.safetensors is truncated (tensor 'b' ends past the end of the file)" in msg


def test_truncated_shard_of_an_index(tmp_path):
    save_file({"a": torch.ones(4)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(100)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    assert "model-00002-of-00002.safetensors is truncated (tensor 'b'" in error_of(tmp_path)


def test_file_truncated_after_opening(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(100)}, str(path))
    r = ModelReader(tmp_path, "base")
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(MergeError, match=r"^base: model.safetensors: tensor 'a' is truncated"):
        r.get("a")


def test_missing_shard(tmp_path):
    save_file({"a": torch.ones(4)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    msg = error_of(tmp_path)
    assert "shard model-00002-of-00002.safetensors named in model.safetensors.index.json is missing" in msg


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}'])
def test_bad_index(tmp_path, text):
    save_file({"a": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(text)
    assert "model.safetensors.index.json is not a valid index" in error_of(tmp_path)


@pytest.mark.parametrize("text", ["[]", '{"weight_map": []}'])
def test_index_of_the_wrong_shape(tmp_path, text):
    save_file({"a": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(text)
    assert "not a valid index" in error_of(tmp_path)


def test_unknown_tensor(tmp_path):
    save_file({"a": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    r = ModelReader(tmp_path, "model 'x'")
    with pytest.raises(MergeError, match=r"^model 'x': tensor 'nope' is missing$"):
        r.get("nope")


def test_unsupported_dtype(tmp_path):
    raw_safetensors(tmp_path / "model.safetensors", {"u16": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}},
                    b"\0" * 4)
    assert "model.safetensors: tensor 'u16' has unsupported dtype U16" in error_of(tmp_path)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},         # offsets out of order
    {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},        # negative dimension
    {"dtype": "F32", "shape": [2], "data_offsets": [0]},            # one offset
    {"shape": [2], "data_offsets": [0, 8]},                         # no dtype
    "F32",
])
def test_bad_header_entry(tmp_path, entry):
    raw_safetensors(tmp_path / "model.safetensors", {"w": entry}, b"\0" * 8)
    assert "model.safetensors is not a valid safetensors file (bad header entry for tensor 'w')" in error_of(tmp_path)


def test_span_not_matching_shape_and_dtype(tmp_path):
    raw_safetensors(tmp_path / "model.safetensors",
                    {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    assert "tensor 'w' spans 8 bytes, not the size of its shape and dtype" in error_of(tmp_path)


def test_metadata_entry_is_not_a_tensor(tmp_path):
    raw_safetensors(tmp_path / "model.safetensors",
                    {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                    struct.pack("<2f", 1.5, -2.0))
    r = ModelReader(tmp_path)
    assert r.names() == ["w"]
    assert r.get("w").tolist() == [1.5, -2.0]
