"""The Hub token, found where huggingface_hub 2.4 finds it, and re-read when its file changes.

A Kubernetes Secret mounted as a volume is updated in place: the kubelet writes a new `..<timestamp>`
folder and swaps the `..data` symlink. A long-running `sync` must pick the new token up on its own,
or every round after the old token is revoked fails with 401. So a token that came from a file is
held as the file, not as its text: each use stats it (a few microseconds) and re-reads it when its
identity (device, inode, mtime, size) changes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .errors import InvalidInput


def clean_token(text: str, where: str) -> str | None:
    """One token per file. huggingface_hub joins the lines of a file silently; a Secret holding two
    tokens (or a token and a comment) would then be sent as a header that no server accepts."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        raise InvalidInput(f"token file {where}: {len(lines)} lines, expected a single token")
    return lines[0] if lines else None


class Credential:
    """A token that never changes: from HF_TOKEN or HUGGING_FACE_HUB_TOKEN."""

    def __init__(self, token: str | None):
        self._token = token

    def current(self) -> str | None:
        return self._token

    def __repr__(self) -> str:  # never the token itself
        return f"{type(self).__name__}()"


class TokenFile(Credential):
    """A token read from a file, re-read when the file changes."""

    def __init__(self, path: Path, *, required: bool, what: str):
        super().__init__(None)
        self.path, self.required, self.what = path, required, what
        self._stamp: tuple | None = None
        self._lock = threading.Lock()
        self.current()  # read now: a bad file is exit 2 at start-up, not a failed first round

    def _identity(self) -> tuple | None:
        try:
            st = os.stat(self.path)  # follows the ..data symlink: a swap is a new inode
        except FileNotFoundError:
            if self.required:
                raise InvalidInput(f"{self.what} {self.path}: no such file") from None
            return None  # as huggingface_hub: a token path that does not exist means anonymous
        except OSError as exc:
            raise InvalidInput(f"{self.what} {self.path}: cannot read it ({exc.strerror})") from None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> str | None:
        with self._lock:
            stamp = self._identity()
            if stamp != self._stamp:
                self._token = self._read() if stamp is not None else None
                self._stamp = stamp
            return self._token

    def _read(self) -> str | None:
        try:
            token = clean_token(self.path.read_text(), str(self.path))
        except OSError as exc:
            raise InvalidInput(f"{self.what} {self.path}: cannot read it ({exc.strerror})") from None
        if token:
            from .log import add_secret  # a rotated token is as secret as the first one

            add_secret(token)
        return token
