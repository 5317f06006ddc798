"""Plain ranged HTTP from the Hub (and any mirror behind HF_ENDPOINT).

The resolve URL is asked once per file without following redirects; LFS files answer with a
redirect to a CDN or bucket, and that location is cached so that every further range goes there
directly. The token goes to the Hub endpoint's origin only: never to a redirect target.
"""

from __future__ import annotations

import threading
from typing import Iterator
from urllib.parse import urljoin

from .. import httpio
from ..errors import Retryable
from ..sources.base import RangeGate, RangeReader, RangesIgnored, RemoteFile

MAX_REDIRECTS = 5


class HubHttpReader(RangeReader):
    name = "http"

    def __init__(self, source, commit: str):
        self.source = source
        self.commit = commit
        self.settings = source.settings
        self.pool = httpio.Pools(self.settings.workers, self.settings.stall_timeout)
        self._hub_origin = httpio.origin(self.settings.hf_endpoint)
        self._locations: dict[str, str] = {}
        self._validators: dict[str, str] = {}
        self._lock = threading.Lock()
        self.gate = RangeGate()

    def headers_for(self, url: str) -> dict[str, str]:
        headers = {"User-Agent": "model-agent", "Accept-Encoding": "identity"}
        if self.settings.token and httpio.origin(url) == self._hub_origin:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        return headers

    def what(self, file: RemoteFile) -> str:
        return f"{self.source.ref.display()}@{self.commit[:12]} {file.path}"

    def location(self, file: RemoteFile) -> str:
        with self._lock:
            return self._locations.get(file.path) or self.source.file_url(self.commit, file.path)

    def forget_location(self, file: RemoteFile) -> None:
        with self._lock:
            self._locations.pop(file.path, None)

    def open(self, file: RemoteFile, extra: dict[str, str]):
        """GET with redirects followed by hand (so auth never crosses origins); returns the response."""
        url = self.location(file)
        what = self.what(file)
        for _ in range(MAX_REDIRECTS):
            resp = httpio.request(self.pool, "GET", url, {**self.headers_for(url), **extra}, what)
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                httpio.drain(resp)
                url = urljoin(url, resp.headers["Location"])
                with self._lock:
                    self._locations[file.path] = url
                continue
            return resp, url
        raise Retryable("redirects", f"{what}: more than {MAX_REDIRECTS} redirects")

    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[memoryview]:
        what = self.what(file)
        whole = (start == 0 and end == file.size) or file.size == 0
        extra: dict[str, str] = {}
        if not whole:
            extra["Range"] = f"bytes={start}-{end - 1}"
            validator = self._validators.get(file.path)
            if validator:
                # The validator of the URL that served the earlier bytes (a CDN's ETag is its own,
                # not the file's sha256): if the entity changed, the server sends 200 instead.
                extra["If-Range"] = validator
        probe, honoured = not whole and self.gate.enter(file.path), None
        try:
            resp, url = self.open(file, extra)
            honoured = {206: True, 200: False}.get(resp.status)
        finally:
            if probe:
                self.gate.leave(file.path, honoured)
        if resp.status in (200, 206) and resp.headers.get("ETag"):
            self._validators.setdefault(file.path, resp.headers["ETag"])
        if resp.status == 206 and not whole:
            httpio.check_content_range(resp.headers, start, end, file.size, what)
            yield from httpio.stream_body(resp, what)
        elif resp.status == 200 and not whole:
            # The server ignored the range, or the entity changed: the body starts at byte 0. The
            # transfer takes the file as one stream, starting with this body.
            self.gate.leave(file.path, False)  # its other ranges: no more requests
            raise RangesIgnored(file.path, httpio.stream_body(resp, what), lambda: httpio.settle(resp))
        elif resp.status == 200:
            yield from httpio.stream_body(resp, what)
        elif resp.status == 403 and httpio.origin(url) != self._hub_origin:
            httpio.drain(resp)
            self.forget_location(file)  # a presigned URL expired: ask the Hub for a fresh one
            raise httpio.UrlExpired(f"{what}: redirect target refused the request (HTTP 403)")
        else:
            httpio.drain(resp)
            raise httpio.classify_status(resp.status, resp.headers, what)

    def close(self) -> None:
        self.pool.clear()
