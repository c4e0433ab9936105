"""Sequential file writes that bypass the page cache (``O_DIRECT``), for large durable outputs.

Used by ``minilora.safetensors_write.SafetensorsWriter`` for durable files of 64 MiB or more; see
docs/merge.md "Streaming and safety" for why and for the measurements. Linux-only in effect: where
``O_DIRECT`` does not exist or the filesystem refuses it, ``DirectSink`` raises ``OSError`` on
construction and the writer stays with buffered writes.
"""
import mmap
import os


class DirectSink:
    """Sequential writes to a file opened with ``O_DIRECT``, through one page-aligned staging buffer.

    The bytes go from the staging buffer to the device by DMA: no page-cache page is allocated for them.
    That matters for multi-GB outputs: a buffered write has to find (and, on a VM whose balloon driver
    reports free memory to the host, fault in from the host) one fresh page-cache page per 4 KiB, which
    measured 2.3–4.8 s per GB (write + fsync) on the benchmark VM against 0.55–1.0 s per GB written
    directly; and it leaves the page cache holding gigabytes of output nobody reads. O_DIRECT needs the
    memory address, the file offset and the length aligned to the logical block size (``BLOCK`` covers 512
    and 4096); the staging buffer keeps all three aligned, the tail is written padded and the file truncated
    to its size. The constructor raises ``OSError`` where the filesystem refuses O_DIRECT (tmpfs, some
    network filesystems): it opens the existing file and probes one aligned write, so the caller can fall
    back before writing anything.
    """

    BLOCK = 4096
    STAGING = 16 * 2**20  # bytes per write: a multiple of BLOCK

    def __init__(self, path):
        size = self.STAGING
        self._fd, self._view = -1, None
        if not hasattr(os, "O_DIRECT"):
            raise OSError("O_DIRECT is not available on this system")
        self._fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            self._buf = mmap.mmap(-1, size)  # page-aligned, reused for the whole file
            self._view = memoryview(self._buf)
            os.pwrite(self._fd, self._view[:self.BLOCK], 0)  # the probe; the header overwrites it
        except BaseException:
            self.close()
            raise
        self._fill = 0  # bytes staged
        self._done = 0  # bytes on disk, a multiple of BLOCK

    def put(self, data):
        """Append the bytes of ``data`` (a byte memoryview)."""
        while data:
            n = min(len(data), len(self._view) - self._fill)
            self._view[self._fill:self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == len(self._view):
                self._flush(self._fill)

    def put_from_file(self, fd, offset, count):
        """Append ``count`` bytes of file ``fd`` from ``offset``, read straight into the staging buffer;
        returns False if the file ends first."""
        while count:
            n = os.preadv(fd, [self._view[self._fill:self._fill + min(count, len(self._view) - self._fill)]], offset)
            if n == 0:
                return False
            self._fill, offset, count = self._fill + n, offset + n, count - n
            if self._fill == len(self._view):
                self._flush(self._fill)
        return True

    def _flush(self, n):  # n: a multiple of BLOCK
        written = 0
        while written < n:
            written += os.pwrite(self._fd, self._view[written:n], self._done + written)
        self._done += n
        self._fill = 0

    def finish(self):
        """Write the tail (padded to BLOCK) and truncate the file to the bytes put; returns that size."""
        total = self._done + self._fill
        if self._fill:
            pad = -self._fill % self.BLOCK
            self._view[self._fill:self._fill + pad] = bytes(pad)
            self._flush(self._fill + pad)
        os.ftruncate(self._fd, total)
        return total

    def close(self):
        if self._view is not None:
            view, buf, self._view = self._view, self._buf, None
            try:
                view.release()
                buf.close()
            except BufferError:  # a slice of it is still held by an interrupted frame (Ctrl-C, SIGTERM
                pass             # mid-copy): the mapping is freed with the last reference instead
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
