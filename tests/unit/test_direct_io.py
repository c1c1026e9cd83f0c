"""metamerge.io.direct: byte ranges written around the page cache give exactly the bytes a plain
write would, whatever the ranges' alignment, the piece sizes, and whether O_DIRECT is available."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from metamerge.io import direct
from metamerge.io.direct import BLOCK, RangeWriter, read_range


def cuts(lo: int, hi: int, rng: random.Random) -> list[tuple[int, int]]:
    """``[lo, hi)`` split at random points (ranges that start and end mid-block)."""
    points = sorted({lo, hi, *(rng.randrange(lo, hi) for _ in range(5))})
    return list(zip(points, points[1:]))


@pytest.mark.parametrize("use_direct", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_ranges_in_any_order_give_the_file(tmp_path, seed, use_direct, monkeypatch):
    monkeypatch.setattr(direct, "BUFFER", 3 * BLOCK)  # several direct flushes per range
    rng = random.Random(seed)
    size = 7 * BLOCK + rng.randrange(BLOCK) + 100
    want = bytes(rng.randrange(256) for _ in range(size))
    path = tmp_path / "shard"
    with open(path, "wb") as fh:
        fh.write(want[:100])  # a header, like prepare()
        fh.truncate(size)
    ranges = cuts(100, size, rng)
    rng.shuffle(ranges)  # units finish in any order
    for lo, hi in ranges:
        w = RangeWriter(path, lo, hi, direct=use_direct)
        pos = lo
        while pos < hi:  # pieces of any size
            n = min(hi - pos, rng.randrange(1, 2 * BLOCK))
            w.write(memoryview(want)[pos:pos + n])
            pos += n
        assert w.read(lo, hi) == want[lo:hi]  # what it wrote, buffered or not
        w.close()
    assert path.read_bytes() == want
    got = hashlib.sha256()
    read_range(path, 0, size, got.update, chunk=2 * BLOCK)
    assert got.hexdigest() == hashlib.sha256(want).hexdigest()
    parts: list[bytes] = []
    read_range(path, 5, size - 3, lambda piece: parts.append(bytes(piece)), chunk=2 * BLOCK)
    assert b"".join(parts) == want[5:size - 3]


def test_short_or_long_range_is_an_error(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(3 * BLOCK))
    w = RangeWriter(path, 10, 2 * BLOCK + 10)
    w.write(bytes(BLOCK))
    with pytest.raises(RuntimeError, match="wrote 4096 bytes of the range"):
        w.close()
    w = RangeWriter(path, 10, 20)
    with pytest.raises(RuntimeError, match="more bytes than the range"):
        w.write(bytes(11))
    w.abort()
    assert os.path.getsize(path) == 3 * BLOCK


def test_a_filesystem_that_opens_o_direct_but_refuses_it_falls_back(tmp_path, monkeypatch):
    """Some FUSE and NFS setups accept ``O_DIRECT`` at open and answer EINVAL on each I/O: the
    writer and the reader carry on through the page cache, with the same bytes."""
    import errno

    size = 5 * BLOCK + 123
    want = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(bytes(size))
    probe = direct._open_direct(path, os.O_RDONLY)
    if probe is None:
        pytest.skip("no O_DIRECT on this filesystem")
    os.close(probe)
    real_pwrite, real_preadv = os.pwrite, os.preadv

    def is_direct(fd: int) -> bool:
        import fcntl

        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & direct.O_DIRECT)

    def pwrite(fd, data, offset):
        if is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    def preadv(fd, buffers, offset):
        if is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "preadv", preadv)
    w = RangeWriter(path, 7, size)
    assert w.dfd is not None  # opened direct: refused only when used
    w.write(want[7:])
    w.close()
    assert path.read_bytes()[7:] == want[7:]
    parts: list[bytes] = []
    read_range(path, 7, size, lambda piece: parts.append(bytes(piece)))
    assert b"".join(parts) == want[7:]


def test_a_stop_inside_a_direct_write_is_the_error_the_caller_sees(tmp_path, monkeypatch):
    """A SIGTERM arriving inside ``pwrite`` leaves slices of the writer's buffer alive in the
    traceback while the unit cleans up: ``abort`` must not raise ``BufferError`` over the stop
    (CI saw a stopped merge exit 1 instead of 143)."""
    path = tmp_path / "f"
    path.write_bytes(bytes(4 * BLOCK))

    class Stop(Exception):
        pass

    def stopped(fd, data, offset):
        raise Stop("SIGTERM")

    w = RangeWriter(path, 0, 4 * BLOCK)
    monkeypatch.setattr(os, "pwrite", stopped)
    with pytest.raises(Stop):
        try:
            w.write(bytes(4 * BLOCK))  # fills the buffer to the range's end: a direct write
        finally:
            w.abort()  # the traceback (and its buffer slices) is alive here
    assert w.buf is None and w.fd is None
