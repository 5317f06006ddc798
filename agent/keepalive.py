"""Keep-alive GETs on the standard library's http.client: the object stores' byte path.

Why not urllib3 here: its `readinto` reads into a fresh `bytes` and copies that into the caller's
buffer, and each request walks URL parsing and pool bookkeeping under the GIL. On a pull of 300
small objects that was a quarter of the Python time; http.client reads straight from the socket
into our buffer (measured: 0.60 -> 0.47 s of user CPU per GiB, see README "Object stores").

Proxies and CAs as the SDKs (botocore, requests) use them, so the bytes take the listing's route:
HTTPS_PROXY / HTTP_PROXY / NO_PROXY (NO_PROXY also as `host:port`); an https:// proxy is spoken to in
TLS; an https store is reached through a CONNECT tunnel, TLS end to end with the store; an http store
gets a plain `GET http://…` to the proxy (proxies refuse CONNECT to ports other than 443). The source
names the CA bundle its SDK trusts (`trust`), used for the store and an https proxy alike; an
untrusted certificate is a CertificateError (exit 3), never retried.
Each worker thread keeps its own connection per origin, so no connection is ever shared and no
lock is taken per request. A connection goes back to its thread only after its response was read
to the end; anything else (an error, a consumer that stopped early) closes it.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import weakref
from typing import Iterator
from urllib.parse import urlsplit

from urllib3.util.ssltransport import SSLTransport

from .errors import AuthError, CertificateError, InvalidInput, Retryable
from .proxies import proxy_address, proxy_auth, proxy_for, proxy_origin

# 256 KiB per recv: few enough calls that Python's cost stays small, and a buffer that stays in the
# CPU cache between the recv that fills it and the pwrite that empties it. Measured on a 2.6 GiB
# pull here: 1 MiB buffers 7.8-17 s with 4.2-6.8 s of kernel time, 256 KiB 5.9-6.6 s with 2.0-2.5 s.
READ_SIZE = 256 * 1024
DRAIN_LIMIT = 1 << 20  # an error body larger than this is not worth reading to keep the connection
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, http.client.BadStatusLine)
_CONNECTION = {"http": http.client.HTTPConnection, "https": http.client.HTTPSConnection}  # their Host defaults


class Response:
    """One response; `pieces()` streams the body, and the connection is settled when it ends."""

    def __init__(self, pool: "KeepAlivePool", key: tuple, conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse):
        self._pool, self._key, self._conn, self._resp = pool, key, conn, resp
        self.status = resp.status
        self.headers = resp.headers  # case-insensitive .get(), like urllib3's

    def pieces(self, what: str) -> Iterator[memoryview]:
        """The body in pieces of up to READ_SIZE; socket trouble becomes a Retryable reason.

        The buffer is reused between pieces: consume each one before asking for the next."""
        view = memoryview(bytearray(READ_SIZE))
        try:
            while n := self._readinto(view, what):
                yield view[:n]
        finally:
            self.release()

    def units(self, buf: memoryview, what: str) -> Iterator[int]:
        """The body read straight into `buf`, a buffer-full at a time: each `n` yielded means buf[:n]
        holds the next n bytes (n == len(buf) but for the last). No copy on the way from the socket."""
        size, fill = len(buf), 0
        try:
            while n := self._readinto(buf[fill:min(size, fill + READ_SIZE)], what):
                fill += n
                if fill == size:
                    yield fill
                    fill = 0
            if fill:
                yield fill
        finally:
            self.release()

    def _readinto(self, view: memoryview, what: str) -> int:
        try:
            return self._resp.readinto(view)
        except TimeoutError as exc:
            raise Retryable("stall", f"{what}: no byte received for the stall timeout") from exc
        except http.client.IncompleteRead as exc:
            raise Retryable("truncated", f"{what}: truncated ({type(exc).__name__})") from exc
        except (http.client.HTTPException, OSError) as exc:
            raise Retryable("connection", f"{what}: connection error ({type(exc).__name__})") from exc

    def drain(self) -> None:
        """Read a (small) unwanted body so the connection can serve the next request."""
        try:
            length = self._resp.length
            if length is not None and length <= DRAIN_LIMIT:
                self._resp.read()
        except (http.client.HTTPException, OSError):
            pass
        self.release()

    def release(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if self._resp.isclosed() and not self._resp.will_close:
            self._pool.give_back(self._key, conn)  # read to the end: reusable
        else:
            conn.close()


class KeepAlivePool:
    def __init__(self, connect_timeout: float, read_timeout: float):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None
        self._ca_bundle: str | None = None
        self._ca_hint = "SSL_CERT_FILE"
        self._opened: weakref.WeakSet = weakref.WeakSet()  # to close the idle ones at the end
        self._lock = threading.Lock()

    def trust(self, ca_bundle: str | None, hint: str) -> None:
        """Trust only `ca_bundle` (a file or a folder), as the source's SDK does when it is set; else
        the system's CAs (and SSL_CERT_FILE). `hint` names the variable that sets it, for errors."""
        self._ca_bundle, self._ca_hint, self._ssl = ca_bundle or None, hint, None

    def _idle(self) -> dict:
        idle = getattr(self._local, "idle", None)
        if idle is None:
            idle = self._local.idle = {}
        return idle

    def give_back(self, key: tuple, conn: http.client.HTTPConnection) -> None:
        self._idle()[key] = conn

    def _context(self, what: str) -> ssl.SSLContext:
        with self._lock:
            if self._ssl is None:
                bundle = self._ca_bundle
                try:
                    if bundle and os.path.isdir(bundle):
                        self._ssl = ssl.create_default_context(capath=bundle)
                    else:
                        self._ssl = ssl.create_default_context(cafile=bundle)
                except (OSError, ssl.SSLError) as exc:
                    raise InvalidInput(f"{what}: cannot load the CA bundle {bundle} ({self._ca_hint}): "
                                       f"{getattr(exc, 'strerror', None) or exc}") from None
            return self._ssl

    def _connect(self, scheme: str, host: str, port: int | None, what: str) -> http.client.HTTPConnection:
        if scheme not in _CONNECTION:
            raise ValueError(f"unsupported URL scheme {scheme!r}")
        proxy = proxy_for(scheme, host, port)
        port = port or (443 if scheme == "https" else 80)
        sock = socket.create_connection(proxy_address(proxy) if proxy else (host, port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if proxy and proxy.scheme == "https":  # so the proxy's credentials never travel in clear text
                sock = self._tls(sock, proxy.hostname or "", proxy_origin(proxy), what)
            if proxy and scheme == "https":
                _tunnel(sock, host, port, proxy, what)
            if scheme == "https":  # end to end with the store, even inside the proxy's TLS
                sock = self._tls(sock, host, f"{host}:{port}", what)
            sock.settimeout(self.read_timeout)  # from now on the timeout is the stall watchdog
        except BaseException:
            sock.close()
            raise
        conn = _CONNECTION[scheme](host, port, **({"context": self._ssl} if scheme == "https" else {}))
        conn.sock = sock
        conn.auto_open = 0  # a closed connection must fail, never reconnect by itself around the proxy
        # An http store through a proxy: each request names the whole URL and carries the credentials.
        conn.proxy_headers = proxy_auth(proxy) if proxy and scheme == "http" else None
        with self._lock:
            self._opened.add(conn)
        return conn

    def _tls(self, sock, server_hostname: str, peer: str, what: str):
        context = self._context(what)
        try:
            if isinstance(sock, ssl.SSLSocket):  # TLS inside an https proxy's TLS
                return SSLTransport(sock, context, server_hostname)
            return context.wrap_socket(sock, server_hostname=server_hostname)
        except ssl.SSLCertVerificationError as exc:
            raise CertificateError.untrusted(what, peer, exc.verify_message or str(exc), self._ca_hint,
                                             self._ca_bundle) from None

    def get(self, url: str, headers: dict[str, str], what: str) -> Response:
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname, parts.port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = self._idle().pop(key, None)
        reused = conn is not None
        while True:
            try:
                if conn is None:
                    conn = self._connect(*key, what)
                if conn.proxy_headers is None:
                    conn.request("GET", target or "/", headers=headers)
                else:
                    conn.request("GET", url, headers={**headers, **conn.proxy_headers})
                return Response(self, key, conn, conn.getresponse())
            except TimeoutError as exc:
                conn and conn.close()
                raise Retryable("stall", f"{what}: no response within the stall timeout") from exc
            except (http.client.HTTPException, OSError) as exc:
                conn and conn.close()
                if reused and isinstance(exc, _STALE):
                    conn, reused = None, False  # the server closed an idle keep-alive connection: not a failure
                    continue
                raise Retryable("connection", f"{what}: connection error ({type(exc).__name__})") from exc

    def close(self) -> None:
        with self._lock:
            opened, self._opened = list(self._opened), weakref.WeakSet()
        for conn in opened:
            conn.close()


def _tunnel(sock, host: str, port: int, proxy, what: str) -> None:
    """CONNECT host:port through the proxy on `sock` (plain or TLS), with its credentials."""
    lines = [f"CONNECT {host}:{port} HTTP/1.1", f"Host: {host}:{port}",
             *(f"{name}: {value}" for name, value in proxy_auth(proxy).items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    head = b""
    while b"\r\n\r\n" not in head:  # nothing follows the answer until we speak TLS: no over-read
        data = sock.recv(4096)
        if not data or len(head) > 65536:
            raise http.client.RemoteDisconnected("the proxy closed the connection during CONNECT")
        head += data
    status = head.split(b"\r\n", 1)[0].decode("latin-1").strip()
    code = status.split(" ", 2)[1] if status.count(" ") else ""
    if code == "407":
        raise AuthError(f"{what}: the proxy {proxy_origin(proxy)} refused its credentials (HTTP 407): "
                        "check the user and password in HTTPS_PROXY")
    if code != "200":
        raise Retryable("connection", f"{what}: the proxy {proxy_origin(proxy)} refused CONNECT {host}:{port} ({status})")
