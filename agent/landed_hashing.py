"""Hashing a file's bytes as they land, for PartialFile (agent/partial.py): in file order from memory
when a piece is next in line, from memory when it landed ahead and was kept (agent/ahead.py), else
read back from the file; checksums that combine (CRCs, composite ones) range by range, so nothing is
read back for them.

A mixin, so the hashing reads the partial's own state under the partial's own locks. It uses, from
PartialFile: `file`, `chunk`, `count`, `bounds()`, `done` (under `lock`), `fd`, `digests`,
`stash`, `damaged`, and the locks `_hash_lock` (one hasher in file order at a time) and `_settle_lock`.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

from . import checksums

_local = threading.local()


def _hash_buffer() -> bytearray:
    """One reusable read buffer per thread: hashing allocates nothing, so peak RSS stays flat
    (fresh multi-MiB reads per block let glibc's heap grow with the amount hashed)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(256 * 1024)  # cache-sized, like keepalive.READ_SIZE
    return buf


class LandedHashing:
    """PartialFile's hashing of landed bytes (see the module)."""

    def _hashable_end(self) -> int:
        """End of the contiguous run of landed bytes that starts at byte 0."""
        with self.lock:
            end = 0
            for i in range(self.count):
                start, stop = self.bounds(i)
                end = start + self.done[i]
                if end < stop:
                    break
            return end

    def _settle_digests(self) -> None:
        """Pick the digests once, just before the first byte is hashed: by then the source has learned
        every checksum it will (a response's header, a HEAD). Checksums that combine (CRCs, composite
        ones) are hashed range by range, so no byte is ever read back; others in file order."""
        if self._settled:
            return
        with self._settle_lock:
            if self._settled:
                return
            if self.count > 1 and checksums.RangeDigests.possible(self.file.checksums, self.chunk):
                self.digests = checksums.RangeDigests(self.file.size, self.file.checksums, self.chunk)
            elif self.digests.expected != checksums.chosen(self.file.checksums):
                self.digests = checksums.Digests(self.file.size, self.file.checksums)
            self._settled = True

    def hash_landed(self, idx: int, pos: int, piece, kept: memoryview | None = None) -> None:
        """Hash bytes just written at `pos` in range `idx`: from memory when they are next in line.
        `kept`, a read-only view of the same bytes, may be held until the frontier reaches them."""
        self._settle_digests()
        digests = self.digests
        if isinstance(digests, checksums.RangeDigests):
            if digests.fed[idx] == pos - idx * self.chunk:
                digests.update(idx, piece)
            else:
                self._catch_up(idx)  # a resumed range: what an earlier run landed is read back, once
            return
        start, end = self.bounds(idx)
        if self._hash_inline(pos, piece):
            if pos + len(piece) == end and end < self.file.size:
                # The frontier moved to the next range, which may have landed already (ranges in
                # flight land out of order): hash on from there. Without this, an Xet range (one
                # piece) that landed ahead of the frontier waited for the final check: 325 of 341
                # MiB of each shard were hashed after the last byte, 0.3 s of a 1.9 s pull.
                self.hash_ahead()
        else:
            if kept is not None and self.stash is not None:
                self.stash.keep(pos, kept, digests.fed)
            if start <= digests.fed < end:
                self.hash_ahead()  # this range is the hashing frontier: keep the digest right behind it

    def _catch_up(self, idx: int) -> None:
        """Range digests: hash what landed in range `idx` beyond what was hashed (one thread per range)."""
        start = idx * self.chunk
        with self.lock:
            landed = self.done[idx]
        self._read_back(start + self.digests.fed[idx], start + landed, lambda data: self.digests.update(idx, data))

    def _read_back(self, pos: int, end: int, update: Callable) -> bool:
        """Hash [pos, end) from disk; False (and the file marked damaged) if it ends before `end`."""
        buf = _hash_buffer()
        while pos < end:
            n = os.preadv(self.fd, [memoryview(buf)[: min(len(buf), end - pos)]], pos)
            if not n:
                self.damaged = f"partial file ends at byte {pos}, its record says {end} landed"
                return False
            update(memoryview(buf)[:n])
            pos += n
        return True

    def hash_ahead(self, wait: bool = False) -> None:
        """Hash whatever has landed and is not hashed yet, from disk; `wait` for a busy hasher."""
        self._settle_digests()
        if isinstance(self.digests, checksums.RangeDigests):
            if wait:  # only when every range has landed: then no worker hashes any more
                for idx in range(self.count):
                    self._catch_up(idx)
            return
        if not self._hash_lock.acquire(blocking=wait):
            return
        try:
            while self.damaged is None:
                end = self._hashable_end()
                if end <= self.digests.fed:
                    return
                if not self.digests.hashers:  # no checksum to compute (size only): read nothing back
                    self.digests.fed = end
                    continue
                self._hash_through(end)
        finally:
            self._hash_lock.release()

    def _hash_through(self, end: int) -> None:
        """Hash [fed, end) in file order (under the hash lock): kept units from memory, the rest read back."""
        stash, digests = self.stash, self.digests
        if stash is None:
            self._read_back(digests.fed, end, digests.update)
            return
        stash.drop_below(digests.fed)
        while digests.fed < end and self.damaged is None:
            view = stash.take(digests.fed)
            if view is not None:
                digests.update(view)
                continue
            stop = min(end, stash.next_after(digests.fed) or end)
            if not self._read_back(digests.fed, stop, digests.update):
                return

    def _hash_inline(self, pos: int, piece) -> bool:
        """In file order: hash a piece from memory when it is exactly the next byte the digests need.
        False when another thread hashes, or the frontier is elsewhere."""
        if not self._hash_lock.acquire(blocking=False):
            return False
        try:
            if self.digests.fed != pos:
                return False
            if self.digests.hashers:
                self.digests.update(piece)
            else:
                self.digests.fed += len(piece)
            return True
        finally:
            self._hash_lock.release()
