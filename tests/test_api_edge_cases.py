"""Library-level inputs an audit found mishandled: hostile safetensors header field types, metadata, thread
counts from the environment, integer or out-of-float32 weights in the NumPy merge reference, odd NF4 shapes,
and PEFT's literal fallback in rank / alpha patterns."""
import json
import struct

import numpy as np
import pytest

from minilora import lora, native, nf4
from minilora.errors import InputError
from minilora.safetensors_io import SafetensorsReader
from minilora.safetensors_write import save_file


def _file(tmp_path, header, data=b""):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("entry, message", [
    ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
    ({"dtype": "U8", "shape": [2**64], "data_offsets": [0, 4]}, "needs"),
    ({"dtype": "U8", "shape": [True, 4], "data_offsets": [0, 4]}, "not a list of non-negative integers"),
    ({"dtype": "U8", "shape": [2**62 + 1, 4], "data_offsets": [0, 4]}, "needs"),       # wrapped to 4 in int64
    ({"dtype": "U8", "shape": [2**32, 2**32], "data_offsets": [0, 0]}, "needs"),       # wrapped to 0
    ({"dtype": "U8", "shape": [4], "data_offsets": [False, 4]}, "data_offsets"),
])
def test_header_field_types_are_checked_before_use(tmp_path, entry, message):
    data = b"\0" * (entry["data_offsets"][1] or 0)
    with pytest.raises(InputError, match=message):
        SafetensorsReader(_file(tmp_path, {"t": entry}, data))


@pytest.mark.parametrize("metadata", [[1], "x", {"k": 1}, {"k": None}])
def test_metadata_must_map_strings_to_strings(tmp_path, metadata):
    with pytest.raises(InputError, match="__metadata__ must map strings to strings"):
        SafetensorsReader(_file(tmp_path, {"__metadata__": metadata, "t": {"dtype": "U8", "shape": [4],
                                                                       "data_offsets": [0, 4]}}, b"\0" * 4))
    with pytest.raises(ValueError, match="strings to strings"):
        save_file({"t": np.zeros(4, np.uint8)}, tmp_path / "y.safetensors", metadata={"k": 1})


def test_header_is_strict_utf8_and_no_tensor_is_called_metadata(tmp_path):
    raw = json.dumps({"t": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}).encode("utf-16")
    raw += b" " * (-len(raw) % 8)
    (tmp_path / "u16.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(InputError, match="not valid JSON"):
        SafetensorsReader(tmp_path / "u16.safetensors")
    with pytest.raises(ValueError, match="__metadata__"):
        save_file({"__metadata__": np.zeros(4, np.uint8)}, tmp_path / "m.safetensors")


@pytest.mark.parametrize("value", ["garbage", "0", "-1", "²", "٣", "1.5"])
def test_bad_thread_counts_from_the_environment_are_input_errors(monkeypatch, value):
    monkeypatch.setenv("MINILORA_NUM_THREADS", value)
    with pytest.raises(InputError, match="MINILORA_NUM_THREADS must be a positive integer"):
        native.quantize_nf4(np.ones(64, np.float32))


def test_huge_thread_counts_are_capped_not_overflowed(monkeypatch):
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    want = native.quantize_nf4(x, num_threads=1)
    monkeypatch.setenv("MINILORA_NUM_THREADS", "99999999999")
    for got in (native.quantize_nf4(x), native.quantize_nf4(x, num_threads=2**40)):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want))


def test_numpy_merge_reference_refuses_integer_and_float64_weights():
    """Integer W wrapped around; a float64 W was rounded to float32 before the merge (with B = 0 it moved by
    1.6e-9, a 1e39 entry became inf): refused like the C kernels do."""
    A, B = np.ones((1, 4), np.float32), np.ones((3, 1), np.float32)
    for W in (np.full((3, 4), 100, np.int8), np.full((3, 4), 7, np.int32), np.full((3, 4), 1e39),
              np.full((3, 4), 0.1)):
        for fn in (lora.merge_weight, lora.unmerge_weight, lora.merge_weight_safe):
            with pytest.raises(TypeError, match="float32 / float16 / bfloat16 ndarray"):
                fn(W, A, B, 100.0)
    with pytest.raises(TypeError):
        lora.merge_weight([[1.0] * 4] * 3, A, B, 1.0)


def test_nf4_shapes_must_be_integers():
    state = nf4.quantize(np.ones(256, np.float32), 64)
    for shape in ((4.9, 64), "4,64", (True, 256), 256):
        with pytest.raises(TypeError, match="shape must be a tuple of ints"):
            nf4.check_state(state.packed, state.absmax, shape, 64)
    with pytest.raises(ValueError, match="too many"):
        nf4.check_state(state.packed, state.absmax, (2**58 + 1, 64), 64)


def test_pattern_keys_fall_back_to_the_literal_module_name_as_peft():
    assert lora.module_rank_alpha("a.b+c", 16, 32, {"a.b+c": 8}, None) == (8, 32)
    assert lora.module_rank_alpha("x.q_proj", 16, 32, {"q_proj": 4}, {"x.q_proj": 2}) == (4, 2)
