"""hf_transfer, called directly on the resolved file URL (huggingface_hub 1.0+ no longer uses it).

hf_transfer fetches one whole file with many parallel ranges from Rust. Its `download` holds the
GIL until the file is in, so it runs in a child process per file (hf_transfer_child): the agent's
threads (lease heartbeat, health endpoints, SIGTERM) keep running, and the watchdog here kills the
child when no byte arrives for --stall-timeout or the transfer stops. It neither resumes nor keeps a
record of which ranges landed, so a file interrupted under this engine starts again from zero (files
already complete are kept). Its own retries are enabled; ours wrap it, re-resolving the presigned
URL each time. Files of one chunk or less gain nothing from it and go through our HTTP reader.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

from .. import httpio
from ..errors import Retryable
from ..sources.base import RangeReader, RemoteFile

# hf_transfer buffers max_files x chunk_size per call: one large file at a time keeps peak RSS flat
# (about 8 x 8 MiB) whatever the model size; it parallelizes within the file on its own.
CHUNK_SIZE = 8 * 2**20
_ONE_AT_A_TIME = threading.Semaphore(1)
TICK = 0.2  # seconds between the watchdog's looks at the child (and at stop and the lease)


class HfTransferReader(RangeReader):
    name = "hf_transfer"
    ranged = False

    def __init__(self, source, commit: str, http):
        self.http = http  # resolves redirects and serves small files
        self.commit = commit
        self.settings = source.settings

    def read_range(self, file, start, end):
        return self.http.read_range(file, start, end)

    def resolved_url(self, file: RemoteFile) -> str:
        resp, url = self.http.open(file, {"Range": "bytes=0-0"})
        httpio.drain(resp)
        if resp.status == 403 and httpio.origin(url) != httpio.origin(self.settings.hf_endpoint):
            self.http.forget_location(file)  # a presigned URL expired: ask the Hub for a fresh one
            raise httpio.UrlExpired(f"{self.http.what(file)}: redirect target refused the request (HTTP 403)")
        if resp.status not in (200, 206):
            raise httpio.classify_status(resp.status, resp.headers, self.http.what(file))
        return url

    def fetch_whole(self, file: RemoteFile, dest: str, on_bytes) -> None:
        """Calls on_bytes(0) every TICK while it waits: the caller raises there to stop it."""
        if file.size == 0:
            open(dest, "wb").close()  # no Range probe: an empty file's bytes=0-0 is a 416
            return
        if file.size <= CHUNK_SIZE:
            return self._fetch_in_process(file, dest, on_bytes)
        url = self.resolved_url(file)
        headers = self.http.headers_for(url)  # carries the token only if the URL is on the Hub
        while not _ONE_AT_A_TIME.acquire(timeout=TICK):
            on_bytes(0)
        try:
            open(dest, "wb").close()  # hf_transfer writes into an existing file without truncating it
            self._in_child(file, url, headers, dest, on_bytes)
        except BaseException:
            self.http.forget_location(file)  # the retry resolves again: the URL may have expired
            os.truncate(dest, 0)  # nothing of it can be resumed
            raise
        finally:
            _ONE_AT_A_TIME.release()

    def _fetch_in_process(self, file: RemoteFile, dest: str, on_bytes) -> None:
        got = 0
        with open(dest, "wb") as out:
            for piece in self.http.read_range(file, 0, file.size):
                on_bytes(0)  # stop and lease checks before the write
                out.write(piece)
                got += len(piece)
                on_bytes(len(piece))
        if got != file.size:
            raise Retryable("truncated", f"{self.http.what(file)}: body ended at byte {got} of {file.size}")

    def _in_child(self, file: RemoteFile, url: str, headers: dict, dest: str, on_bytes) -> None:
        # The child writes through a descriptor of ours (/dev/fd/N): the caller holds this inode open,
        # and hf_transfer deletes its output by name when it fails, which on /dev/fd does nothing.
        fd = os.open(dest, os.O_WRONLY)
        try:
            child = ChildDownload(dest, fd, {
                "url": url, "headers": headers, "parent_pid": os.getpid(), "fd": fd, "chunk_size": CHUNK_SIZE,
                "max_files": max(self.settings.workers, 8), "parallel_failures": 4, "max_retries": 4,
            })
            try:
                self._watch(child, file, url, headers, on_bytes)
            finally:
                child.kill()
        finally:
            os.close(fd)

    def _watch(self, child: ChildDownload, file: RemoteFile, url: str, headers: dict, on_bytes) -> None:
        what = self.http.what(file)
        stall = self.settings.stall_timeout
        last_read, last_change = child.bytes_read(), time.monotonic()
        while True:
            line = child.next_line(TICK)
            on_bytes(0)
            if line is not None and line.startswith("+"):
                on_bytes(int(line[1:]))
            elif line == "ok":
                return
            elif line is not None:
                raise self._failure(file, url, headers, child, line)
            now, read = time.monotonic(), child.bytes_read()
            if read != last_read or (line or "").startswith("+"):
                last_read, last_change = read, now
            elif now - last_change > stall:
                raise Retryable("stall", f"{what}: no byte arrived for {stall:g} s (hf_transfer)")

    def _failure(self, file: RemoteFile, url: str, headers: dict, child: ChildDownload, line: str) -> Retryable:
        """Why the child failed, asked of the URL itself: hf_transfer's own message names the URL (a
        presigned one is a credential), and when it cannot delete its output (it writes through
        /dev/fd) that error replaces the HTTP one. One request, and only after a failure."""
        what = self.http.what(file)
        child.kill()
        try:
            resp = httpio.request(self.http.pool, "GET", url, {**headers, "Range": "bytes=0-0"}, what)
            httpio.drain(resp)
        except Retryable as exc:
            return Retryable(exc.reason, f"{what}: hf_transfer failed, and so does a request ({exc.reason})")
        if resp.status == 403 and httpio.origin(url) != httpio.origin(self.settings.hf_endpoint):
            return httpio.UrlExpired(f"{what}: redirect target refused the request (HTTP 403)")
        if resp.status not in (200, 206):
            return Retryable("hf_transfer", f"{what}: hf_transfer failed (HTTP {resp.status})")
        if line == "EOF":
            return Retryable("hf_transfer", f"{what}: hf_transfer's process ended (exit code {child.returncode()})")
        return Retryable("hf_transfer", f"{what}: hf_transfer failed ({line.split()[-1]}; the URL answers)")


class ChildDownload:
    """The child process and a thread that reads its stdout into a queue (`EOF` when it ends)."""

    def __init__(self, dest: str, fd: int, job: dict):
        # The job (with the token) goes through stdin; only the destination's name shows in `ps`.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.engines.hf_transfer_child", os.path.abspath(dest)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, pass_fds=(fd,),
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, name="hf_transfer-out", daemon=True).start()
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass  # it died at once: its EOF says so

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("EOF")

    def next_line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def bytes_read(self) -> int:
        """Bytes the child has received from its sockets so far (Linux), for the stall watchdog:
        hf_transfer reports a chunk only once all of it is in."""
        try:
            with open(f"/proc/{self.proc.pid}/io") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("rchar:"))
        except (OSError, StopIteration, ValueError):
            return 0

    def returncode(self) -> int | None:
        try:
            return self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()  # its stdout then ends, and the reading thread with it
