"""The byte paths' HTTP clients against a raw HTTP/1.1 server on 127.0.0.1 whose connection
handling each test chooses: the object stores' keep-alive client (agent/keepalive.py), and for
proxies also the Hub engine's urllib3 pools (agent/httpio.py)."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

from agent.errors import CertificateError, Retryable
from agent.keepalive import KeepAlivePool
from objstore.tls import self_signed

pytestmark = pytest.mark.timeout(30)
BODY = bytes(range(256)) * 12_288  # 3 MiB: more than one read


class Listener:
    """A TCP server on 127.0.0.1: each accepted connection is handed to `_serve` in its own thread."""

    def __init__(self):
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class RawServer(Listener):
    """Answers every GET with BODY. `mode`: keepalive | close_after_each | stall_body."""

    def __init__(self, mode: str, tls=None):
        self.mode, self.tls = mode, tls  # tls: an ssl.SSLContext to serve HTTPS with
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            f = conn.makefile("rb")
            while True:
                line = f.readline()
                if not line:
                    return
                while f.readline() not in (b"\r\n", b""):
                    pass
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\nETag: \"e\"\r\n\r\n".encode()
                if self.mode == "stall_body":
                    conn.sendall(head + BODY[:1000])
                    threading.Event().wait(5)
                    return
                conn.sendall(head + BODY)
                if self.mode == "close_after_each":
                    return  # no `Connection: close`: the client only learns it on its next request
        except OSError:
            return
        finally:
            conn.close()


@contextlib.contextmanager
def served(mode: str, read_timeout: float = 5.0):
    srv, pool = RawServer(mode), KeepAlivePool(5, read_timeout)
    try:
        yield srv, pool, f"http://127.0.0.1:{srv.port}"
    finally:
        pool.close()
        srv.close()


def fetch(pool: KeepAlivePool, url: str) -> bytes:
    resp = pool.get(url, {"User-Agent": "test"}, "test")
    assert resp.status == 200 and resp.headers.get("etag") == '"e"'
    return b"".join(bytes(p) for p in resp.pieces("test"))


def test_a_thread_reuses_its_connection_after_reading_a_body_to_the_end():
    with served("keepalive") as (srv, pool, base):
        for _ in range(3):
            assert fetch(pool, f"{base}/obj?x=1") == BODY
        assert srv.connections == 1


def test_units_fill_the_callers_buffer_and_keep_the_connection():
    """The O_DIRECT path reads straight into its aligned buffer, a buffer-full at a time."""
    import mmap

    with served("keepalive") as (srv, pool, base):
        buf = memoryview(mmap.mmap(-1, 1 << 20))
        got, sizes = bytearray(), []
        for n in pool.get(f"{base}/a", {}, "test").units(buf, "test"):
            sizes.append(n)
            got += buf[:n]
        assert bytes(got) == BODY and sizes == [1 << 20] * 3
        assert fetch(pool, f"{base}/b") == BODY and srv.connections == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_without_an_error():
    with served("close_after_each") as (srv, pool, base):
        for _ in range(3):
            assert fetch(pool, f"{base}/obj") == BODY
        assert srv.connections == 3


def test_a_body_left_half_read_closes_its_connection_instead_of_desyncing_the_next_request():
    with served("keepalive") as (srv, pool, base):
        pieces = pool.get(f"{base}/a", {}, "test").pieces("test")
        assert len(next(pieces)) > 0
        pieces.close()  # the consumer stopped early (another file failed, a SIGTERM...)
        assert fetch(pool, f"{base}/b") == BODY  # a fresh connection, a whole body
        assert srv.connections == 2


def test_a_body_that_stops_arriving_is_a_stall():
    with served("stall_body", read_timeout=0.5) as (srv, pool, base):
        resp = pool.get(f"{base}/a", {}, "obj")
        with pytest.raises(Retryable) as err:
            for _ in resp.pieces("obj"):
                pass
        assert err.value.reason == "stall"


def test_https_verifies_the_server_and_reuses_the_connection(tmp_path, monkeypatch):
    """Real stores are HTTPS: the certificate is checked against the system's CAs (SSL_CERT_FILE
    here, as a private CA bundle would be mounted), and a TLS connection is kept alive too."""
    import ssl

    cert, key = self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    srv = RawServer("keepalive", tls)
    url = f"https://127.0.0.1:{srv.port}/obj"
    try:
        untrusted = KeepAlivePool(5, 5)
        with pytest.raises(CertificateError):  # an unknown CA is refused, never read from, never retried
            untrusted.get(url, {}, "obj")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        pool = KeepAlivePool(5, 5)
        for _ in range(2):
            assert fetch(pool, url) == BODY
        assert srv.connections == 2  # one refused handshake, then one connection for both GETs
        pool.close()
    finally:
        srv.close()


class ConnectProxy(Listener):
    """An HTTP CONNECT proxy, as in clusters whose egress goes through one; records each tunnel."""

    def __init__(self):
        self.tunnels: list[tuple[str, str]] = []  # (target, Proxy-Authorization)
        super().__init__()

    def _serve(self, client: socket.socket) -> None:
        self._tunnel(client)

    def _tunnel(self, client: socket.socket) -> None:
        f = client.makefile("rb")
        method, target, _ = f.readline().decode().split(" ", 2)
        auth = ""
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "proxy-authorization":
                auth = value.strip()
        self.tunnels.append((target, auth))
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                b.close()

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)


@contextlib.contextmanager
def tls_server_behind_proxy(tmp_path, monkeypatch, proxy_url: str = "http://127.0.0.1:{port}"):
    """A TLS RawServer trusted through SSL_CERT_FILE, a ConnectProxy, and HTTPS_PROXY naming it."""
    import ssl

    cert, key = self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    srv, proxy = RawServer("keepalive", tls), ConnectProxy()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy_url.format(port=proxy.port))
    try:
        yield srv, proxy, f"https://127.0.0.1:{srv.port}"
    finally:
        proxy.close()
        srv.close()


def test_https_proxy_tunnels_to_the_store_and_no_proxy_bypasses_it(tmp_path, monkeypatch):
    import base64

    with tls_server_behind_proxy(tmp_path, monkeypatch, "http://agent:s%40cret@127.0.0.1:{port}") as (srv, proxy, base):
        pool = KeepAlivePool(5, 5)
        assert fetch(pool, f"{base}/obj") == BODY and fetch(pool, f"{base}/obj") == BODY
        # One tunnel for both GETs; TLS (and the certificate check) end to end with the store.
        want = "Basic " + base64.b64encode(b"agent:s@cret").decode()
        assert proxy.tunnels == [(f"127.0.0.1:{srv.port}", want)]
        pool.close()

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        direct = KeepAlivePool(5, 5)
        assert fetch(direct, f"{base}/obj") == BODY
        assert len(proxy.tunnels) == 1  # bypassed
        direct.close()


def test_the_hub_byte_path_takes_the_same_proxy(tmp_path, monkeypatch):
    """httpio.Pools (the Hub engine's GETs) routes by the same rules: tunnelled through
    HTTPS_PROXY, direct for a NO_PROXY host."""
    from agent import httpio

    with tls_server_behind_proxy(tmp_path, monkeypatch) as (srv, proxy, base):
        pools = httpio.Pools(4, 5)
        resp = httpio.request(pools, "GET", f"{base}/blob", {}, "blob")
        assert resp.status == 200 and b"".join(bytes(p) for p in httpio.stream_body(resp, "blob")) == BODY
        assert [t for t, _ in proxy.tunnels] == [f"127.0.0.1:{srv.port}"]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert pools.for_url(f"{base}/blob") is pools.direct
        pools.clear()
