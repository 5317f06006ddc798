"""What the server saw and sent, for tests to assert on (resume efficiency, header hygiene)."""

from __future__ import annotations

import fnmatch
import threading
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, NamedTuple


class RequestRecord(NamedTuple):
    host: str  # "api" (API + resolve) or "cdn"
    method: str
    path: str  # request target as sent, query string included
    headers: dict[str, str]  # lower-cased names


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self._bytes: dict[str, int] = defaultdict(int)
        self._bodies = 0
        self.peak_bodies = 0  # most file bodies being sent at the same time: a client's real concurrency
        self._handling: dict[str, int] = defaultdict(int)
        self.peak_handling: dict[str, int] = defaultdict(int)  # most requests of a kind in the server at once

    def record_request(self, host: str, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self._requests.append(RequestRecord(host, method, path, headers))

    def add_bytes(self, repo_path: str, n: int) -> None:
        with self._lock:
            self._bytes[repo_path] += n

    @contextmanager
    def sending_body(self) -> Iterator[None]:
        with self._lock:
            self._bodies += 1
            self.peak_bodies = max(self.peak_bodies, self._bodies)
        try:
            yield
        finally:
            with self._lock:
                self._bodies -= 1

    @contextmanager
    def handling(self, kind: str) -> Iterator[None]:
        """Counts a request of `kind` from its arrival to its answer, latency faults included."""
        with self._lock:
            self._handling[kind] += 1
            self.peak_handling[kind] = max(self.peak_handling[kind], self._handling[kind])
        try:
            yield
        finally:
            with self._lock:
                self._handling[kind] -= 1

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def bytes_sent(self, path_glob: str = "*") -> int:
        """File body bytes written to sockets (resolve + CDN) for repo paths matching the glob."""
        with self._lock:
            return sum(n for p, n in self._bytes.items() if fnmatch.fnmatchcase(p, path_glob))

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._bytes.clear()
            self.peak_bodies = self._bodies
            self.peak_handling = defaultdict(int, self._handling)
