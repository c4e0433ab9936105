"""The safetensors file format, read lazily and written in a stream, with NumPy arrays.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length ``L``, ``L``
bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer; offsets are relative to the buffer and tensors are row-major, little-endian.

Writing: ``minilora.safetensors_write``. Why our own reader and writer rather than ``safetensors.numpy``: peak memory must be O(largest tensor),
so tensors are read one at a time with ``readinto`` and written one at a time after a header computed
up front; bfloat16 comes through as ``ml_dtypes.bfloat16``; and every lie a header can tell (offsets
past the end of a truncated file, overlapping or missing bytes, a size that disagrees with the shape,
an unknown dtype) becomes one ``InputError`` naming the file and tensor. The tests check both
directions against the ``safetensors`` package. Nothing here unpickles anything.
"""
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from minilora.errors import InputError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dt: name for name, dt in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the safetensors package's own limit


def dtype_name(dtype):
    """The safetensors name of a NumPy dtype (``float32`` → ``"F32"``)."""
    try:
        return NAMES[np.dtype(dtype)]
    except KeyError:
        raise InputError(f"dtype {np.dtype(dtype)} has no safetensors equivalent") from None


class SafetensorsReader:
    """Lazy reader: parses and validates the header, reads one tensor per ``get``.

    >>> # with SafetensorsReader("model.safetensors") as f: W = f.get("lm_head.weight")
    """

    def __init__(self, path):
        self.path = str(path)
        self._file = open(self.path, "rb")
        try:
            self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _parse_header(self):
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise InputError(f"not a safetensors file: {size} bytes, shorter than the 8-byte header length",
                             self.path)
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > MAX_HEADER or 8 + n > size:
            raise InputError(f"header length {n} does not fit in a file of {size} bytes "
                             f"(truncated or not safetensors)", self.path)
        try:  # strictly UTF-8, as the format says (json.loads(bytes) would also guess UTF-16 or skip a BOM)
            header = json.loads(self._file.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"header is not valid JSON ({e})", self.path) from None
        if not isinstance(header, dict):
            raise InputError("header is not a JSON object", self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise InputError(f"__metadata__ must map strings to strings, got {self.metadata!r:.80}", self.path)
        self.data_start = 8 + n
        self._entries = {}
        spans = []
        for name, e in header.items():
            self._entries[name] = self._check_entry(name, e, size)
            spans.append(tuple(e["data_offsets"]) + (name,))
        # Offsets must tile the buffer exactly: no overlap, no hole, nothing after the last tensor.
        end = 0
        for begin, stop, name in sorted(spans):
            if begin != end:
                what = "overlaps the previous tensor" if begin < end else f"leaves a hole at byte {end}"
                raise InputError(f"data_offsets [{begin}, {stop}] {what}", self.path, name)
            end = stop
        if self.data_start + end != size:
            raise InputError(f"file has {size - self.data_start - end} bytes past the last tensor "
                             f"(the header does not describe the whole file)", self.path)

    def _check_entry(self, name, e, size):
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise InputError("header entry lacks dtype / shape / data_offsets", self.path, name)
        if not isinstance(e["dtype"], str) or e["dtype"] not in DTYPES:
            raise InputError(f"unknown dtype {e['dtype']!r} (known: {', '.join(DTYPES)})", self.path, name)
        shape, offsets = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):  # (bool is no size)
            raise InputError(f"shape {shape!r} is not a list of non-negative integers", self.path, name)
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise InputError(f"data_offsets {offsets!r} are not [begin, end] with begin <= end",
                             self.path, name)
        dtype = DTYPES[e["dtype"]]
        nbytes = math.prod(shape) * dtype.itemsize  # exact (Python ints): a huge shape cannot wrap around
        if offsets[1] - offsets[0] != nbytes:
            raise InputError(f"header says {offsets[1] - offsets[0]} bytes but shape {shape} of "
                             f"{e['dtype']} needs {nbytes}", self.path, name)
        if self.data_start + offsets[1] > size:
            raise InputError(f"file is truncated: the tensor ends at byte {self.data_start + offsets[1]} "
                             f"but the file has {size} bytes", self.path, name)
        return dtype, tuple(shape), offsets[0], offsets[1]

    def keys(self):
        """Tensor names in file order (the order of the data buffer)."""
        return sorted(self._entries, key=lambda k: self._entries[k][2])

    def __contains__(self, name):
        return name in self._entries

    def info(self, name):
        """``(dtype, shape, nbytes)`` of a tensor, without reading it."""
        dtype, shape, begin, end = self._entry(name)
        return dtype, shape, end - begin

    def _entry(self, name):
        try:
            return self._entries[name]
        except KeyError:
            raise InputError("no such tensor in this file", self.path, name) from None

    def get_bytes(self, name):
        """The raw little-endian bytes of a tensor (for byte-identical copies)."""
        _, _, begin, end = self._entry(name)
        self._file.seek(self.data_start + begin)
        data = self._file.read(end - begin)
        if len(data) != end - begin:
            raise InputError("file shrank while reading (truncated)", self.path, name)
        return data

    def get(self, name, buffer=None):
        """A writable array of the tensor; the file is never modified. Fresh and owned by default; with
        ``buffer`` (a uint8 array of at least ``nbytes``) a view of the buffer's first bytes, so that a
        stream of tensors can reuse memory instead of faulting in new pages for each one."""
        dtype, shape, begin, end = self._entry(name)
        if buffer is None:
            out = np.empty(shape, dtype=dtype.newbyteorder("<"))
        else:
            out = buffer[:end - begin].view(dtype.newbyteorder("<")).reshape(shape)
        self._file.seek(self.data_start + begin)
        if self._file.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
            raise InputError("file shrank while reading (truncated)", self.path, name)
        return out.astype(dtype, copy=False)

    def span(self, name):
        """``(byte offset in the file, nbytes)`` of a tensor's data, for copies that bypass NumPy."""
        _, _, begin, end = self._entry(name)
        return self.data_start + begin, end - begin

    def fileno(self):
        return self._file.fileno()

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_file(path):
    """Read every tensor of a (small) safetensors file into a dict of arrays."""
    with SafetensorsReader(path) as f:
        return {name: f.get(name) for name in f.keys()}
