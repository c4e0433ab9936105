"""minilora.pipeline: read-ahead / write-behind keeps order, reuses buffers, surfaces errors, never hangs."""
import threading

import numpy as np
import pytest

from minilora.pipeline import TensorStream
from minilora.safetensors_io import SafetensorsReader, load_file
from minilora.safetensors_write import SafetensorsWriter, save_file


def _source(tmp_path, n=7):
    tensors = {f"t{i}": np.full((i + 1, 3), i, dtype=np.float32) for i in range(n)}
    save_file(tensors, tmp_path / "src.safetensors")
    return tensors


def test_order_buffers_and_copies(tmp_path):
    tensors = _source(tmp_path)
    seen = set()
    with SafetensorsReader(tmp_path / "src.safetensors") as r:
        with SafetensorsWriter(tmp_path / "out.safetensors", [(n, a.dtype, a.shape) for n, a in tensors.items()]) as w, \
                TensorStream(max(a.nbytes for a in tensors.values())) as s:
            for i, name in enumerate(tensors):
                if i % 3 == 2:
                    s.write(w, name, copy_from=r)
                    continue
                W, buf = s.read(r, name).result()
                seen.add(id(buf))
                W += 100                       # the buffer is ours: modify in place
                s.write(w, name, array=W, release=buf)
            s.drain()
    assert len(seen) <= 3                      # a pool of three buffers, reused
    out = load_file(tmp_path / "out.safetensors")
    for i, (name, a) in enumerate(tensors.items()):
        np.testing.assert_array_equal(out[name], a if i % 3 == 2 else a + 100)


def test_a_failed_write_is_raised_in_the_caller_and_nothing_is_published(tmp_path):
    tensors = _source(tmp_path, 3)
    with SafetensorsReader(tmp_path / "src.safetensors") as r:
        with pytest.raises(ValueError, match="declared"):
            with SafetensorsWriter(tmp_path / "out.safetensors", [(n, a.dtype, a.shape) for n, a in tensors.items()]) as w, \
                    TensorStream(64) as s:
                W, buf = s.read(r, "t0").result()
                s.write(w, "t0", array=W[:0], release=buf)   # wrong shape: fails on the writer thread
                s.drain()
    assert not (tmp_path / "out.safetensors").exists()


def test_close_does_not_hang_on_a_read_waiting_for_a_buffer(tmp_path):
    _source(tmp_path, 5)
    done = threading.Event()

    def run():
        with SafetensorsReader(tmp_path / "src.safetensors") as r, TensorStream(64, buffers=1) as s:
            s.read(r, "t0").result()           # holds the only buffer and never releases it
            s.read(r, "t1")                    # waits for a buffer ...
        done.set()                             # ... and close() wakes it

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert done.is_set()


def test_cancel_drops_queued_writes_and_waits_for_the_running_one():
    import time

    class SlowWriter:
        def __init__(self):
            self.started, self.finished = [], []

        def write(self, name, array):
            self.started.append(name)
            time.sleep(0.2)
            self.finished.append(name)

    w = SlowWriter()
    with TensorStream(64) as s:
        for name in ("a", "b", "c"):
            s.write(w, name, array=None)
        deadline = time.monotonic() + 10
        while not w.started and time.monotonic() < deadline:
            time.sleep(0.001)                  # until "a" runs; "b" and "c" wait behind it
        s.cancel()
        assert w.started == w.finished == ["a"]  # nothing runs after cancel() returns
        s.drain()                              # nothing left to raise
