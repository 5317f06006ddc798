"""Bytes that landed ahead of a file's hashing frontier, kept in memory until the frontier reaches them.

A file hashed in file order (the Hub's sha256) with several of its ranges in flight gets most of
them ahead of the frontier: the range before is still on its way. Such bytes used to be read back
from the file to be hashed, which is cheap only while the page cache holds them, so those files
could not be written with O_DIRECT: a 1 GiB Xet pull spent ~1 CPU-s of its 3 in the kernel, on
page-cache copies and their writeback. Readers whose pieces are immutable and owned by nobody else
(hf_xet hands over each range as one `bytes`) let the writer keep a read-only view of a landed unit
instead, for as long as a shared byte budget allows; whatever does not fit is read back as before.
"""

from __future__ import annotations

import threading
from typing import Iterable, Iterator

from . import directio


class AheadBudget:
    """How many bytes all the stashes of one reader may hold at once. `cap` is set once the reader
    knows its memory plan (agent/memory.py counts it per stream); 0 keeps nothing."""

    def __init__(self, cap: int = 0):
        self.cap = cap
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.held + n > self.cap:
                return False
            self.held += n
            self.peak = max(self.peak, self.held)
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.held -= n


class AheadStash:
    """One file's kept units, by offset. A unit is kept only when its bytes can never be written again
    in this run: it ends on the O_DIRECT grain or at the end of the file (a range cut short off the
    grain is rewound and its tail fetched again, see PartialFile.rewind_to_alignment). A kept unit is
    a view into the reader's piece, which stays in memory whole while any of its units is kept: the
    budget is charged the piece's size once, with its first unit, and given back with its last."""

    def __init__(self, budget: AheadBudget, size: int):
        self.budget = budget
        self.size = size
        self._units: dict[int, memoryview] = {}
        self._pieces: dict[int, list] = {}  # id(piece) -> [piece, units kept of it]
        self._lock = threading.Lock()

    def keep(self, pos: int, view: memoryview, frontier: int) -> None:
        n = len(view)
        if not view.readonly or pos < frontier or ((pos + n) % directio.ALIGN and pos + n != self.size):
            return
        piece = view.obj
        with self._lock:
            if pos in self._units:
                return
            held = self._pieces.get(id(piece))
            if held is None:
                if not self.budget.take(len(memoryview(piece))):
                    return  # left to be read back
                held = self._pieces[id(piece)] = [piece, 0]
            held[1] += 1
            self._units[pos] = view

    def _release(self, view: memoryview) -> None:
        """Under the lock: one unit fewer of its piece; the piece's budget back with its last unit."""
        held = self._pieces[id(view.obj)]
        held[1] -= 1
        if not held[1]:
            del self._pieces[id(view.obj)]
            self.budget.give(len(memoryview(held[0])))

    def take(self, pos: int) -> memoryview | None:
        """The unit that starts at `pos`, handed over."""
        with self._lock:
            view = self._units.pop(pos, None)
            if view is not None:
                self._release(view)
        return view

    def next_after(self, pos: int) -> int | None:
        """The first kept offset above `pos`: where a read-back may stop."""
        with self._lock:
            later = [p for p in self._units if p > pos]
        return min(later) if later else None

    def drop_below(self, frontier: int) -> None:
        """Forget units the frontier passed (hashed from disk by another thread before they were kept)."""
        with self._lock:
            for p in [p for p in self._units if p < frontier]:
                self._release(self._units.pop(p))

    def clear(self) -> None:
        self.drop_below(self.size + 1)


def units_of(pieces: Iterable[bytes | memoryview], buf: memoryview) -> Iterator[tuple[int, memoryview | None]]:
    """Regroup pieces into buffer-fulls of `buf` (each `n` yielded: buf[:n] holds the next n bytes, to
    be used before the next), with a view of the piece that holds that buffer-full whole (None for
    one that straddles two pieces). sources.base.fill_units is this without the views."""
    size, fill = len(buf), 0
    view = origin = memoryview(b"")
    origin_off = 0
    for piece in pieces:
        view, off = memoryview(piece), 0
        while off < len(view):
            if fill == 0:
                origin, origin_off = view, off  # where this buffer-full begins
            take = min(len(view) - off, size - fill)
            buf[fill:fill + take] = view[off:off + take]
            fill, off = fill + take, off + take
            if fill == size:
                yield fill, (origin[origin_off:off] if origin is view else None)
                fill = 0
    if fill:
        yield fill, (origin[origin_off:origin_off + fill] if origin is view else None)
