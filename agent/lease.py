"""The per-model writer lease: safe where flock is not (NFS, Lustre, GPFS).

A lease is a small JSON file created with O_EXCL (atomic on NFSv3+ and every local filesystem)
holding its owner and a heartbeat counter. The holder rewrites it every `ttl/4` seconds. A waiter
never compares clocks across hosts: it watches the file's content, and when that has not changed
for `ttl` seconds of the waiter's own monotonic clock, the holder is presumed dead and the lease
is taken over. Takeover re-checks the content just before replacing it and confirms ownership
after a short pause.

A holder fences itself: it counts the lease as its own only until `ttl * FENCE_FRACTION` after its
last confirmed renewal, by its own clock, and the transfer asks `check()` before every write. A
writer paused past that (SIGSTOP, a VM pause, an NFS partition) finds, when it wakes, that it may no
longer write, before a waiter could have taken over. The heartbeat survives transient errors (EIO,
ESTALE, a refused write): it keeps trying, and the fence decides when the lease counts as lost.
What remains, a write already past its check when the writer froze, cannot reach a blob: a new
holder copies a dead writer's partial instead of taking the file the old one may still hold open
(agent/partial.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import TransientError
from .layout import atomic_write

# Stop writing this far into the TTL without a confirmed renewal: a waiter takes over only after a
# full TTL without change on its own clock, so the holder stops first, with room for clock drift.
FENCE_FRACTION = 0.75


def _now() -> float:
    """Seconds on a clock that keeps running while the machine is suspended (a paused VM's
    CLOCK_MONOTONIC stops; a waiter's does not)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


class LeaseLost(TransientError):
    """This writer's lease was taken over or could not be renewed in time: it must stop writing."""


@dataclass
class LeaseInfo:
    raw: bytes
    owner: dict


def _read(path: Path) -> LeaseInfo | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(raw)
    except ValueError:
        owner = {}  # being written right now, or garbage: either way its content will be watched
    return LeaseInfo(raw, owner if isinstance(owner, dict) else {})


class Lease:
    def __init__(self, path: Path, *, ttl: float = 60.0, clock: Callable[[], float] = _now,
                 on_error: Callable[[str], None] | None = None):
        self.path = path
        self.ttl = ttl
        self.clock = clock
        self.token = uuid.uuid4().hex
        self._beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why this holder may no longer write, once it may not
        self.renewed_at = clock()
        self._renew_lock = threading.Lock()
        self.on_error = on_error or (lambda message: None)

    def _content(self) -> bytes:
        self._beat += 1
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "id": self.token,
            "heartbeat": self._beat,
            "ttl_seconds": self.ttl,
        }
        return json.dumps(owner).encode()

    def try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._content())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.renewed_at = self.clock()
        return True

    def take_over(self, stale: LeaseInfo, confirm_delay: float = 0.2) -> bool:
        """Replace a lease whose content stopped changing; True if it is ours afterwards."""
        current = _read(self.path)
        if current is None:
            return self.try_create()
        if current.raw != stale.raw:
            return False  # it moved: the holder is alive after all, or someone else took it
        atomic_write(self.path, self._content())
        self.renewed_at = self.clock()
        time.sleep(confirm_delay)
        return self.owned()

    def owned(self) -> bool:
        info = _read(self.path)
        return info is not None and info.owner.get("id") == self.token

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        failing = False
        while not self._stop.wait(self.ttl / 4) and self.lost is None:
            try:
                self._renew()
                failing = False
            except OSError as exc:  # EIO, ESTALE, a full or read-only volume: try again next beat
                if not failing:
                    self.on_error(f"cannot renew the writer lease {self.path}: {type(exc).__name__} "
                                  f"[errno {exc.errno}]; retrying")
                failing = True
                self._give_up_if_overdue(f"{type(exc).__name__} [errno {exc.errno}]")

    def _renew(self, only_if_overdue: bool = False) -> None:
        with self._renew_lock:
            if self.lost is not None or (only_if_overdue and not self._overdue()):
                return  # lost already, or another thread renewed while this one waited
            if not self.owned():
                self.lost = "another writer took the lease over"
                return
            atomic_write(self.path, self._content())
            self.renewed_at = self.clock()

    def _overdue(self) -> bool:
        return self.clock() - self.renewed_at > self.ttl * FENCE_FRACTION

    def _give_up_if_overdue(self, why: str) -> None:
        if self.lost is None and self._overdue():
            self.lost = f"could not renew it for {self.clock() - self.renewed_at:.1f}s ({why})"

    def check(self) -> None:
        """Raise LeaseLost unless this holder may still write. Cheap: called before every write.

        Overdue (the process was paused, or starved of the GIL): renew at once if the lease is still
        ours; if another writer holds it now, or it cannot be written, the lease is lost."""
        if self.lost is None and self._overdue():
            try:
                self._renew(only_if_overdue=True)
            except OSError as exc:
                self._give_up_if_overdue(f"{type(exc).__name__} [errno {exc.errno}]")
        if self.lost is not None:
            raise LeaseLost(f"lost the writer lease {self.path.parent.name}: {self.lost}")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            if self.owned():
                self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a waiter takes an unreleased lease over after its TTL


class LeaseWatch:
    """A waiter's view of someone else's lease: is its content still changing?"""

    def __init__(self, path: Path, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.path, self.ttl, self.clock = path, ttl, clock
        self._seen: LeaseInfo | None = None
        self._since = clock()

    def poll(self) -> tuple[str, LeaseInfo | None]:
        """('free', None) | ('held', info) | ('stale', info)."""
        info = _read(self.path)
        if info is None:
            return "free", None
        if self._seen is None or info.raw != self._seen.raw:
            self._seen, self._since = info, self.clock()
            return "held", info
        ttl = float(info.owner.get("ttl_seconds") or self.ttl)
        if self.clock() - self._since > ttl:
            return "stale", info
        return "held", info
