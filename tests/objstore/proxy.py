"""A small HTTP-aware TCP proxy on 127.0.0.1, put in front of an emulator to count bytes and inject
faults into object bodies (slow, reset, stall, corrupt). It forwards requests untouched, so
SigV4 signatures (which cover the Host header) still verify at the server behind it.

Faults hit only "large" GET responses (a body of at least `min_body` bytes): the object reads,
never the listing.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass


@dataclass
class Fault:
    kind: str  # slow | reset | stall | corrupt
    count: int = 1  # responses it applies to; slow applies to all while set
    after: int = 0  # body bytes before it strikes
    rate: float = 0.0  # slow: bytes per second
    seconds: float = 0.0  # stall


class FaultProxy:
    def __init__(self, upstream_port: int, min_body: int = 256 * 1024):
        self.upstream = ("127.0.0.1", upstream_port)
        self.min_body = min_body
        self.faults: list[Fault] = []
        self.body_bytes = 0  # bytes of large GET bodies sent to clients
        self.fired = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def add(self, kind: str, **kw) -> Fault:
        fault = Fault(kind, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.body_bytes = 0
            self.fired = 0

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            methods: list[str] = []
            threading.Thread(target=self._up, args=(client, server, methods), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, methods), daemon=True).start()

    @staticmethod
    def _up(client: socket.socket, server: socket.socket, methods: list[str]) -> None:
        try:
            while data := client.recv(65536):
                word = data.split(b" ", 1)[0]
                if word in (b"GET", b"HEAD", b"PUT", b"POST", b"DELETE"):
                    methods.append(word.decode())
                server.sendall(data)
        except OSError:
            pass
        finally:
            for s in (server,):
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _take(self, kind: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.kind == kind and f.count > 0:
                    if kind != "slow":
                        f.count -= 1
                        self.fired += 1
                    return f
        return None

    def _down(self, server: socket.socket, client: socket.socket, methods: list[str]) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = server.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                head += b"\r\n\r\n"
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(b":") for line in head.split(b"\r\n")[1:] if b":" in line)}
                method = methods.pop(0) if methods else "GET"
                status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
                if method == "HEAD" or status in (b"204", b"304"):
                    client.sendall(head)
                    continue
                if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                    client.sendall(head)
                    buf = self._chunked(server, client, buf)  # listings: forwarded as they are
                    if buf is None:
                        return
                    continue
                if b"content-length" not in headers:
                    client.sendall(head + buf)
                    self._raw(server, client)  # unknown length: pass the rest through
                    return
                length = int(headers[b"content-length"])
                large = method == "GET" and length >= self.min_body
                client.sendall(head)
                buf = self._body(server, client, buf, length, large)
                if buf is None:
                    return
        except OSError:
            pass
        finally:
            for s in (client, server):
                try:
                    s.close()
                except OSError:
                    pass

    @staticmethod
    def _chunked(server, client, buf: bytes) -> bytes | None:
        def need(n_or_marker) -> bytes | None:
            nonlocal buf
            while (len(buf) < n_or_marker) if isinstance(n_or_marker, int) else (n_or_marker not in buf):
                data = server.recv(65536)
                if not data:
                    return None
                buf += data
            return buf

        while True:
            if need(b"\r\n") is None:
                return None
            line, rest = buf.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            buf = rest
            if size == 0:
                client.sendall(line + b"\r\n")
                while True:  # trailers, up to the empty line
                    if need(b"\r\n") is None:
                        return None
                    t, buf = buf.split(b"\r\n", 1)
                    client.sendall(t + b"\r\n")
                    if not t:
                        return buf
            if need(size + 2) is None:
                return None
            client.sendall(line + b"\r\n" + buf[: size + 2])
            buf = buf[size + 2:]

    def _raw(self, server: socket.socket, client: socket.socket) -> None:
        while data := server.recv(65536):
            client.sendall(data)

    def _body(self, server, client, buf: bytes, length: int, large: bool) -> bytes | None:
        """Forward `length` body bytes with any armed fault; returns what follows, None to hang up."""
        faults = {k: self._take(k) for k in ("reset", "stall", "corrupt")} if large else {}
        sent, started = 0, time.monotonic()
        while sent < length:
            if not buf:
                buf = server.recv(65536)
                if not buf:
                    return None
            piece, buf = buf[: min(len(buf), length - sent, 65536)], buf[min(len(buf), length - sent, 65536):]
            if large:
                for kind in ("reset", "stall", "corrupt"):
                    f = faults.get(kind)
                    if f is None or sent + len(piece) <= f.after:
                        continue
                    faults[kind] = None
                    if kind == "reset":
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        return None
                    if kind == "stall":
                        time.sleep(f.seconds)
                    if kind == "corrupt":
                        i = max(0, f.after - sent)
                        piece = piece[:i] + bytes([piece[i] ^ 0xFF]) + piece[i + 1:]
                slow = self._take("slow")
                if slow is not None and slow.rate:
                    ahead = (sent + len(piece)) / slow.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            client.sendall(piece)
            sent += len(piece)
            if large:
                with self._lock:
                    self.body_bytes += len(piece)
        return buf
