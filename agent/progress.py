"""Progress of one pull: counters shared by the log, the terminal bar and (later) the metrics.

The transfer code calls `add_bytes` (negative when a retry throws bytes away), `add_resumed` (bytes
an earlier run left in a partial file), `file_done` and `retry`. A terminal gets a progress bar; a
pod (no TTY) or `--log-format json` gets a JSON line at a steady interval with bytes, total,
percent, rate, ETA and phase.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from . import log
from .log import Logger


class Listener(Protocol):
    """Anything that wants the same events (the metrics, in particular)."""

    def on_start(self, model: str, commit: str, total_bytes: int, files: int) -> None: ...
    def on_bytes(self, model: str, n: int) -> None: ...
    def on_resumed(self, model: str, n: int) -> None: ...
    def on_file_done(self, model: str) -> None: ...
    def on_retry(self, model: str, reason: str) -> None: ...
    def on_phase(self, model: str, phase: str) -> None: ...


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class PullProgress:
    def __init__(self, logger: Logger, model: str, *, interval: float = 10.0, bar: bool = False,
                 listeners: list[Listener] | None = None):
        self.logger = logger
        self.model = model
        self.interval = interval
        self.listeners = listeners or []
        self.total = 0
        self.files_total = 0
        self.done_bytes = 0  # what is on disk for this pull, resumed bytes included
        self.fetched = 0  # what came over the network in this process, bytes later thrown away included
        self.resumed = 0  # what an earlier run had landed in partial files, reused without a request
        self.files_done = 0
        self.retries = 0
        self.phase = "resolve"
        self.started = time.monotonic()
        self._transfer_started: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._use_bar = bar

    # -- events from the pipeline -------------------------------------------------------------
    def set_phase(self, phase: str) -> None:
        self.phase = phase
        for listener in self.listeners:
            listener.on_phase(self.model, phase)

    def start_transfer(self, commit: str, total_bytes: int, files: int, present_bytes: int) -> None:
        self.total, self.files_total = total_bytes, files
        self.done_bytes = present_bytes
        self._transfer_started = time.monotonic()
        for listener in self.listeners:
            listener.on_start(self.model, commit, total_bytes, files)
        if self._use_bar:
            self._start_bar()
        else:
            self._thread = threading.Thread(target=self._ticker, name="progress", daemon=True)
            self._thread.start()

    def add_bytes(self, n: int) -> None:
        """Network bytes landed (n > 0), or bytes thrown away (n < 0): those were fetched all the same."""
        with self._lock:
            self.done_bytes += n
            self.fetched += max(n, 0)
        for listener in self.listeners:
            listener.on_bytes(self.model, n)
        self._update_bar()

    def add_resumed(self, n: int) -> None:
        """Bytes found on disk: they count towards the snapshot, never towards the network or the rate."""
        with self._lock:
            self.done_bytes += n
            self.resumed += n
        for listener in self.listeners:
            listener.on_resumed(self.model, n)
        self._update_bar()

    def _update_bar(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done_bytes)

    def file_done(self, file) -> None:
        with self._lock:
            self.files_done += 1
        for listener in self.listeners:
            listener.on_file_done(self.model)

    def retry(self, reason: str, delay: float, what: str) -> None:
        with self._lock:
            self.retries += 1
        for listener in self.listeners:
            listener.on_retry(self.model, reason)
        self.logger.warn("retry", f"retrying in {delay:.1f}s: {what}" if self.logger.fmt != "json" else "",
                         model=self.model, reason=reason, delay_s=round(delay, 2), detail=what)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._bar is not None:
            self._bar.stop()
            log.hand_terminal_to(None)
            self._bar = None

    # -- rendering ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - (self._transfer_started or self.started), 1e-6)
        rate = self.fetched / elapsed
        remaining = max(self.total - self.done_bytes, 0)
        return {
            "model": self.model,
            "phase": self.phase,
            "bytes": self.done_bytes,
            "total": self.total,
            "percent": round(100.0 * self.done_bytes / self.total, 1) if self.total else 100.0,
            "rate_bps": int(rate),
            "eta_s": int(remaining / rate) if rate > 0 else None,
            "files_done": self.files_done,
            "files_total": self.files_total,
        }

    def _ticker(self) -> None:
        while not self._stop.wait(self.interval):
            s = self.snapshot()
            text = (f"{s['percent']:5.1f}% {human_bytes(s['bytes'])} / {human_bytes(s['total'])} "
                    f"at {human_bytes(s['rate_bps'])}/s, ETA {s['eta_s'] if s['eta_s'] is not None else '?'}s, "
                    f"files {s['files_done']}/{s['files_total']}")
            self.logger.info("progress", text if self.logger.fmt != "json" else "", **s)

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        # The bar goes where the log lines go (the logger's stream, stderr by default), and the
        # logger prints through the bar's console while it is live: one owner of the terminal.
        console = Console(file=self.logger.stream)
        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[files]}"),
            transient=False, console=console,
        )
        self._task = self._bar.add_task(self.model, total=self.total, completed=self.done_bytes, files="")
        log.hand_terminal_to(console)
        self._bar.start()
        threading.Thread(target=self._bar_files, daemon=True).start()

    def _bar_files(self) -> None:
        while not self._stop.wait(0.5) and self._bar is not None:
            self._bar.update(self._task, files=f"files {self.files_done}/{self.files_total}")
