"""Text and JSON log lines, with secrets redacted from everything that is printed.

Known secrets (the token, keys from the environment) are registered once at start-up and
replaced wherever they appear; patterns catch what was never registered: Hub tokens, presigned
query strings, SAS signatures, Authorization headers.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from typing import Any, TextIO

_PATTERNS = [
    (re.compile(r"hf_[A-Za-z0-9]{16,}"), "hf_***"),
    (re.compile(r"(?i)(authorization:\s*)(bearer\s+)?\S+"), r"\1***"),
    (re.compile(r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|sig|signature|se|sv|st|sp|skoid|sktid|token|access_token|x-goog-signature|x-goog-credential|expires|policy|key-pair-id)=)[^&\s\"']+"), r"\1***"),
    (re.compile(r"(?i)(AccountKey=|SharedAccessSignature=)[^;\s\"']+"), r"\1***"),
]
_secrets: set[str] = set()
_lock = threading.Lock()
# While a progress bar is live, rich's console owns the terminal: a line written past it lands on
# the bar's row (the bar is redrawn in place), so log lines go through the console, above the bar.
_console = None


def hand_terminal_to(console) -> None:
    """`console` (a rich Console with a live bar) prints every log line until handed back (None)."""
    global _console
    _console = console


def add_secret(value: str | None) -> None:
    if value and len(value) >= 6:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    return value


class Logger:
    """One line per event. `json` for pods and log pipelines, `text` for people."""

    def __init__(self, fmt: str = "text", stream: TextIO | None = None):
        self.fmt = fmt
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def emit(self, event: str, message: str = "", level: str = "info", **fields: Any) -> None:
        if self.fmt == "json":
            record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}Z",
                      "level": level, "event": event}
            if message:
                record["msg"] = message
            record.update(fields)
            line = json.dumps(_redact_value(record), default=str)
        else:
            extras = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and k not in ("model",))
            prefix = "" if level == "info" else f"{level}: "
            line = redact(f"{prefix}{message or event}" + (f" ({extras})" if extras and not message else ""))
        with self._lock:
            console = _console
            if console is not None and self.stream is console.file:
                console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
                return
            self.stream.write(line + "\n")
            self.stream.flush()

    def info(self, event: str, message: str = "", **fields: Any) -> None:
        self.emit(event, message, "info", **fields)

    def warn(self, event: str, message: str = "", **fields: Any) -> None:
        self.emit(event, message, "warning", **fields)

    def error(self, event: str, message: str = "", **fields: Any) -> None:
        self.emit(event, message, "error", **fields)
