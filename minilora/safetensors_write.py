"""Writing safetensors files in a stream (the format and the reader: ``minilora.safetensors_io``).

``SafetensorsWriter`` takes tensors in the order of a header fixed up front (memory O(one tensor), optional
O_DIRECT); ``SafetensorsAppender`` collects tensors whose shapes come one by one; ``save_file`` writes a small
dict at once. Each writes a temporary file next to its destination and renames it into place when complete
(``minilora.output.commit``).
"""
import ctypes
import json
import os
import struct
import sys
import tempfile

import numpy as np

from minilora.direct_io import DirectSink
from minilora.errors import InputError
from minilora.output import commit
from minilora.safetensors_io import dtype_name


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
