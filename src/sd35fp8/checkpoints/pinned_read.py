"""File bytes -> GPU tensor through a ring of pinned host buffers (the loader's CUDA read path).

Reading a safetensors tensor through its mmap and then `.to("cuda")` costs a page fault per few
pages and a pageable (staged, synchronous) host-to-device copy: ~1.5 GB/s on an H200 host even
when the file sits in the page cache (a 16 GB SD3.5 Large all-in-one file took 10-11 s to load).
Here each tensor's byte range is read with `os.preadv` (a plain read, no faults, the GIL released)
into one of `RING` pinned buffers of `CHUNK` bytes, and copied to the device asynchronously on the
current stream; a buffer is refilled only after the event recorded behind its last copy has fired.
So the disk/page-cache read of chunk k+1 overlaps the DMA of chunk k. A chunk is read by up to
`THREADS` threads at once (one copy out of the page cache runs at ~3 GB/s per core; preadv
releases the GIL), each filling its own slice of the buffer.

    reader = PinnedReader()                      # one per process (`pinned_reader()`), lazily pinned
    t = reader.read(fd, offset, nbytes, dtype, shape, device)   # [shape] dtype on `device`

The result is ordered on the current CUDA stream like any other op, so no synchronisation is needed
before using it on that stream. `SD35FP8_PINNED_READ=0` turns the path off (mmap + `.to`, as on CPU).
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

CHUNK = 64 << 20  # bytes per pinned buffer
RING = 4  # pinned buffers in flight
ENV = "SD35FP8_PINNED_READ"
THREADS = max(1, min(8, (os.cpu_count() or 1)))  # readers per chunk
MIN_PART = 4 << 20  # bytes: smaller reads are not split across threads


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(ENV, "1") != "0" and hasattr(os, "preadv")


class PinnedReader:
    def __init__(self, chunk: int = CHUNK, ring: int = RING, threads: int = THREADS):
        self.chunk, self.ring, self.threads = chunk, ring, threads
        self._pool: ThreadPoolExecutor | None = None
        self._buffers: list[torch.Tensor] = []  # [chunk] uint8, pinned
        self._views: list[memoryview] = []
        self._events: list[torch.cuda.Event | None] = []
        self._next = 0
        self._lock = threading.Lock()

    def _setup(self, pin: bool) -> None:
        if not self._buffers:
            for _ in range(self.ring):
                buf = torch.empty(self.chunk, dtype=torch.uint8, pin_memory=pin)
                self._buffers.append(buf)
                self._views.append(memoryview(buf.numpy()))
                self._events.append(None)

    def read(self, fd: int, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...],
             device: torch.device) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the open file `fd` as a [shape] `dtype` tensor on `device`."""
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        raw = torch.empty(nbytes, dtype=torch.uint8, device=device)  # [nbytes]
        cuda = device.type == "cuda"  # CPU: the same loop with plain buffers and copies (tests)
        with self._lock, (torch.cuda.device(device) if cuda else contextlib.nullcontext()):
            self._setup(pin=cuda)
            stream = torch.cuda.current_stream(device) if cuda else None
            done = 0
            while done < nbytes:
                n = min(self.chunk, nbytes - done)
                i = self._next
                self._next = (i + 1) % self.ring
                if self._events[i] is not None:
                    self._events[i].synchronize()  # the DMA out of this buffer has finished
                self._fill(fd, self._views[i][:n], offset + done, nbytes, offset)
                raw[done:done + n].copy_(self._buffers[i][:n], non_blocking=cuda)
                if cuda:
                    event = torch.cuda.Event()
                    event.record(stream)
                    self._events[i] = event
                done += n
        return raw.view(dtype).reshape(shape)

    def _fill(self, fd: int, view: memoryview, at: int, nbytes: int, start: int) -> None:
        """view[:] = file bytes [at, at + len(view)), split over the thread pool when large."""
        n = len(view)
        parts = max(1, min(self.threads, n // MIN_PART))
        if parts == 1:
            _pread_all(fd, view, at, nbytes, start)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="sd35fp8-read")
        step = -(-n // parts)
        futures = [self._pool.submit(_pread_all, fd, view[a:a + step], at + a, nbytes, start)
                   for a in range(0, n, step)]
        for f in futures:
            f.result()  # re-raises a short read


def _pread_all(fd: int, view: memoryview, at: int, nbytes: int, start: int) -> None:
    got = 0
    while got < len(view):
        r = os.preadv(fd, [view[got:]], at + got)
        if r <= 0:
            raise OSError(f"unexpected end of file at byte {at + got} (wanted {nbytes} bytes from {start})")
        got += r


_READER: PinnedReader | None = None


def pinned_reader() -> PinnedReader:
    global _READER
    if _READER is None:
        _READER = PinnedReader()
    return _READER
