"""Fetch files into per-process temp files next to their destination: resume, retry, verify, promote.

A large file is cut into ranges fetched in parallel by a pool of workers per reader, each writing
with `pwrite` at its offset into the file's PartialFile (agent/partial.py: the temp file, its
resume record and its digests).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Protocol

from . import checksums, directio
from .ahead import units_of
from .errors import IntegrityError, Retryable
from .layout import fsync_dir, promote
from .partial import FileJob, PartialFile, write_all
from .resume import leftover_partials
from .retry import RetryPolicy, call_with_retry
from .sources.base import RangeReader, RangesIgnored, RemoteFile

__all__ = ["FileJob", "PartialFile", "Progress", "Stopped", "Transfer", "interleave"]


class Stopped(Exception):
    """Another file failed for good: this task stops early, leaving its resume record exact."""


class Progress(Protocol):
    def add_bytes(self, n: int) -> None: ...  # negative when a retry throws bytes away
    def add_resumed(self, n: int) -> None: ...  # bytes an earlier run left: not network bytes
    def file_done(self, file: RemoteFile) -> None: ...
    def retry(self, reason: str, delay: float, what: str) -> None: ...


def interleave(lists: list[list]) -> list:
    """[[a0, a1, a2], [b0], [c0, c1]] -> [a0, b0, c0, a1, c1, a2]."""
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


class Transfer:
    """Runs every file's ranges on one bounded pool; the first hard error stops the rest."""

    def __init__(self, reader: RangeReader, progress: Progress, *, workers: int, chunk_size: int,
                 policy: RetryPolicy, sleep: Callable[[float], None] | None = None, direct_io: bool = True,
                 fence: Callable[[], None] = lambda: None):
        self.reader = reader
        # Raises (LeaseLost) once this writer may no longer write: asked before every write and promote.
        self.fence = fence
        self.direct_io = direct_io
        self.progress = progress
        self.workers = workers
        self.chunk_size = chunk_size
        self.policy = policy
        self.sleep = sleep or self._backoff
        self.stop = threading.Event()
        self._first_error: BaseException | None = None
        self.dirty_dirs: set[Path] = set()
        self._leftovers: dict[tuple[Path, str], list[Path]] = {}
        self._error_lock = threading.Lock()
        self._dir_lock = threading.Lock()
        self._streaming: set[Path] = set()  # partials being fetched as one stream (see _stream_whole)
        self._opened: list[PartialFile] = []  # closed when the run ends, however it ends
        self._in_order: dict[int, bool] = {}  # by reader: are its large files' ranges taken in file order?

    def _fail(self, exc: BaseException) -> None:
        with self._error_lock:
            if self._first_error is None and not isinstance(exc, Stopped):
                self._first_error = exc
        self.stop.set()

    def _backoff(self, seconds: float) -> None:
        """A retry's wait that ends the moment the transfer stops (SIGTERM unwinding the main thread,
        another file's hard error): a worker must never hold the pod past its grace period in a
        Retry-After of up to two minutes."""
        if self.stop.wait(seconds):
            raise Stopped()

    def run(self, jobs: list[FileJob]) -> None:
        if not jobs:
            return
        pools: dict[int, ThreadPoolExecutor] = {}
        try:
            for folder in {job.partial_dir for job in jobs}:
                folder.mkdir(parents=True, exist_ok=True)
            self._leftovers = leftover_partials({job.partial_dir for job in jobs})
            futures = [pools[key].submit(self._guarded, pf, work)
                       for key, tasks in self._queues(jobs, pools).items() for pf, work in tasks]
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
            for pool in pools.values():
                pool.shutdown(wait=True, cancel_futures=True)
            self._close_leftovers()

    def _queues(self, jobs: list[FileJob], pools: dict[int, ThreadPoolExecutor]) -> dict[int, list]:
        """Each reader's tasks in the order its own pool takes them; fills `pools`, one per reader, of
        its streams() threads. With one pool for all, the 40 small files of a 1 GiB Xet model waited
        behind every Xet range and ran last, alone: 0.26 s of a 2.4 s pull (HTTP CAS, 2 cores)."""
        by_reader: dict[int, tuple[RangeReader, list[FileJob]]] = {}
        for job in sorted(jobs, key=lambda j: -j.file.size):
            reader = self.reader.for_file(job.file)
            by_reader.setdefault(id(reader), (reader, []))[1].append(job)
        queues = {}
        for key, (reader, mine) in by_reader.items():
            threads = reader.streams(self.workers, sum(job.file.size for job in mine))
            pools[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"transfer-{reader.name}")
            # Biggest first: the long poles start early, small files fill the gaps. The ranges of the
            # large files are dealt out in turns (file A range 0, file B range 0, ... A 1, B 1), so
            # the workers write to several files at once instead of queueing on one file's inode lock.
            # With at least as many large files as threads, a file's next range is dealt out `large`
            # tasks after its previous one, so it starts after that one landed: hashed in file order
            # from memory, with nothing to read back.
            large = sum(1 for job in mine if job.file.size > reader.range_size(self.chunk_size))
            self._in_order[key] = large >= threads
            per_file = [self._tasks(job) for job in mine]
            queues[key] = (interleave([t for t in per_file if len(t) > 1])
                           + [w for t in per_file if len(t) == 1 for w in t])
        return queues

    def _close_leftovers(self) -> None:
        """After a failure: close every partial still open (a sync daemon runs round after round, and
        each failed round would otherwise keep its descriptors until EMFILE), keeping its record."""
        with self._dir_lock:
            opened, self._opened = self._opened, []
        for pf in opened:
            pf.set_aside()

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
            # 4.23-4.84 s through the page cache, nothing read back. A reader whose pieces may be
            # kept (ahead_budget: Xet) lets those ranges wait in memory instead (agent/ahead.py).
            direct = (self.direct_io and reader.ranged and job.file.size > range_size
                      and (self._in_order[id(reader)] or reader.ahead_budget is not None
                           or not checksums.hashed_in_file_order(job.file.checksums, range_size)))
            pf = PartialFile(job, range_size, reader.ranged, self._leftovers.get((job.partial_dir, job.file.etag), []),
                             direct=direct, ahead=reader.ahead_budget)
            with self._dir_lock:
                self._opened.append(pf)
            if pf.resumed_bytes:
                self.progress.add_resumed(pf.resumed_bytes)
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
            try:
                self._fetch_range(reader, pf, idx)
            except RangesIgnored as exc:
                self._stream_whole(reader, pf, exc)

        call_with_retry(
            attempt, policy=self.policy, what=self._what(pf), progress_mark=pf.total_done,
            on_retry=lambda reason, delay, exc: self.progress.retry(reason, delay, str(exc)), sleep=self.sleep,
        )

    def _fetch_range(self, reader: RangeReader, pf: PartialFile, idx: int) -> None:
        start, end = pf.bounds(idx)
        if pf.direct_fd is not None and pf.rewind_to_alignment(idx):
            return self._fetch_range_direct(reader, pf, idx, start, end)
        pos = start + pf.done[idx]
        if pos >= end and pf.file.size:
            return
        for piece in reader.read_range(pf.file, pos, end):
            if self.stop.is_set():
                raise Stopped()
            self.fence()
            n = len(piece)
            if pos + n > end:
                raise Retryable("overrun", f"{pf.file.path}: server sent more than the {end - start} bytes asked for")
            write_all(pf.fd, piece, pos)
            pf.advance(idx, n)
            self.progress.add_bytes(n)
            pf.hash_landed(idx, pos, piece, memoryview(piece) if reader.ahead_budget is not None else None)
            pos += n
        if pos != end:
            raise Retryable("truncated", f"{pf.file.path}: body ended at byte {pos} of {end}")

    def _fetch_range_direct(self, reader: RangeReader, pf: PartialFile, idx: int, start: int, end: int) -> None:
        """The range through the thread's aligned buffer, one directio.UNIT per pwrite. Bytes count as
        landed (resume record, progress, digests) only once their unit is written. A range whose hashed
        bytes end off the alignment (a body cut short) goes on through the page cache instead (see
        PartialFile.rewind_to_alignment): hashed bytes are never written again."""
        unit_pos = start + pf.done[idx]
        if unit_pos >= end and pf.file.size:
            return
        buf = directio.staging_buffer()
        if reader.ahead_budget is not None:  # its pieces may be kept: hashed from memory if they land ahead
            units = units_of(reader.read_range(pf.file, unit_pos, end), buf)
        else:
            units = ((n, None) for n in reader.read_range_into(pf.file, unit_pos, end, buf))
        for n, kept in units:
            if self.stop.is_set():
                raise Stopped()
            self.fence()
            if unit_pos + n > end:
                raise Retryable("overrun", f"{pf.file.path}: server sent more than the {end - start} bytes asked for")
            self._land(pf, idx, buf, unit_pos, n, kept)
            unit_pos += n
        if unit_pos != end:
            raise Retryable("truncated", f"{pf.file.path}: body ended at byte {unit_pos} of {end}")

    def _land(self, pf: PartialFile, idx: int, buf: memoryview, pos: int, n: int, kept: memoryview | None = None) -> None:
        # A short unit (the file's last, or a body cut short) goes out padded with zeros to the
        # alignment; the padding covers only bytes not landed yet (ranges end aligned, but for the
        # file's last), which a retry rewrites, or the tail past the end that _finish cuts off.
        padded = -(-n // directio.ALIGN) * directio.ALIGN
        if padded != n:
            buf[n:padded] = bytes(padded - n)
        if not pf.write_direct(buf[:padded], pos):
            write_all(pf.fd, buf[:n], pos)
        pf.advance(idx, n)
        self.progress.add_bytes(n)
        pf.hash_landed(idx, pos, buf[:n], kept)

    def _stream_whole(self, reader: RangeReader, pf: PartialFile, ignored: RangesIgnored) -> None:
        """The server sent the whole file to a ranged request: take the file as one stream from byte 0,
        once, rather than re-read its head for every range (a 32 MiB file in 1 MiB ranges cost 706 MiB).
        The other ranges of the file return at once: they are landed by this stream, which their
        tasks (counted before _finish) outlive. It retries on its own, each time from byte 0."""
        with pf.lock:
            claimed = not self.stop.is_set() and pf.path not in self._streaming and sum(pf.done) < pf.file.size
            if claimed:
                self._streaming.add(pf.path)
        if not claimed:
            ignored.discard()
            if self.stop.is_set():
                raise Stopped()
            return
        body = [ignored.body]  # the first attempt reads the body that came with the 200

        def attempt() -> None:
            self.progress.add_bytes(-pf.reset())  # the body starts at byte 0, whatever had landed
            pos, size = 0, pf.file.size
            pieces, body[0] = body[0] or reader.read_range(pf.file, 0, size), None
            for piece in pieces:
                if self.stop.is_set():
                    raise Stopped()
                self.fence()
                if pos + len(piece) > size:
                    raise Retryable("overrun", f"{pf.file.path}: server sent more than the {size} bytes of the file")
                write_all(pf.fd, piece, pos)
                self.progress.add_bytes(len(piece))
                off = 0
                while off < len(piece):  # each range gets its share: the resume record stays exact
                    idx = (pos + off) // pf.chunk
                    take = min(len(piece) - off, pf.bounds(idx)[1] - pos - off)
                    pf.advance(idx, take)
                    pf.hash_landed(idx, pos + off, piece[off:off + take])
                    off += take
                pos += len(piece)
            if pos != size:
                raise Retryable("truncated", f"{pf.file.path}: body ended at byte {pos} of {size}")

        try:
            call_with_retry(attempt, policy=self.policy, what=self._what(pf), progress_mark=pf.total_done,
                            on_retry=lambda reason, delay, exc: self.progress.retry(reason, delay, str(exc)),
                            sleep=self.sleep)
        finally:
            ignored.discard()  # a body never started has no generator cleanup of its own
            with pf.lock:
                self._streaming.discard(pf.path)

    def _fetch_whole(self, reader: RangeReader, pf: PartialFile) -> None:
        got = {"n": 0}

        def on_bytes(n: int) -> None:
            # Also called with 0 while the reader waits on a child process: where it learns to stop.
            if self.stop.is_set():
                raise Stopped()
            self.fence()
            got["n"] += n
            self.progress.add_bytes(n)

        self.fence()
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
            problems = pf.problems()
            self.fence()
            if not problems:
                if os.fstat(pf.fd).st_size > pf.file.size:
                    os.ftruncate(pf.fd, pf.file.size)  # a direct write's padding past the end: only ever down
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
