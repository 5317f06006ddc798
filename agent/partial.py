"""One file being downloaded: its temp file next to the destination, its ranges, how far each has
got, and its digests (hashed as bytes land: agent/landed_hashing.py).

A small sidecar JSON next to the partial file records how many bytes of each range have landed,
so a pull killed with SIGKILL continues from the bytes on disk. It holds two counts per range:
`written` (every pwrite that returned) with the kernel's boot id, and `done` (bytes fdatasynced
before the record was written). A SIGKILL loses no written byte (the page cache keeps it), so a
writer on the same boot trusts `written`; after a node crash (another boot id) only `done` is
trusted, and a record never vouches for data the disk may have lost. A record that claims more than
the file holds anyway is cut back to it. Records are cheap (no sync) and written every 8 MiB or
0.1 s, so a kill costs little more than what was in flight; the fdatasync behind `done` runs once a
second, on a thread of its own. Partial files are named after the file's content key (its etag)
plus an owner tag: a changed remote file has another key and can never be resumed into,
and two writers never share a temp file. A new writer resumes a dead one's partial by copying its
landed bytes, never by taking the file: the old writer may only be paused, with the file still open.
A large file may also hold an O_DIRECT descriptor (agent/directio.py), used by the transfer for
aligned units.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import checksums, directio, resume
from .ahead import AheadBudget, AheadStash
from .landed_hashing import LandedHashing
from .errors import DiskFull
from .sources.base import RemoteFile

RECORD_SECONDS = 0.1  # how often the resume record is rewritten (no sync: a rename of a small file),
RECORD_BYTES = 8 * 2**20  # or sooner, once this much more landed: at 500 MB/s, 0.1 s is 50 MB
SYNC_SECONDS = 1.0  # how often the partial is fdatasynced, so that `done` survives a node crash
# One thread for every partial's periodic fdatasync: the disk is one queue anyway.
_SYNCER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="partial-sync")


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


class PartialFile(LandedHashing):
    """One file being downloaded: its temp file, its ranges, and how far each has got."""

    def __init__(self, job: FileJob, chunk_size: int, ranged: bool, candidates: list[Path] | None = None,
                 direct: bool = False, ahead: AheadBudget | None = None):
        self.job = job
        self.file = job.file
        self.chunk = max(chunk_size, 1) if ranged else max(job.file.size, 1)
        self.count = max(1, -(-job.file.size // self.chunk))
        self.done = [0] * self.count
        self.lock = threading.Lock()
        self._sync_lock = threading.Lock()  # held across an fdatasync (slow)
        self._record_lock = threading.Lock()  # held across a record write (fast)
        self._sync_queued = False
        self._resets = 0  # reset() calls: a sync that straddles one vouches for nothing
        self.path = job.partial_dir / f"{job.file.etag}.ma-{os.getpid()}-{uuid.uuid4().hex[:8]}.incomplete"
        self.sidecar = self.path.with_name(self.path.name + ".json")
        self.damaged: str | None = None  # the file holds less than the record says (a crash, a lying disk)
        # A file that lands within the first record interval never needs a resume record.
        self._last_record = self._last_sync = time.monotonic()
        self._unrecorded = 0  # bytes landed since the last record
        self.synced: list[int] = [0] * self.count  # what `done` held at the last fdatasync
        self.flushed = False
        self.resumed_bytes = 0
        self.digests: checksums.Digests | checksums.RangeDigests = checksums.Digests(job.file.size, job.file.checksums)
        self._settled = False
        self._settle_lock = threading.Lock()
        self._hash_lock = threading.Lock()
        # Units that landed ahead of the hashing frontier, kept in memory (agent/ahead.py says why)
        self.stash = AheadStash(ahead, job.file.size) if ahead is not None else None
        self.fd = -1
        if ranged:
            self._adopt(candidates)
        if self.fd < 0:
            # 0666 & ~umask, as huggingface_hub's own .incomplete files and blobs: on a group-shared
            # cache (umask 002) another user's process can adopt and finish the partial.
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        # Direct writes need aligned ranges; a record left by a buffered writer is rewound to them.
        self.direct_fd = directio.open_direct(self.path) if direct and self.chunk % directio.ALIGN == 0 else None
        self.direct_refused = False

    def rewind_to_alignment(self, idx: int) -> bool:
        """Let range `idx` go on with O_DIRECT: rewind its landed count to directio.ALIGN (the few bytes
        above are fetched again). False, and nothing changed, when some of those bytes were hashed
        already (a body cut short in this run): sent again, they would overwrite hashed bytes unhashed
        and a re-send that differs would pass verification; the range then goes on buffered."""
        start, end = self.bounds(idx)

        def aligned_or_complete() -> bool:  # a complete range stays complete, short tail and all
            return self.done[idx] % directio.ALIGN == 0 or self.done[idx] >= end - start

        with self.lock:
            if aligned_or_complete():
                return True  # the usual case: no wait for a hasher
        with self._hash_lock, self.lock:  # no file-order hasher reads this range meanwhile
            if aligned_or_complete():
                return True
            aligned = self.done[idx] - self.done[idx] % directio.ALIGN
            digests = self.digests
            hashed = digests.fed[idx] if isinstance(digests, checksums.RangeDigests) else digests.fed - start
            if hashed > aligned:
                return False
            self.done[idx] = aligned
            return True

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
        return {"etag": self.file.etag, "size": self.file.size, "chunk": self.chunk, "done": self.synced,
                "written": list(self.done), "boot": resume.BOOT_ID}

    def _adopt(self, candidates: list[Path] | None) -> None:
        """Continue the most complete partial an earlier writer left for this same content (see
        agent/resume.py: another writer's bytes are copied, never its file taken)."""
        if candidates is None:
            candidates = list(self.job.partial_dir.glob(f"{self.file.etag}.ma-*.incomplete"))
        grid = resume.Grid(self.chunk, self.file.size)
        for done, candidate in resume.ranked(candidates, self.file.etag, grid):
            taken = resume.resume_into(candidate, self.path, done, grid)
            if taken is not None:
                self.fd, self.done = taken
                self.resumed_bytes = sum(self.done)
                return

    def advance(self, idx: int, n: int) -> None:
        with self.lock:
            self.done[idx] += n
            self._unrecorded += n
            now = time.monotonic()
            due = now - self._last_record >= RECORD_SECONDS or self._unrecorded >= RECORD_BYTES
            sync = due and now - self._last_sync >= SYNC_SECONDS
            if due:
                self._last_record, self._unrecorded = now, 0
            if sync:
                self._last_sync = now
        if sync:
            self._queue_sync()
        if due:
            self._record()

    def flush(self) -> None:
        """fdatasync, then the record: `done` then vouches for every byte written so far."""
        self._sync(blocking=True)
        self._record()

    def flush_quietly(self) -> None:
        """After a failure: keep the resume record exact for the next run, if the disk lets us."""
        try:
            self.flush()
        except OSError:
            pass

    def _queue_sync(self) -> None:
        """fdatasync on the syncer thread: a worker waiting on the disk would stall its stream (an
        fdatasync under writeback took hundreds of ms here), and records meanwhile would lag."""
        with self.lock:
            if self._sync_queued:
                return
            self._sync_queued = True
        _SYNCER.submit(self._background_sync)

    def _background_sync(self) -> None:
        try:
            if self._sync(blocking=False):
                self._record()
        except OSError:
            pass  # the next record or the final fsync meets the same disk, and says so
        finally:
            with self.lock:
                self._sync_queued = False

    def _sync(self, blocking: bool) -> bool:
        """Move `done` up to what was written before an fdatasync: a node crash (NFS, a power cut) then
        never leaves `done` ahead of the data. False when it did not run (closed, or already running)."""
        if not self._sync_lock.acquire(blocking=blocking):
            return False
        try:
            if self.closed:
                return False
            with self.lock:
                written, resets = list(self.done), self._resets
            os.fdatasync(self.fd)
            with self.lock:
                if resets == self._resets:  # else reset() threw those bytes away meanwhile
                    self.synced = written
            return True
        finally:
            self._sync_lock.release()

    def _record(self) -> None:
        """Write the resume record (no sync: an old or missing one only costs bytes fetched again)."""
        with self._record_lock:
            if self.closed:
                return  # its record was written before it closed (or it is gone: verified or discarded)
            with self.lock:
                state = json.dumps(self._state())
            tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
            tmp.write_text(state)
            os.replace(tmp, self.sidecar)
            self.flushed = True

    def reset(self) -> int:
        """Throw every byte away (bad checksum, or a server that ignores ranges); returns how many."""
        with self._hash_lock, self.lock:  # the order every holder of both takes them in
            lost = sum(self.done)
            self.done = [0] * self.count
            self.synced = [0] * self.count
            self._resets += 1
            self.digests = checksums.Digests(self.file.size, self.file.checksums)
            self._settled = False
            self.damaged = None
            if self.stash is not None:
                self.stash.clear()
            os.ftruncate(self.fd, 0)
        self.flush()
        return lost

    def problems(self) -> list[str]:
        """Why these bytes may not be promoted, if anything: digests, and a file shorter than its size."""
        found = list(self.digests.problems())
        if self.damaged:
            found.append(self.damaged)
        on_disk = os.fstat(self.fd).st_size
        if on_disk < self.file.size:
            found.append(f"partial file is {on_disk} bytes, {self.file.size} expected")
        return found

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self, keep: bool) -> None:
        if self.stash is not None:
            self.stash.clear()  # its budget goes back to the reader's other files
        with self._sync_lock, self._record_lock:  # never under a sync of this descriptor, nor a record
            if self.direct_fd is not None:
                os.close(self.direct_fd)
                self.direct_fd = None
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
        if not keep:
            self.path.unlink(missing_ok=True)
            self.sidecar.unlink(missing_ok=True)

    def set_aside(self) -> None:
        """After a failed run: record, close, and let a later run of this process take the file back."""
        if self.closed:
            return
        self.flush_quietly()
        self.close(keep=True)
        resume.set_aside(self.path)

