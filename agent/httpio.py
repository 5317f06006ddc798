"""Ranged HTTP GETs over one shared urllib3 pool, with every status given a meaning.

Resume follows pip's rules: ask with `Range` plus `If-Range: <etag>`; a 200 to a ranged request
means the server ignored the range (or the entity changed): the reader raises `RangesIgnored` and
the transfer takes that file as one stream from byte 0; a 206 whose `Content-Range` does not start
where we asked is an error, never silently appended.

A connection goes back to the pool only after its body was read to the end: one with body bytes
still on the way (a consumer that stopped early, an error) is closed, or the next request on it
would read those bytes as its status line.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Iterator
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from .errors import AuthError, CertificateError, IntegrityError, NotFound, Retryable, TransientError, untrusted_reason
from .proxies import proxy_auth, proxy_for, proxy_origin

READ_SIZE = 1 << 20  # one recv per MiB keeps Python overhead far below the network's cost


class UrlExpired(Retryable):
    """A presigned URL was refused (403 from the CDN): re-resolve it, then try again."""

    def __init__(self, message: str):
        super().__init__("url_expired", message)


class Pools:
    """One urllib3 pool manager per route: direct, or through the proxy the environment names for a
    URL's host (HTTPS_PROXY / HTTP_PROXY / NO_PROXY; an https target is tunnelled with CONNECT)."""

    def __init__(self, workers: int, stall_timeout: float):
        # The read timeout is the stall watchdog: no byte for `stall_timeout` raises ReadTimeoutError.
        self._options = dict(num_pools=16, maxsize=max(workers, 4), block=False, retries=False,
                             timeout=urllib3.Timeout(connect=min(30.0, stall_timeout), read=stall_timeout))
        self.direct = urllib3.PoolManager(**self._options)
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self._lock = threading.Lock()

    def for_url(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        proxy = proxy_for(parts.scheme, parts.hostname or "", parts.port)
        if proxy is None:
            return self.direct
        with self._lock:
            key = proxy.geturl()
            if key not in self._proxied:
                self._proxied[key] = urllib3.ProxyManager(proxy_origin(proxy), proxy_headers=proxy_auth(proxy), **self._options)
            return self._proxied[key]

    def clear(self) -> None:
        self.direct.clear()
        for manager in self._proxied.values():
            manager.clear()


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) as browsers and huggingface_hub compare them: `https://hf.co` and
    `https://hf.co:443` are one origin, and user info is no part of it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


# The IETF draft's `RateLimit: "api";r=0;t=55`, parsed as huggingface_hub 2.4 parses it.
_RATELIMIT = re.compile(r"\"(?P<resource>\w+)\"\s*;\s*r\s*=\s*(?P<r>\d+)\s*;\s*t\s*=\s*(?P<t>\d+)")


def ratelimit_reset(headers) -> float | None:
    """Seconds until an exhausted quota window ends (`RateLimit` with r=0), plus 1 s as huggingface_hub
    adds (t is rounded down); None when the header is absent, unparsable or requests remain."""
    m = _RATELIMIT.search(headers.get("RateLimit") or "")
    if m is None or int(m.group("r")) != 0:
        return None
    return float(m.group("t")) + 1


def retry_after(headers, status: int = 0) -> float | None:
    """The wait the server asked for. On a 429 the Hub's `RateLimit` comes first, as in
    huggingface_hub (the Hub sends it without `Retry-After`); then `Retry-After` in seconds."""
    if status == 429 and (reset := ratelimit_reset(headers)) is not None:
        return reset
    value = headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def classify_status(status: int, headers, what: str) -> Exception:
    """The error a non-success status means. Retryable ones are returned, not raised."""
    if status in (401, 403):
        if headers.get("X-Error-Code") == "GatedRepo":
            return AuthError(f"{what}: gated repo: accept its terms on the Hub and pass a token that has access")
        return AuthError(f"{what}: access refused (HTTP {status})")
    if status == 407:  # from the egress proxy (an http store is reached with plain proxied GETs)
        return AuthError(f"{what}: the proxy refused its credentials (HTTP 407): check the user and password "
                         "in HTTP_PROXY / HTTPS_PROXY")
    if status == 404:
        return NotFound(f"{what}: not found (HTTP 404)")
    if status in (408, 425, 429) or 500 <= status <= 599:
        return Retryable(f"http_{status}", f"{what}: HTTP {status}", retry_after(headers, status))
    return TransientError(f"{what}: unexpected HTTP {status}")


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def check_content_range(headers, start: int, end: int, size: int, what: str) -> None:
    m = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", "").strip())
    if not m:
        raise Retryable("bad_range", f"{what}: 206 without a valid Content-Range")
    got_start, got_end, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if total != "*" and int(total) != size:
        raise IntegrityError(f"{what}: remote size is {total} bytes, the listing said {size}")
    if got_start != start or got_end != end - 1:
        raise Retryable("bad_range", f"{what}: asked for bytes {start}-{end - 1}, got {got_start}-{got_end}")


def stream_body(resp: urllib3.BaseHTTPResponse, what: str) -> Iterator[memoryview]:
    """Yield the body in large pieces; map socket trouble to Retryable reasons."""
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    try:
        while True:
            n = resp.readinto(buf)
            if not n:
                return
            yield view[:n]
    except ReadTimeoutError as exc:
        raise Retryable("stall", f"{what}: no byte received for the stall timeout") from exc
    except ProtocolError as exc:
        reason = "truncated" if "IncompleteRead" in repr(exc) or "incomplete" in str(exc).lower() else "connection"
        raise Retryable(reason, f"{what}: {reason} ({type(exc.__cause__ or exc).__name__})") from exc
    except (Urllib3Error, OSError) as exc:
        raise Retryable("connection", f"{what}: connection error ({type(exc).__name__})") from exc
    finally:
        settle(resp)


def settle(resp: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back to the pool if its body was read to the end, else close it."""
    if not resp.isclosed():
        resp.close()  # the pool opens a fresh connection in its place
    resp.release_conn()


def request(pools: Pools, method: str, url: str, headers: dict, what: str) -> urllib3.BaseHTTPResponse:
    try:
        return pools.for_url(url).request(method, url, headers=headers, preload_content=False, redirect=False,
                                          decode_content=False)
    except ReadTimeoutError as exc:
        raise Retryable("stall", f"{what}: no response within the stall timeout") from exc
    except (Urllib3Error, OSError) as exc:
        reason = untrusted_reason(exc)
        if reason:  # a retry never cures it: exit 3 at once, as on the object stores' byte path
            raise CertificateError.untrusted(what, urlsplit(url).netloc, reason, "SSL_CERT_FILE",
                                             os.environ.get("SSL_CERT_FILE")) from None
        raise Retryable("connection", f"{what}: connection error ({type(exc).__name__})") from exc


def drain(resp: urllib3.BaseHTTPResponse) -> None:
    """Read a small unwanted body (a redirect's, an error's) so its connection can be reused."""
    try:
        resp.drain_conn()
    except Exception:  # noqa: BLE001 - a broken connection is simply not reused
        pass
    settle(resp)
