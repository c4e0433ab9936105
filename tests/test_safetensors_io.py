"""The safetensors reader / writer: round trips against the ``safetensors`` package, and every lie a
header can tell becomes one InputError naming the file and tensor."""
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file as st_save

from minilora.errors import InputError
from minilora import direct_io, safetensors_write
from minilora.safetensors_io import SafetensorsReader, load_file
from minilora.safetensors_write import SafetensorsWriter, save_file

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64, np.int32, np.int8,
          np.uint8, np.bool_, np.uint16]


def _sample(rng):
    out = {}
    for i, dt in enumerate(DTYPES):
        shape = [(3, 5), (7,), (2, 3, 4), (0, 4), (1,)][i % 5]
        out[f"t{i}.{np.dtype(dt).name}"] = (rng.normal(size=shape) * 100).astype(dt)
    return out


def _bits(a):
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a


def test_round_trip_both_directions_with_the_safetensors_package(tmp_path):
    ref = _sample(np.random.default_rng(0))
    ours = tmp_path / "ours.safetensors"
    save_file(ref, ours, metadata={"format": "pt"})
    # The reference package reads ours (through torch: safetensors.numpy has no bfloat16) ...
    import torch
    from safetensors import safe_open

    with safe_open(str(ours), framework="pt") as f:
        for name, a in ref.items():
            t = f.get_tensor(name)
            got = t.view(torch.int16).numpy() if a.dtype.name == "bfloat16" else t.numpy()
            np.testing.assert_array_equal(_bits(got), _bits(a).view(_bits(got).dtype))
        assert f.metadata() == {"format": "pt"}
    # ... and we read theirs.
    plain = {k: v for k, v in ref.items() if v.dtype.name != "bfloat16"}
    st_save(plain, str(tmp_path / "theirs.safetensors"))
    back = load_file(tmp_path / "theirs.safetensors")
    assert back.keys() == plain.keys()
    for name, a in plain.items():
        assert back[name].dtype == a.dtype
        np.testing.assert_array_equal(_bits(back[name]), _bits(a))
    for name, a in load_file(ours).items():
        assert a.dtype == ref[name].dtype and a.shape == ref[name].shape
        np.testing.assert_array_equal(_bits(a), _bits(ref[name]))


def test_streaming_writer_is_atomic_and_ordered(tmp_path):
    path = tmp_path / "out.safetensors"
    entries = [("a", np.float32, (2,)), ("b", np.float32, (3,))]
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(path, entries) as w:
            w.write("a", np.zeros(2, np.float32))
            raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == []          # no partial output, no temporary left behind
    w = SafetensorsWriter(path, entries)
    with pytest.raises(ValueError, match="header order"):
        w.write("b", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="declared"):
        w.write("a", np.zeros(3, np.float32))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="only 1 of 2"):
        w.close()
    assert os.listdir(tmp_path) == []


