"""Fetch files into per-process temp files next to their destination: resume, retry, verify, promote.

A large file is cut into ranges fetched in parallel by a shared pool of workers, each writing
with `pwrite` at its offset. A small sidecar JSON next to the partial file records how many bytes
of each range have landed, so a pull killed with SIGKILL continues from the bytes on disk. Partial
files are named after the file's content key (its etag) plus an owner tag: a changed remote file
has another key and can never be resumed into, and two writers never share a temp file.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from . import checksums, directio
from .errors import DiskFull, IntegrityError, Retryable
from .layout import fsync_dir, promote
from .retry import RetryPolicy, call_with_retry
from .sources.base import RangeReader, RemoteFile

SIDECAR_FLUSH_SECONDS = 0.5


class Stopped(Exception):
    """Another file failed for good: this task stops early, leaving its resume record exact."""


class Progress(Protocol):
    def add_bytes(self, n: int) -> None: ...  # negative when a retry throws bytes away
    def file_done(self, file: RemoteFile) -> None: ...
    def retry(self, reason: str, delay: float, what: str) -> None: ...


@dataclass(frozen=True)
class FileJob:
    file: RemoteFile
    final: Path  # where the verified bytes go (a blob, or the file in a local dir)
    partial_dir: Path


def _write_all(fd: int, data, offset: int) -> None:
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
            while view:
                n = os.pwrite(self.direct_fd, view, pos)
                view, pos = view[n:], pos + n
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left while writing at offset {pos}") from None
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


def interleave(lists: list[list]) -> list:
    """[[a0, a1, a2], [b0], [c0, c1]] -> [a0, b0, c0, a1, c1, a2]."""
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


class Transfer:
    """Runs every file's ranges on one bounded pool; the first hard error stops the rest."""

    def __init__(self, reader: RangeReader, progress: Progress, *, workers: int, chunk_size: int,
                 policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep, direct_io: bool = True):
        self.reader = reader
        self.direct_io = direct_io
        self.progress = progress
        self.workers = workers
        self.chunk_size = chunk_size
        self.policy = policy
        self.sleep = sleep
        self.stop = threading.Event()
        self._first_error: BaseException | None = None
        self.dirty_dirs: set[Path] = set()
        self._leftovers: dict[tuple[Path, str], list[Path]] = {}
        self._error_lock = threading.Lock()
        self._dir_lock = threading.Lock()
        self._ranges_in_order = False

    def _fail(self, exc: BaseException) -> None:
        with self._error_lock:
            if self._first_error is None and not isinstance(exc, Stopped):
                self._first_error = exc
        self.stop.set()

    def run(self, jobs: list[FileJob]) -> None:
        if not jobs:
            return
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="transfer")
        try:
            for folder in {job.partial_dir for job in jobs}:
                folder.mkdir(parents=True, exist_ok=True)
            self._leftovers = leftover_partials({job.partial_dir for job in jobs})
            # Biggest first: the long poles start early, small files fill the gaps. The ranges of the
            # large files are dealt out in turns (file A range 0, file B range 0, ... A 1, B 1), so
            # the workers write to several files at once instead of queueing on one file's inode lock.
            large = sum(1 for job in jobs if job.file.size > self.reader.for_file(job.file).range_size(self.chunk_size))
            # With at least as many large files as workers, a file's next range is dealt out `large`
            # tasks after its previous one, so it starts after that one landed: hashed in file order
            # from memory, with nothing to read back.
            self._ranges_in_order = large >= self.workers
            per_file = [self._tasks(job) for job in sorted(jobs, key=lambda j: -j.file.size)]
            ordered = interleave([t for t in per_file if len(t) > 1]) + [w for t in per_file if len(t) == 1 for w in t]
            futures = [pool.submit(self._guarded, pf, work) for pf, work in ordered]
            wait(futures, return_when=FIRST_EXCEPTION)
            if self.stop.is_set():
                wait(futures)  # let the others notice and stop, so the first real error is known
            if self._first_error is not None:
                raise self._first_error
            for f in futures:
                f.result()
            for folder in self.dirty_dirs:
                fsync_dir(folder)  # before the caller writes a lockfile or marker that vouches for them
        finally:
            self.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _tasks(self, job: FileJob) -> list[tuple[PartialFile | None, Callable[[], None]]]:
        """The file's work as (partial, task) pairs: one per range still missing, or one in all."""
        reader = self.reader.for_file(job.file)
        range_size = reader.range_size(self.chunk_size)

        def open_partial() -> PartialFile:
            # O_DIRECT for the large files, unless their checksum must be hashed in file order while
            # several of their ranges are in flight: the ranges landing ahead of the hashing frontier
            # are then read back, which the page cache serves from memory and O_DIRECT would make a
            # second pass over the device. Measured from the Hub, sha256: 2 x 1 GiB (4 ranges of a
            # file in flight) no faster with O_DIRECT; 16 x 128 MiB (in order) 2.92-3.31 s against
            # 4.23-4.84 s through the page cache, nothing read back.
            direct = (self.direct_io and reader.ranged and job.file.size > range_size
                      and (self._ranges_in_order or not checksums.hashed_in_file_order(job.file.checksums, range_size)))
            pf = PartialFile(job, range_size, reader.ranged, self._leftovers.get((job.partial_dir, job.file.etag), []),
                             direct=direct)
            if pf.resumed_bytes:
                self.progress.add_bytes(pf.resumed_bytes)
            return pf

        if job.file.size <= range_size or not reader.ranged:
            # One range: the task opens its own temp file when it starts. Opening hundreds of small
            # files up front cost the main thread ~0.2 s per 300 files, serially, before any byte moved.
            return [(None, lambda: self._one_range_file(reader, open_partial()))]
        pf = open_partial()
        pending = [i for i in range(pf.count) if pf.done[i] < pf.bounds(i)[1] - pf.bounds(i)[0]]
        remaining = {"n": len(pending)}
        counter_lock = threading.Lock()

        def task(idx: int) -> None:
            self._fetch(reader, pf, idx)
            with counter_lock:
                remaining["n"] -= 1
                last = remaining["n"] == 0
            if last:
                self._finish(reader, pf)

        if not pending:  # every range landed before a kill: only the verify and promote are left
            return [(pf, lambda: self._finish(reader, pf))]
        return [(pf, lambda i=i: task(i)) for i in pending]

    def _one_range_file(self, reader: RangeReader, pf: PartialFile) -> None:
        try:
            self._fetch(reader, pf, 0)
            self._finish(reader, pf)
        except BaseException:
            pf.flush_quietly()
            raise

    def _guarded(self, pf: PartialFile | None, work: Callable[[], None]) -> None:
        """Run one task unless the transfer already stopped; its failure stops the others."""
        try:
            if self.stop.is_set():
                return
            work()
        except BaseException as exc:
            self._fail(exc)
            if pf is not None:
                pf.flush_quietly()
            raise

    def _ensure_dir(self, folder: Path) -> None:
        """mkdir once per folder and run (a stat per small file adds up), and remember to fsync it."""
        with self._dir_lock:  # held across the mkdir: no thread may rename into a folder not made yet
            if folder not in self.dirty_dirs:
                folder.mkdir(parents=True, exist_ok=True)
                self.dirty_dirs.add(folder)

    def _what(self, pf: PartialFile) -> str:
        return pf.file.path

    def _fetch(self, reader: RangeReader, pf: PartialFile, idx: int) -> None:
        def attempt() -> None:
            if not reader.ranged:
                return self._fetch_whole(reader, pf)
            self._fetch_range(reader, pf, idx)

        call_with_retry(
            attempt, policy=self.policy, what=self._what(pf), progress_mark=pf.total_done,
            on_retry=lambda reason, delay, exc: self.progress.retry(reason, delay, str(exc)), sleep=self.sleep,
        )

    def _fetch_range(self, reader: RangeReader, pf: PartialFile, idx: int) -> None:
        start, end = pf.bounds(idx)
        if pf.direct_fd is not None:
            return self._fetch_range_direct(reader, pf, idx, start, end)
        pos = start + pf.done[idx]
        if pos >= end and pf.file.size:
            return
        for piece in reader.read_range(pf.file, pos, end):
            if self.stop.is_set():
                raise Stopped()
            n = len(piece)
            if pos + n > end:
                raise Retryable("overrun", f"{pf.file.path}: server sent more than the {end - start} bytes asked for")
            _write_all(pf.fd, piece, pos)
            pf.advance(idx, n)
            self.progress.add_bytes(n)
            pf.hash_landed(idx, pos, piece)
            pos += n
        if pos != end:
            raise Retryable("truncated", f"{pf.file.path}: body ended at byte {pos} of {end}")

    def _fetch_range_direct(self, reader: RangeReader, pf: PartialFile, idx: int, start: int, end: int) -> None:
        """The range through the thread's aligned buffer, one directio.UNIT per pwrite. Bytes count as
        landed (resume record, progress, digests) only once their unit is written."""
        unit_pos = start + pf.aligned_done(idx)
        if unit_pos >= end and pf.file.size:
            return
        buf = directio.staging_buffer()
        for n in reader.read_range_into(pf.file, unit_pos, end, buf):
            if self.stop.is_set():
                raise Stopped()
            if unit_pos + n > end:
                raise Retryable("overrun", f"{pf.file.path}: server sent more than the {end - start} bytes asked for")
            self._land(pf, idx, buf, unit_pos, n)
            unit_pos += n
        if unit_pos != end:
            raise Retryable("truncated", f"{pf.file.path}: body ended at byte {unit_pos} of {end}")

    def _land(self, pf: PartialFile, idx: int, buf: memoryview, pos: int, n: int) -> None:
        # A short unit (the file's last, or a body cut short) goes out padded with zeros to the
        # alignment; the padding covers only bytes not landed yet (ranges end aligned, but for the
        # file's last), which a retry rewrites, or the tail past the end that _finish cuts off.
        padded = -(-n // directio.ALIGN) * directio.ALIGN
        if padded != n:
            buf[n:padded] = bytes(padded - n)
        if not pf.write_direct(buf[:padded], pos):
            _write_all(pf.fd, buf[:n], pos)
        pf.advance(idx, n)
        self.progress.add_bytes(n)
        pf.hash_landed(idx, pos, buf[:n])

    def _fetch_whole(self, reader: RangeReader, pf: PartialFile) -> None:
        got = {"n": 0}

        def on_bytes(n: int) -> None:
            got["n"] += n
            self.progress.add_bytes(n)

        try:
            reader.fetch_whole(pf.file, str(pf.path), on_bytes)
        except Retryable:
            self.progress.add_bytes(-got["n"])
            raise
        pf.done = [pf.file.size]

    def _finish(self, reader: RangeReader, pf: PartialFile) -> None:
        """Verify, and on a mismatch download once more before giving up with IntegrityError."""
        for attempt in (1, 2):
            pf.hash_ahead(wait=True)
            problems = pf.digests.problems()
            if not problems:
                if os.fstat(pf.fd).st_size != pf.file.size:
                    os.ftruncate(pf.fd, pf.file.size)  # a direct write's padding past the end
                os.fsync(pf.fd)
                pf.close(keep=True)
                # The folder is fsynced once for all its files when the run ends (see `run`):
                # two fsyncs per file dominate a snapshot of many small files.
                self._ensure_dir(pf.job.final.parent)
                promote(pf.path, pf.job.final, synced=True, fsync_parent=False)
                if pf.flushed or pf.resumed_bytes:
                    pf.sidecar.unlink(missing_ok=True)
                self.progress.file_done(pf.file)
                return
            if attempt == 2:
                pf.close(keep=False)
                raise IntegrityError(f"{pf.file.path}: {', '.join(problems)} after a fresh download")
            self.progress.retry("integrity", 0.0, f"{pf.file.path}: {', '.join(problems)}; downloading it again")
            self.progress.add_bytes(-pf.reset())
            for idx in range(pf.count):
                self._fetch(reader, pf, idx)
