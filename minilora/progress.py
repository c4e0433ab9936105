"""Progress on stderr for long work: items done, bytes/s, ETA. Quiet when asked; on a non-TTY stream
it prints a plain line every few seconds instead of redrawing one line."""
import sys
import time


class Progress:
    """``with Progress(total_bytes, "merge") as p: p.update(nbytes, label)``."""

    def __init__(self, total, desc, enabled=True, stream=None, interval=2.0):
        self.total, self.desc, self.enabled = max(int(total), 1), desc, enabled
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.interval = 0.1 if self.tty else interval
        self.done = self.items = 0
        self.start = self._last = time.perf_counter()

    def update(self, n, label=""):
        self.done += int(n)
        self.items += 1
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval or self.done >= self.total):
            self._last = now
            self._print(label, now)

    def _print(self, label, now):
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f"{self.desc}: {100 * self.done / self.total:5.1f}% {self.items} tensors "
                f"{rate / 1e6:7.1f} MB/s ETA {eta:5.1f}s {label[:60]}")
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
