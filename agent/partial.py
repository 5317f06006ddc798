"""One file being downloaded: its temp file next to the destination, its ranges, how far each has
got, and its digests.

A small sidecar JSON next to the partial file records how many bytes of each range have landed,
so a pull killed with SIGKILL continues from the bytes on disk. Partial files are named after the
file's content key (its etag) plus an owner tag: a changed remote file has another key and can
never be resumed into, and two writers never share a temp file. A large file may also hold an
O_DIRECT descriptor (agent/directio.py), used by the transfer for aligned units.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import checksums, directio
from .errors import DiskFull
from .sources.base import RemoteFile

SIDECAR_FLUSH_SECONDS = 0.5


@dataclass(frozen=True)
class FileJob:
    file: RemoteFile
    final: Path  # where the verified bytes go (a blob, or the file in a local dir)
    partial_dir: Path


def write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left while writing at offset {offset}") from None
            raise
        view, offset = view[n:], offset + n


_local = threading.local()


def _hash_buffer() -> bytearray:
    """One reusable read buffer per thread: hashing allocates nothing, so peak RSS stays flat
    (fresh multi-MiB reads per block let glibc's heap grow with the amount hashed)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(256 * 1024)  # cache-sized, like keepalive.READ_SIZE
    return buf


class PartialFile:
    """One file being downloaded: its temp file, its ranges, and how far each has got."""

    def __init__(self, job: FileJob, chunk_size: int, ranged: bool, candidates: list[Path] | None = None,
                 direct: bool = False):
        self.job = job
        self.file = job.file
        self.chunk = max(chunk_size, 1) if ranged else max(job.file.size, 1)
        self.count = max(1, -(-job.file.size // self.chunk))
        self.done = [0] * self.count
        self.lock = threading.Lock()
        self.path = job.partial_dir / f"{job.file.etag}.ma-{os.getpid()}-{uuid.uuid4().hex[:8]}.incomplete"
        self.sidecar = self.path.with_name(self.path.name + ".json")
        # A file that lands within the first flush interval never needs a resume record.
        self._last_flush = time.monotonic()
        self.flushed = False
        self.resumed_bytes = 0
        self.digests: checksums.Digests | checksums.RangeDigests = checksums.Digests(job.file.size, job.file.checksums)
        self._settled = False
        self._settle_lock = threading.Lock()
        self._hash_lock = threading.Lock()
        if ranged:
            self._adopt(candidates)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if self.resumed_bytes == 0:
            os.ftruncate(self.fd, 0)
        # Direct writes need aligned ranges; a record left by a buffered writer is rewound to them.
        self.direct_fd = directio.open_direct(self.path) if direct and self.chunk % directio.ALIGN == 0 else None
        self.direct_refused = False

    def aligned_done(self, idx: int) -> int:
        """Bytes of range `idx` landed, rounded down to directio.ALIGN (the few above are fetched again)."""
        start, end = self.bounds(idx)
        with self.lock:
            if self.done[idx] < end - start:  # a complete range stays complete, short tail and all
                self.done[idx] -= self.done[idx] % directio.ALIGN
            return self.done[idx]

    def write_direct(self, view: memoryview, pos: int) -> bool:
        """pwrite an aligned unit with O_DIRECT; False (and buffered from now on) if the file system refuses."""
        if self.direct_refused:
            return False
        try:
            write_all(self.direct_fd, view, pos)  # a full disk is DiskFull there, as for buffered writes
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        # Accepted at open, refused at write (some network file systems): the page cache from now on.
        # The descriptor stays open until close(): another worker may be inside a pwrite on it, and a
        # closed number could be reused by the next open() for another file.
        self.direct_refused = True
        return False

    def bounds(self, idx: int) -> tuple[int, int]:
        start = idx * self.chunk
        return start, min(start + self.chunk, self.file.size)

    def total_done(self) -> int:
        return sum(self.done)

    def _state(self) -> dict:
        return {"etag": self.file.etag, "size": self.file.size, "chunk": self.chunk, "done": self.done}

    def _adopt(self, candidates: list[Path] | None) -> None:
        """Take over the most complete partial a dead writer left for this same content."""
        best: tuple[int, Path, list[int]] | None = None
        if candidates is None:
            candidates = list(self.job.partial_dir.glob(f"{self.file.etag}.ma-*.incomplete"))
        for candidate in candidates:
            try:
                state = json.loads(candidate.with_name(candidate.name + ".json").read_text())
            except (OSError, ValueError):
                continue
            if (state.get("etag"), state.get("size")) != (self.file.etag, self.file.size):
                continue
            try:
                done = self._regrid(int(state["chunk"]), [int(d) for d in state["done"]])
            except (KeyError, TypeError, ValueError):
                continue
            if best is None or sum(done) > best[0]:
                best = (sum(done), candidate, done)
        if best is None:
            return
        _, candidate, done = best
        try:
            # Renaming is the claim: if another writer got there first, this raises and we start fresh.
            os.rename(candidate, self.path)
        except OSError:
            return
        candidate.with_name(candidate.name + ".json").unlink(missing_ok=True)
        self.done = done
        self.resumed_bytes = sum(done)

    def _regrid(self, old_chunk: int, old_done: list[int]) -> list[int]:
        """Map a record made with another range size (another engine, another --chunk-size) onto
        ours: each of our ranges keeps the landed bytes that run contiguously from its start."""
        landed = [(i * old_chunk, i * old_chunk + max(0, d)) for i, d in enumerate(old_done) if d > 0]
        done = []
        for i in range(self.count):
            start, end = self.bounds(i)
            pos = start
            moved = True
            while moved and pos < end:
                moved = False
                for lo, hi in landed:
                    if lo <= pos < hi:
                        pos, moved = min(hi, end), True
            done.append(pos - start)
        return done

    def advance(self, idx: int, n: int) -> None:
        with self.lock:
            self.done[idx] += n
            now = time.monotonic()
            if now - self._last_flush >= SIDECAR_FLUSH_SECONDS:
                self._flush_locked(now)

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

    def hash_landed(self, idx: int, pos: int, piece) -> None:
        """Hash bytes just written at `pos` in range `idx`: from memory when they are next in line."""
        self._settle_digests()
        digests = self.digests
        if isinstance(digests, checksums.RangeDigests):
            if digests.fed[idx] == pos - idx * self.chunk:
                digests.update(idx, piece)
            else:
                self._catch_up(idx)  # a resumed range: what an earlier run landed is read back, once
            return
        start, end = self.bounds(idx)
        if not self._hash_inline(pos, piece) and start <= digests.fed < end:
            self.hash_ahead()  # this range is the hashing frontier: keep the digest right behind it

    def _catch_up(self, idx: int) -> None:
        """Range digests: hash what landed in range `idx` beyond what was hashed (one thread per range)."""
        start = idx * self.chunk
        with self.lock:
            landed = self.done[idx]
        self._read_back(start + self.digests.fed[idx], start + landed, lambda data: self.digests.update(idx, data))

    def _read_back(self, pos: int, end: int, update: Callable) -> None:
        buf = _hash_buffer()
        while pos < end:
            n = os.preadv(self.fd, [memoryview(buf)[: min(len(buf), end - pos)]], pos)
            if not n:
                return
            update(memoryview(buf)[:n])
            pos += n

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
            while True:
                end = self._hashable_end()
                if end <= self.digests.fed:
                    return
                if not self.digests.hashers:  # no checksum to compute (size only): read nothing back
                    self.digests.fed = end
                    continue
                self._read_back(self.digests.fed, end, self.digests.update)
        finally:
            self._hash_lock.release()

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

    def flush(self) -> None:
        with self.lock:
            self._flush_locked(time.monotonic())

    def flush_quietly(self) -> None:
        """After a failure: keep the resume record exact for the next run, if the disk lets us."""
        try:
            self.flush()
        except OSError:
            pass

    def _flush_locked(self, now: float) -> None:
        # Written after the bytes it describes, so after a kill it is never ahead of the data.
        # No fsync: a process kill keeps the page cache, and a power cut is caught by verification.
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        tmp.write_text(json.dumps(self._state()))
        os.replace(tmp, self.sidecar)
        self._last_flush = now
        self.flushed = True

    def reset(self) -> int:
        """Throw every byte away (bad checksum, or a server that ignores ranges); returns how many."""
        with self.lock, self._hash_lock:
            lost = sum(self.done)
            self.done = [0] * self.count
            self.digests = checksums.Digests(self.file.size, self.file.checksums)
            self._settled = False
            os.ftruncate(self.fd, 0)
            self._flush_locked(time.monotonic())
            return lost

    def close(self, keep: bool) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
        os.close(self.fd)
        if not keep:
            self.path.unlink(missing_ok=True)
            self.sidecar.unlink(missing_ok=True)


def leftover_partials(folders: set[Path]) -> dict[tuple[Path, str], list[Path]]:
    """Partial files dead writers left, by (folder, content key): one listing per folder, not per file."""
    found: dict[tuple[Path, str], list[Path]] = {}
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if ".ma-" in name and name.endswith(".incomplete"):
                found.setdefault((folder, name.split(".", 1)[0]), []).append(folder / name)
    return found
