"""Writing file bodies to a socket: fast by default, broken on purpose when a fault says so.

The fast path is `os.sendfile` straight from the page cache (a benchmark pulls several GB
through this on 2 cores). Faulted bodies go through small explicit loops instead.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import Callable

from .faults import Fault

SENDFILE_BLOCK = 16 * 1024 * 1024  # per sendfile call: big enough to saturate loopback
COPY_BLOCK = 1024 * 1024  # read/write block for faulted bodies
_FLIP = bytes(b ^ 0xFF for b in range(256))  # "corrupt": every byte inverted, length unchanged


class ConnectionDropped(Exception):
    """The fault ended the connection; the handler must not write anything more on it."""


def send_body(
    sock: socket.socket,
    path: os.PathLike,
    start: int,
    length: int,
    *,
    fault: Fault | None,
    stop: threading.Event,
    on_sent: Callable[[int], None],
) -> None:
    """Send bytes [start, start+length) of `path`, applying `fault` if any."""
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        if fault is None:
            _sendfile(sock, fd, start, length, on_sent)
            return
        head = min(max(fault.after_bytes, 0), length)
        _sendfile(sock, fd, start, head, on_sent)
        rest_start, rest = start + head, length - head
        if fault.kind == "corrupt":
            flipped = min(fault.span or rest, rest)
            _copy(sock, fd, rest_start, flipped, on_sent, transform=_FLIP)
            _sendfile(sock, fd, rest_start + flipped, rest - flipped, on_sent)
        elif fault.kind == "slow":
            _copy(sock, fd, rest_start, rest, on_sent, rate=fault.rate, stop=stop)
        else:
            _drop(sock, fault, stop)


def _sendfile(sock: socket.socket, fd: int, offset: int, count: int, on_sent: Callable[[int], None]) -> None:
    end = offset + count
    while offset < end:
        try:
            sent = os.sendfile(sock.fileno(), fd, offset, min(SENDFILE_BLOCK, end - offset))
        except (BlockingIOError, InterruptedError):
            continue
        if sent == 0:  # file shrank under us: nothing more to send
            raise ConnectionDropped
        offset += sent
        on_sent(sent)


def _copy(
    sock: socket.socket,
    fd: int,
    offset: int,
    count: int,
    on_sent: Callable[[int], None],
    *,
    transform: bytes | None = None,
    rate: int = 0,
    stop: threading.Event | None = None,
) -> None:
    """Read/modify/write loop; with `rate`, paces the bytes to `rate` bytes per second."""
    block = COPY_BLOCK if not rate else max(1, min(COPY_BLOCK, rate // 20))
    began, done = time.monotonic(), 0
    while done < count:
        data = os.pread(fd, min(block, count - done), offset + done)
        if not data:
            raise ConnectionDropped
        if transform is not None:
            data = data.translate(transform)
        sock.sendall(data)
        done += len(data)
        on_sent(len(data))
        if rate:
            delay = began + done / rate - time.monotonic()
            if delay > 0 and stop is not None and stop.wait(delay):
                raise ConnectionDropped  # server stopping: give up on the slow body


def _drop(sock: socket.socket, fault: Fault, stop: threading.Event) -> None:
    """End the connection mid-body: RST for "reset", FIN for "truncate"/"stall"."""
    if fault.kind == "stall":
        stop.wait(fault.seconds)  # hold the connection open, silent, like a wedged proxy
    if fault.kind == "reset":
        # linger 0 makes close() send RST instead of FIN: the client sees ECONNRESET
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    else:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    raise ConnectionDropped
