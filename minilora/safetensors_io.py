"""The safetensors file format, read lazily and written in a stream, with NumPy arrays.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length ``L``, ``L``
bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer; offsets are relative to the buffer and tensors are row-major, little-endian.

Why our own reader and writer rather than ``safetensors.numpy``: peak memory must be O(largest tensor),
so tensors are read one at a time with ``readinto`` and written one at a time after a header computed
up front; bfloat16 comes through as ``ml_dtypes.bfloat16``; and every lie a header can tell (offsets
past the end of a truncated file, overlapping or missing bytes, a size that disagrees with the shape,
an unknown dtype) becomes one ``InputError`` naming the file and tensor. The tests check both
directions against the ``safetensors`` package. Nothing here unpickles anything.
"""
import ctypes
import json
import math
import os
import struct
import sys
import tempfile

import ml_dtypes
import numpy as np

from minilora.direct_io import DirectSink
from minilora.errors import InputError
from minilora.output import commit

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


def _load_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux / glibc
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the dirty pages in the range, do not wait


def _sync_file_range(fd, offset, nbytes):
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a hint: its result does not matter


def _header_bytes(entries, metadata):
    header, offset = {}, 0
    if any(name == "__metadata__" for name, _, _ in entries):
        raise ValueError("a tensor cannot be named __metadata__ (the format's metadata key)")
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors metadata maps strings to strings, got {metadata!r:.80}")
        header["__metadata__"] = dict(metadata)
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data buffer starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class _Output:
    """``with`` an output: ``close()`` publishes it when the block succeeds, ``abort()`` removes it if not."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsWriter(_Output):
    """Streaming writer: the header is fixed up front from ``entries = [(name, dtype, shape), ...]``,
    then tensors are written one at a time in that order. Data goes to a temporary file in the
    destination folder, renamed into place by ``close()``; an exception inside ``with`` removes it.
    ``durable``: flush the file to disk (fsync) before the rename, so that not even a power cut can
    leave a damaged file under the final name. A durable file of at least ``DIRECT_MIN_BYTES`` is written
    with O_DIRECT (``DirectSink``: the bytes skip the page cache, which they would leave through the
    fsync anyway) where the filesystem allows it; otherwise writeback is started early to overlap the
    disk with the work. Without ``durable`` the page cache absorbs the writes (as ``cp`` does): a crash
    or Ctrl-C of this process still never leaves a partial output, a power cut right after might.
    """

    DIRECT_MIN_BYTES = 64 * 2**20

    def __init__(self, path, entries, metadata=None, durable=True, direct=None, replace=None):
        self.path = str(path)
        self.durable = durable
        self.replace = replace  # output.commit: None inside a stage folder; True / False (--force) for an output
        self._entries = [(n, np.dtype(d), tuple(s)) for n, d, s in entries]
        if len({n for n, _, _ in self._entries}) != len(self._entries):
            raise InputError("duplicate tensor names in the output", self.path)
        self._next = 0
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, self._tmp = tempfile.mkstemp(prefix=".minilora-", suffix=".partial", dir=folder)
        self._file = os.fdopen(fd, "wb", buffering=0)   # unbuffered: copy_from writes through the same fd
        self._flushed = 0                               # bytes handed to writeback so far
        self._sink = None                               # a DirectSink, when writing with O_DIRECT
        if direct is None:
            nbytes = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, d, s in self._entries)
            direct = durable and nbytes >= self.DIRECT_MIN_BYTES
        if direct:
            try:
                self._sink = DirectSink(self._tmp)
            except OSError:                             # not on this filesystem: buffered writes
                self._sink = None
        try:
            self._put(_header_bytes(self._entries, metadata))
        except BaseException:  # (no `with` block yet to clean up)
            self.abort()
            raise

    @property
    def direct(self):
        """True while the data goes to the file with O_DIRECT."""
        return self._sink is not None

    def _put(self, data):
        view = memoryview(data)
        view = view.cast("B") if view.nbytes else b""   # (a view with a zero in its shape cannot be cast)
        if self._sink is not None:
            self._sink.put(view)
            return
        while view:
            view = view[self._file.write(view):]
        self._start_writeback()

    def _start_writeback(self, every=32 * 2**20):
        """Ask the kernel to start writing the dirty pages behind us (no wait, nothing evicted), so that
        the fsync in ``close()`` finds little left to do. A hint: ignored where unsupported."""
        end = self._file.tell()
        if self.durable and end - self._flushed >= every:
            _sync_file_range(self._file.fileno(), self._flushed, end - self._flushed)
            self._flushed = end

    def _next_entry(self, name):
        want_name, dtype, shape = self._entries[self._next]
        if name != want_name:
            raise ValueError(f"tensors must be written in header order: expected {want_name!r}, got {name!r}")
        return dtype, shape

    def write(self, name, array=None, raw=None):
        """Write the next tensor, from an array (cast-free: dtype and shape must match) or raw bytes."""
        dtype, shape = self._next_entry(name)
        if raw is None:
            array = np.asarray(array)
            if array.dtype != dtype or array.shape != shape:
                raise ValueError(f"{name}: declared {dtype} {shape}, got {array.dtype} {array.shape}")
            array = np.ascontiguousarray(array)
            raw = array.view(np.uint8).data if sys.byteorder == "little" else array.astype(
                dtype.newbyteorder("<")).tobytes()  # no copy on little-endian machines
        elif len(memoryview(raw).cast("B")) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"{name}: raw data has {len(raw)} bytes, declared {dtype} {shape}")
        self._put(raw)
        self._next += 1

    def copy_from(self, name, reader):
        """Write the next tensor as a byte-identical copy of ``reader``'s tensor of the same name, inside
        the kernel (``copy_file_range``) where it can, else through a bounded buffer."""
        dtype, shape = self._next_entry(name)
        src_dtype, src_shape, _ = reader.info(name)
        if (src_dtype, src_shape) != (dtype, shape):
            raise ValueError(f"{name}: declared {dtype} {shape}, source has {src_dtype} {src_shape}")
        offset, left = reader.span(name)
        if self._sink is not None:
            if not self._sink.put_from_file(reader.fileno(), offset, left):
                raise InputError("file shrank while reading (truncated)", reader.path, name)
            left = 0
        while left:
            try:
                n = os.copy_file_range(reader.fileno(), self._file.fileno(), left, offset)
            except (AttributeError, OSError):   # no copy_file_range here (or not between these files)
                n = -1
            if n <= 0:
                data = os.pread(reader.fileno(), min(left, 64 * 2**20), offset)
                if not data:
                    raise InputError("file shrank while reading (truncated)", reader.path, name)
                self._put(data)
                n = len(data)
            else:
                self._start_writeback()
            offset, left = offset + n, left - n
        self._next += 1

    def close(self):
        if self._next != len(self._entries):
            self.abort()
            raise ValueError(f"{self.path}: only {self._next} of {len(self._entries)} tensors written")
        try:
            if self._sink is not None:
                self._sink.finish()
                self._sink.close()
                self._sink = None
            if self.durable:
                os.fsync(self._file.fileno())
            self._file.close()
            os.chmod(self._tmp, 0o644)
            commit(self._tmp, self.path, self.replace)
        except BaseException:  # e.g. the disk filled up: no partial output stays behind
            self.abort()
            raise

    def abort(self):
        if self._sink is not None:
            self._sink.close()
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


class SafetensorsAppender(_Output):
    """Writer for when the shapes are not known up front (quantised outputs): tensors are appended
    to a temporary data file; ``close()`` writes header + data to a temporary file in the destination
    folder and renames it into place. Memory stays O(one tensor); the output bytes are copied once."""

    def __init__(self, path, metadata=None, durable=True):
        self.path, self.metadata, self._entries, self.durable = str(path), metadata, [], durable
        folder = os.path.dirname(os.path.abspath(self.path))
        self._data = tempfile.TemporaryFile(dir=folder)

    def write(self, name, array):
        array = np.asarray(array)
        array = array if array.flags.c_contiguous else array.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
        self._entries.append((name, array.dtype, array.shape))
        self._data.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())

    def close(self):
        with SafetensorsWriter(self.path, self._entries, self.metadata, self.durable) as w:
            self._data.seek(0)
            for name, dtype, shape in self._entries:
                w.write(name, raw=self._data.read(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize))
        self._data.close()

    def abort(self):
        self._data.close()


def save_file(tensors, path, metadata=None):
    """Write a dict of arrays to one safetensors file, atomically (for small outputs: adapters)."""
    entries = [(n, np.asarray(a).dtype, np.shape(a)) for n, a in tensors.items()]
    with SafetensorsWriter(path, entries, metadata) as w:
        for name, array in tensors.items():
            w.write(name, array)


def load_file(path):
    """Read every tensor of a (small) safetensors file into a dict of arrays."""
    with SafetensorsReader(path) as f:
        return {name: f.get(name) for name in f.keys()}
