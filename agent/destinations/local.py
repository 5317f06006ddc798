"""A path as DEST: an NFS export or any mounted folder, laid out as `hf download --local-dir` lays it.

Each file is copied in the kernel (copy_file_range: a reflink on xfs and btrfs, a server-side copy on
NFS 4.2) into a temp name beside its final one, fsynced, then renamed: a reader of the path sees a
file whole or not at all. A path keeps no object metadata, so a re-run confirms a file already
there of the right size by re-hashing it (`confirm`), which costs a read of it, not a copy.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

from .. import checksums
from ..errors import AuthError, InvalidInput, from_oserror
from ..layout import atomic_write, fsync_dir, promote, temp_name
from ..published import RECORDS
from ..resume import copy_some
from ..sources.base import SourceRef
from ..sources.local import LocalSource
from .base import Destination, Stored, Upload, register

PIECE = 64 * 2**20


@register
class LocalDestination(Destination):
    schemes = ("file",)

    @staticmethod
    def parse(text: str) -> SourceRef:
        return LocalSource.parse(text)

    @property
    def root(self) -> Path:
        return Path(self.ref.path)

    def _record(self, name: str) -> Path:
        return self.root / RECORDS / name

    def read_record(self, name: str) -> bytes | None:
        try:
            return self._record(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(exc, f"{self.display()} {RECORDS}{name}") from None

    def write_record(self, name: str, data: bytes) -> None:
        try:
            atomic_write(self._record(name), data)
        except OSError as exc:
            raise self._error(exc, f"{self.display()} {RECORDS}{name}") from None

    def delete_record(self, name: str) -> None:
        path = self._record(name)
        try:
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
        except OSError as exc:
            raise self._error(exc, f"{self.display()} {RECORDS}{name}") from None

    def stored(self) -> dict[str, Stored]:
        found: dict[str, Stored] = {}
        if not self.root.exists():
            return found
        if not self.root.is_dir():
            raise InvalidInput(f"{self.display()}: not a directory")
        for folder, dirs, files in os.walk(self.root):
            rel_dir = os.path.relpath(folder, self.root)
            if rel_dir == ".":
                dirs[:] = [d for d in dirs if d != RECORDS.rstrip("/")]
                rel_dir = ""
            for name in files:
                if ".ma-push-" in name:
                    continue  # a temp file of a push that died: never a published file
                st = os.lstat(os.path.join(folder, name))
                found[os.path.join(rel_dir, name) if rel_dir else name] = Stored(st.st_size, None)
        return found

    def remove(self, paths: list[str]) -> None:
        folders = set()
        for rel in paths:
            path = self.root / rel
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise self._error(exc, f"{self.display()} {rel}") from None
            folders.add(path.parent)
        for folder in folders:
            fsync_dir(folder)

    def tidy(self) -> None:
        for tmp in self.root.rglob("*.ma-push-tmp"):
            tmp.unlink(missing_ok=True)

    def confirm(self, item: Upload, stored: Stored) -> bool:
        expected = {"sha256": item.sha256} if item.sha256 else {"git_sha1": item.digest}
        return stored.size == item.size and not checksums.mismatches(self.root / item.path, item.size, expected)

    def upload(self, item: Upload, on_bytes: Callable[[int], None]) -> None:
        final = self.root / item.path
        tmp = temp_name(final, "ma-push-tmp")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(item.local, "rb") as src, open(tmp, "wb") as dst:
                pos = 0
                while pos < item.size:
                    n = copy_some(src.fileno(), dst.fileno(), pos, min(PIECE, item.size - pos))
                    if n == 0:
                        raise InvalidInput(f"{item.local}: shorter than its locked size {item.size}")
                    pos += n
                    on_bytes(n)
            promote(tmp, final)
        except OSError as exc:
            raise self._error(exc, f"{self.display()} {item.path}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _error(self, exc: OSError, what: str):
        if exc.errno in (errno.EACCES, errno.EPERM):
            return AuthError(f"{what}: permission denied")
        return from_oserror(exc, what)

