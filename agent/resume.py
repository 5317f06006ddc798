"""Resuming what an earlier writer left: which partial file to continue, and how to take its bytes
without taking its file.

A partial's writer may be dead, or only paused (SIGSTOP, a VM pause, an NFS partition) with the
file still open: renaming its file into our name would let a write it had begun land in our file,
and once we promote it, in a blob. So another writer's landed ranges are copied into a file of our
own, in the kernel (copy_file_range: a reflink on xfs and btrfs, a server-side copy on NFS 4.2),
and its file is unlinked: whatever it writes when it wakes lands in an unlinked inode. Only a
partial this same process set aside (no thread of ours writes it any more) is taken by rename.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import DiskFull

COPY_PIECE = 64 * 2**20
_FALLBACK = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)

_set_aside: set[Path] = set()
_set_aside_lock = threading.Lock()


def set_aside(path: Path) -> None:
    """`path` is a partial this process closed after a failure: a later run here may take it back."""
    with _set_aside_lock:
        _set_aside.add(path)


def _claim_own(path: Path) -> bool:
    with _set_aside_lock:
        ours = path in _set_aside
        _set_aside.discard(path)
        return ours


def _boot_id() -> str:
    """This kernel's boot: the same in every container of a node, new after a node crash or reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""  # no /proc: only fdatasynced bytes are trusted


BOOT_ID = _boot_id()


def trusted(state: dict) -> list[int]:
    """The landed bytes a record vouches for: every written byte if it was made on this boot (a killed
    writer's pwrites sit in the page cache), else only the fdatasynced ones (partial.py)."""
    if BOOT_ID and state.get("boot") == BOOT_ID and "written" in state:
        return [int(d) for d in state["written"]]
    return [int(d) for d in state["done"]]


@dataclass(frozen=True)
class Grid:
    """How one file is cut into ranges."""

    chunk: int
    size: int

    @property
    def count(self) -> int:
        return max(1, -(-self.size // self.chunk))

    def bounds(self, idx: int) -> tuple[int, int]:
        start = idx * self.chunk
        return start, min(start + self.chunk, self.size)


def regrid(grid: Grid, old_chunk: int, old_done: list[int]) -> list[int]:
    """Map a record made with another range size (another engine, another --chunk-size) onto
    `grid`: each range keeps the landed bytes that run contiguously from its start."""
    landed = [(i * old_chunk, i * old_chunk + max(0, d)) for i, d in enumerate(old_done) if d > 0]
    done = []
    for i in range(grid.count):
        start, end = grid.bounds(i)
        pos = start
        moved = True
        while moved and pos < end:
            moved = False
            for lo, hi in landed:
                if lo <= pos < hi:
                    pos, moved = min(hi, end), True
        done.append(pos - start)
    return done


def clamp(grid: Grid, done: list[int], on_disk: int) -> list[int]:
    """A record never vouches for bytes past the end of the file: a node crash lost them."""
    return [max(0, min(d, on_disk - grid.bounds(i)[0])) for i, d in enumerate(done)]


def ranked(candidates: list[Path], etag: str, grid: Grid) -> list[tuple[list[int], Path]]:
    """The candidates whose record is for this content, as landed bytes on `grid`, most first."""
    found = []
    for candidate in candidates:
        try:
            state = json.loads(candidate.with_name(candidate.name + ".json").read_text())
        except (OSError, ValueError):
            continue
        if (state.get("etag"), state.get("size")) != (etag, grid.size):
            continue
        try:
            done = regrid(grid, int(state["chunk"]), trusted(state))
        except (KeyError, TypeError, ValueError):
            continue
        found.append((done, candidate))
    return sorted(found, key=lambda item: -sum(item[0]))


def resume_into(candidate: Path, dest: Path, done: list[int], grid: Grid) -> tuple[int, list[int]] | None:
    """Continue `candidate` as `dest`: returns dest's open descriptor and the bytes of each range that
    it holds, or None if the candidate is gone (another writer resumed it first)."""
    if _claim_own(candidate):
        try:
            os.rename(candidate, dest)
        except OSError:
            return None
        fd = os.open(dest, os.O_RDWR)
        landed = clamp(grid, done, os.fstat(fd).st_size)
    else:
        taken = _copy_landed(candidate, dest, done, grid)
        if taken is None:
            return None
        fd, landed = taken
    candidate.with_name(candidate.name + ".json").unlink(missing_ok=True)
    return fd, landed


def _copy_landed(candidate: Path, dest: Path, done: list[int], grid: Grid) -> tuple[int, list[int]] | None:
    try:
        src = os.open(candidate, os.O_RDONLY)
    except OSError:
        return None
    fd = -1
    try:
        fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # & ~umask, as partial.py
        landed = [copy_range(src, fd, grid.bounds(idx)[0], want)
                  for idx, want in enumerate(clamp(grid, done, os.fstat(src).st_size))]
    except BaseException:  # a full disk, say: leave nothing half-made behind
        if fd >= 0:
            os.close(fd)
        dest.unlink(missing_ok=True)
        raise
    finally:
        os.close(src)
    candidate.unlink(missing_ok=True)  # its writer, if alive, goes on writing to an unlinked file
    return fd, landed


def copy_range(src: int, dst: int, pos: int, count: int) -> int:
    """Copy [pos, pos + count) between two files at the same offsets, in the kernel; returns the bytes
    copied (fewer if the source ends early)."""
    done = 0
    try:
        while done < count:
            n = copy_some(src, dst, pos + done, min(count - done, COPY_PIECE))
            if n == 0:
                break
            done += n
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left while resuming a partial file at offset {pos + done}") from None
        raise
    return done


def copy_some(src: int, dst: int, pos: int, count: int) -> int:
    """Copy up to `count` bytes at `pos` from one fd to the other in the kernel; how many were copied."""
    try:
        return os.copy_file_range(src, dst, count, pos, pos)
    except OSError as exc:
        if exc.errno not in _FALLBACK:
            raise
    # Two file systems or an old kernel: sendfile still copies in the kernel, at dst's file position.
    os.lseek(dst, pos, os.SEEK_SET)
    return os.sendfile(dst, src, pos, count)


def leftover_partials(folders: set[Path]) -> dict[tuple[Path, str], list[Path]]:
    """Partial files earlier writers left, by (folder, content key): one listing per folder, not per file."""
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
