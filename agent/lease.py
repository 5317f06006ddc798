"""The per-model writer lease: safe where flock is not (NFS, Lustre, GPFS).

A lease is a small JSON file created with O_EXCL (atomic on NFSv3+ and every local filesystem)
holding its owner and a heartbeat counter. The holder rewrites it every `ttl/4` seconds. A waiter
never compares clocks across hosts: it watches the file's content, and when that has not changed
for `ttl` seconds of the waiter's own monotonic clock, the holder is presumed dead and the lease
is taken over. Takeover re-checks the content just before replacing it and confirms ownership
after a short pause; the tiny window that remains is harmless because every writer only ever
writes its own temp files and promotes verified, content-addressed results.
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

from .layout import atomic_write


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
    def __init__(self, path: Path, *, ttl: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.ttl = ttl
        self.clock = clock
        self.token = uuid.uuid4().hex
        self._beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

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
        return True

    def take_over(self, stale: LeaseInfo, confirm_delay: float = 0.2) -> bool:
        """Replace a lease whose content stopped changing; True if it is ours afterwards."""
        current = _read(self.path)
        if current is None:
            return self.try_create()
        if current.raw != stale.raw:
            return False  # it moved: the holder is alive after all, or someone else took it
        atomic_write(self.path, self._content())
        time.sleep(confirm_delay)
        return self.owned()

    def owned(self) -> bool:
        info = _read(self.path)
        return info is not None and info.owner.get("id") == self.token

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            if not self.owned():
                self.lost = True  # keep going: our temp files keep us safe, but say so in the summary
                return
            atomic_write(self.path, self._content())

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.owned():
            self.path.unlink(missing_ok=True)


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