def _write_raw(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("case, header, data, message", [
    ("truncated", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ("size lie", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 12, "needs 16"),
    ("unknown dtype", {"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
    ("overlap", {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                 "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6, "overlaps"),
    ("hole", {"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4, "hole"),
    ("trailing", {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 5, "past the last"),
    ("bad shape", {"a": {"dtype": "U8", "shape": [-2], "data_offsets": [0, 2]}}, b"\0" * 2, "non-negative"),
])
def test_lying_headers_are_rejected_with_file_and_tensor(tmp_path, case, header, data, message):
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InputError, match=message) as e:
        SafetensorsReader(path)
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_not_safetensors_at_all(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(InputError, match="shorter than"):
        SafetensorsReader(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(InputError, match="does not fit"):
        SafetensorsReader(huge)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(InputError, match="not valid JSON"):
        SafetensorsReader(garbage)


def test_reading_never_modifies_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
    before = path.read_bytes()
    with SafetensorsReader(path) as f:
        w = f.get("w")
        w += 1                                   # the array is ours, not a view of the file
        assert f.get_bytes("w") == np.arange(6, dtype=np.float32).tobytes()
    assert path.read_bytes() == before


def test_get_into_a_reused_buffer_and_copy_from_file_to_file(tmp_path, monkeypatch):
    ref = _sample(np.random.default_rng(1))
    src = tmp_path / "src.safetensors"
    save_file(ref, src)
    buf = np.zeros(4096, dtype=np.uint8)
    with SafetensorsReader(src) as r:
        for name, a in ref.items():   # one buffer for every tensor: each read is a view of it
            got = r.get(name, buffer=buf)
            assert got.dtype == a.dtype and got.shape == a.shape and (a.size == 0 or np.shares_memory(got, buf))
            np.testing.assert_array_equal(_bits(got), _bits(a))
        for fallback in (False, True):   # copy_file_range, and the bounded-buffer path where it fails
            if fallback:
                def refuse(*args, **kwargs):
                    raise OSError(18, "Invalid cross-device link")
                monkeypatch.setattr(os, "copy_file_range", refuse)
            out = tmp_path / f"copy{fallback}.safetensors"
            with SafetensorsWriter(out, [(n, a.dtype, a.shape) for n, a in ref.items()]) as w:
                for name in ref:
                    w.copy_from(name, r)
            data_start = r.span(next(iter(ref)))[0]
            assert out.read_bytes()[data_start:] == src.read_bytes()[data_start:]
    first = next(iter(ref))   # float32 (3, 5) in the source
    with SafetensorsReader(src) as r, pytest.raises(ValueError, match="source has"):
        with SafetensorsWriter(tmp_path / "bad.safetensors", [(first, np.float32, (15,))]) as w:
            w.copy_from(first, r)
    assert not (tmp_path / "bad.safetensors").exists()


def _direct_io_works(folder):
    open(os.path.join(folder, "probe"), "wb").close()
    try:
        sink = direct_io.DirectSink(os.path.join(folder, "probe"))
    except OSError:
        return False
    finally:
        os.remove(os.path.join(folder, "probe"))
    sink.close()
    return True


@pytest.mark.parametrize("mode", ["direct", "refused"])
def test_durable_writes_with_o_direct_give_the_same_bytes(tmp_path, monkeypatch, mode):
    """O_DIRECT through a staging buffer (8 KiB here, so every tensor crosses its edges; the tail padded and
    truncated) writes the bytes buffered writes do, from arrays and by copy_from; where O_DIRECT is refused
    the writer falls back to buffered writes before writing anything."""
    if mode == "direct" and not _direct_io_works(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    monkeypatch.setattr(direct_io.DirectSink, "STAGING", 8192)
    if mode == "refused":
        def refuse(path):
            raise OSError(22, "Invalid argument")
        monkeypatch.setattr(safetensors_write, "DirectSink", refuse)
    rng = np.random.default_rng(3)
    ref = {f"t{i}": rng.normal(size=n).astype(np.float32) for i, n in enumerate([1, 2047, 3000, 0, 9001, 5])}
    src = tmp_path / "src.safetensors"
    save_file(ref, src)
    entries = [(n, a.dtype, a.shape) for n, a in ref.items()]
    outs = {}
    for direct in (False, True):
        out = tmp_path / f"out{direct}.safetensors"
        with SafetensorsReader(src) as r, SafetensorsWriter(out, entries, direct=direct) as w:
            assert w.direct == (direct and mode == "direct")
            for i, (name, a) in enumerate(ref.items()):
                w.write(name, a) if i % 2 else w.copy_from(name, r)
        outs[direct] = out.read_bytes()
    assert outs[True] == outs[False] and len(outs[True]) % 4096 != 0
    assert outs[True] == src.read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


def test_direct_writer_aborts_cleanly(tmp_path, monkeypatch):
    if not _direct_io_works(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    monkeypatch.setattr(direct_io.DirectSink, "STAGING", 8192)
    out = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(out, [("a", np.float32, (5000,)), ("b", np.float32, (3,))], direct=True) as w:
            assert w.direct
            w.write("a", np.ones(5000, np.float32))
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_direct_sink_closes_while_a_slice_is_still_held(tmp_path):
    """Ctrl-C / SIGTERM inside DirectSink.put leaves a slice of its buffer in the interrupted frame; the
    writer's abort must still close it (it raised BufferError, a traceback instead of one line)."""
    import mmap

    sink = direct_io.DirectSink.__new__(direct_io.DirectSink)  # its staging buffer, without the O_DIRECT file
    sink._fd, sink._buf = -1, mmap.mmap(-1, 4096)
    sink._view = memoryview(sink._buf)
    held = sink._view[0:16]
    sink.close()
    assert sink._view is None and len(held) == 16
