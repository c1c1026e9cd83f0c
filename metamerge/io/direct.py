"""Write one byte range of a file, and read one back, around the page cache (``O_DIRECT``).

Why: a merge writes as many bytes as the model has, once, and nothing reads them again in this
process. Through the page cache every written page is first a fresh page of memory. On the
virtual machines this project runs on (and most cloud VMs, whose memory the host lends page by
page), touching a fresh page costs far more than copying into it: a 1.9 GB merge spent 7 s of its
workers' time in ``pwrite`` at 0.25 GB/s, where ``O_DIRECT`` writes ran at 2.3 GB/s. It also
keeps the output from evicting the inputs (which the next merge reads again) from the cache.

``O_DIRECT`` wants block-aligned offsets, lengths and buffers. A unit's range starts and ends
anywhere, so :class:`RangeWriter` writes the aligned middle directly, from a page-aligned buffer
it fills in order, and the partial blocks at either end through the page cache. Those edge blocks
are shared with the neighbouring units, which write their own bytes of them the same way; no block
is ever written both ways. Where ``O_DIRECT`` is refused (tmpfs, some network filesystems, macOS),
everything goes through the page cache as before.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from ..errors import DISK_ERRNOS, disk_error

BLOCK = 4096           # alignment that satisfies every common logical block size
BUFFER = 8 << 20       # bytes gathered before a direct write
O_DIRECT = getattr(os, "O_DIRECT", 0)


def _open_direct(path: Path, flags: int) -> int | None:
    if not O_DIRECT:
        return None
    try:
        return os.open(path, flags | O_DIRECT)
    except OSError:  # EINVAL: this filesystem has no direct I/O
        return None


class RangeWriter:
    """Write ``[start, end)`` of an existing file sequentially, the aligned part with ``O_DIRECT``.

    ``write`` takes the range's bytes in order; ``read`` returns bytes this writer already wrote
    (a tied tensor copied from an earlier one); ``close`` flushes, syncs and checks the length.
    """

    def __init__(self, path: Path, start: int, end: int, *, direct: bool = True):
        self.path, self.start, self.end, self.pos = path, start, end, start
        self.fd = os.open(path, os.O_RDWR)
        self.dfd = _open_direct(path, os.O_RDWR) if direct else None
        if self.dfd is None:  # all buffered: the "middle" is empty
            self.lo = self.hi = end
        else:
            self.lo = min(end, -(-start // BLOCK) * BLOCK)   # first block boundary at or after start
            self.hi = max(self.lo, end // BLOCK * BLOCK)     # last block boundary at or before end
        self.buf = mmap.mmap(-1, BUFFER) if self.hi > self.lo else None  # page-aligned
        self.view = memoryview(self.buf) if self.buf is not None else None
        self.buf_at = self.lo   # file offset of the buffer's first byte
        self.fill = 0

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            if self.pos < self.lo or self.pos >= self.hi:  # an edge: through the page cache
                stop = self.lo if self.pos < self.lo else self.end
                n = min(len(data), stop - self.pos)
                if n <= 0:
                    raise RuntimeError(f"{self.path}: more bytes than the range [{self.start}, {self.end})")
                self._pwrite(self.fd, data[:n], self.pos)
            else:
                assert self.view is not None
                n = min(len(data), self.hi - self.pos, BUFFER - self.fill)
                self.view[self.fill:self.fill + n] = data[:n]
                self.fill += n
                if self.fill == BUFFER or self.pos + n == self.hi:
                    self._flush()
            data = data[n:]
            self.pos += n

    def _flush(self) -> None:
        if self.fill:
            assert self.view is not None and self.fill % BLOCK == 0
            try:
                self._pwrite(self.dfd if self.dfd is not None else self.fd, self.view[:self.fill], self.buf_at)
            except OSError as exc:  # opened with O_DIRECT but refused on write (some FUSE, NFS setups)
                if exc.errno != errno.EINVAL or self.dfd is None:
                    raise
                os.close(self.dfd)
                self.dfd = None  # from here on through the page cache
                self._pwrite(self.fd, self.view[:self.fill], self.buf_at)
            self.buf_at += self.fill
            self.fill = 0

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> None:
        try:
            while len(data):
                n = os.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n
        except OSError as exc:  # ENOSPC, EFBIG, EDQUOT: one line naming the file
            if exc.errno not in DISK_ERRNOS:
                raise
            raise disk_error(exc, self.path) from None

    def read(self, lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of what this writer wrote (still buffered or already on disk)."""
        assert self.start <= lo <= hi <= self.pos
        a, b = self.buf_at, self.buf_at + self.fill  # the bytes only the buffer holds yet
        out = bytearray()
        if lo < min(hi, a):  # before them: the page cache, or the disk after a direct write
            out += os.pread(self.fd, min(hi, a) - lo, lo)
        if max(lo, a) < min(hi, b):
            assert self.view is not None
            out += self.view[max(lo, a) - a:min(hi, b) - a]
        if max(lo, b) < hi:  # after them: the trailing edge, through the page cache
            out += os.pread(self.fd, hi - max(lo, b), max(lo, b))
        return bytes(out)

    def close(self) -> None:
        """Flush what is buffered; the range must be whole."""
        try:
            if self.pos != self.end:
                raise RuntimeError(f"{self.path}: wrote {self.pos - self.start} bytes of the range "
                                   f"[{self.start}, {self.end})")
            self._flush()
        finally:
            self.abort()

    def abort(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd is not None:
                os.close(fd)
        self.fd = self.dfd = None  # type: ignore[assignment]
        _free(self.view, self.buf)
        self.view = self.buf = None


def read_range(path: Path, lo: int, hi: int, consume, chunk: int = 16 << 20) -> None:
    """Pass the bytes ``[lo, hi)`` of ``path`` to ``consume`` in pieces, read with ``O_DIRECT``
    into one aligned buffer where the filesystem allows (no page of the page cache filled), else
    buffered. A piece is only valid during its call."""
    dfd = _open_direct(path, os.O_RDONLY)
    if dfd is None:
        _read_buffered(path, lo, hi, consume, chunk)
        return
    buf = mmap.mmap(-1, chunk)
    view = memoryview(buf)
    try:
        pos = lo // BLOCK * BLOCK
        while lo < hi:
            try:
                n = os.preadv(dfd, [view], pos)
            except OSError as exc:  # opened with O_DIRECT but refused on read: the rest buffered
                if exc.errno != errno.EINVAL:
                    raise
                _read_buffered(path, lo, hi, consume, chunk)
                return
            if n <= lo - pos:
                raise OSError(f"{path}: shorter than planned")
            with view[lo - pos:min(n, hi - pos)] as part:
                consume(part)
            lo = pos + min(n, hi - pos)
            pos = lo // BLOCK * BLOCK
    finally:
        _free(view, buf)
        os.close(dfd)


def _free(view: memoryview | None, buf: mmap.mmap | None) -> None:
    """Unmap a buffer now, or, where slices of it are still alive, when the last one goes.

    Why: a stop (SIGTERM) or error raised inside a ``pwrite`` leaves slices of the buffer in the
    traceback's frames while the caller cleans up; ``mmap.close`` would then raise ``BufferError``
    and hide the real exception (a stopped merge exiting 1 instead of 143).
    """
    if view is not None:
        view.release()
    if buf is not None:
        try:
            buf.close()
        except BufferError:  # exported slices: the mapping goes with its last reference
            pass


def _read_buffered(path: Path, lo: int, hi: int, consume, chunk: int) -> None:
    with open(path, "rb") as fh:
        fh.seek(lo)
        while lo < hi:
            piece = fh.read(min(chunk, hi - lo))
            if not piece:
                raise OSError(f"{path}: shorter than planned")
            consume(piece)
            lo += len(piece)
