"""Overlapped tensor streaming: read ahead and write behind on two helper threads.

A streamed merge spends its time in three places: copying a tensor out of the page cache (read), the
merge kernel, and copying the result back (write), then the final fsync. All three release the GIL, so
while the kernel merges tensor i, one thread reads tensor i+1 and another writes tensor i-1 (and starts
the disk's writeback). Read buffers come from a pool of three, each as large as the largest tensor that
is read, so a stream faults its memory in once instead of once per tensor; peak memory stays
O(largest tensor). Tensors that are copied unchanged never enter the pool: the writer copies them file
to file (``SafetensorsWriter.copy_from``).

>>> # with TensorStream(max_bytes) as s:
>>> #     ahead = s.read(reader, name)           # a future: (array, buffer)
>>> #     W, buf = ahead.result(); ...            # merge W in place
>>> #     s.write(writer, name, array=W, release=buf)
>>> #     s.drain()                               # before writer.close()

Not here: what is merged (``minilora.merge``), the file format (``minilora.safetensors_io``).
"""
import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class TensorStream:
    """One reader thread, one writer thread, a pool of ``buffers`` read buffers of ``buffer_bytes``."""

    def __init__(self, buffer_bytes, buffers=3):
        self._bytes = int(buffer_bytes)
        self._count = buffers
        self._free = queue.Queue()
        for _ in range(buffers):
            self._free.put(None)             # allocated on first use
        self._closed = False
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="minilora-read")
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="minilora-write")
        self._pending = []

    def read(self, reader, name):
        """Start reading ``name``; returns a future of ``(array, buffer)``: the array is a view of the
        pool buffer, which goes back to the pool when a ``write(..., release=buffer)`` has written it."""
        def job():
            buf = self._free.get()           # waits until a write has finished with a buffer
            if self._closed:
                return None
            if buf is None:
                buf = np.empty(self._bytes, dtype=np.uint8)
            try:
                return reader.get(name, buffer=buf), buf
            except BaseException:
                self._free.put(buf)
                raise
        return self._reads.submit(job)

    def write(self, writer, name, array=None, copy_from=None, release=None):
        """Queue the next tensor of ``writer``: ``array``, or a file-to-file copy of ``copy_from``'s
        tensor; ``release`` (a pool buffer) is returned to the pool once written. Raises the error of an
        earlier write, if one failed."""
        def job():
            try:
                if copy_from is not None:
                    writer.copy_from(name, copy_from)
                else:
                    writer.write(name, array)
            finally:
                if release is not None:
                    self._free.put(release)
        self._check()
        self._pending.append(self._writes.submit(job))

    def _check(self):
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()    # re-raises a failed write here, in the caller's thread

    def drain(self):
        """Wait for every queued write; re-raise the first error."""
        while self._pending:
            self._pending.pop(0).result()

    def cancel(self):
        """Drop the queued writes and wait for the one running, raising nothing (the caller is failing
        already): afterwards no thread writes into a file the caller is about to remove."""
        for f in self._pending:
            f.cancel()
        for f in self._pending:
            try:
                f.result()
            except BaseException:  # noqa: BLE001  (CancelledError, or the write's own error)
                pass
        self._pending = []

    def close(self):
        self._closed = True
        for _ in range(self._count):         # wake a read waiting for a buffer that will never come back
            self._free.put(None)
        self._reads.shutdown(wait=True, cancel_futures=True)
        self._writes.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
