"""A mounted directory: `/abs/path` or `file:///abs/path` (an NFS PVC copied to node-local disk...).

Its identity is its content like a bucket's: the content id over (path, size, mtime), unless it is a
mirror of a Hub snapshot (agent/mirror.py), which the walk lets it see: the `.model-agent/` and
`.cache/huggingface/` bookkeeping is listed like the rest (never copied). Walking it skips what is
not data, and says so: `lost+found` at the top, folders we may not read, sockets and fifos. A
symlink is followed only while it stays inside the source tree; for a Hugging Face snapshot folder
the tree is its repo folder, where its links point (`snapshots/<commit>/x -> ../../blobs/<sha>`).
Reads check size and mtime before and after, so a file rewritten during the copy fails the pull
(exit 7) instead of landing half old, half new.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

from ..errors import AgentError, AuthError, InvalidInput, NotFound, Retryable
from ..mirror import is_bookkeeping
from .base import RangeReader, RemoteFile, SourceRef, register
from .objstore import ObjectInfo, ObjectStoreSource, changed

READ_SIZE = 8 * 2**20
SKIP_AT_TOP = ("lost+found",)


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


@register
class LocalSource(ObjectStoreSource):
    schemes = ("file",)

    @staticmethod
    def parse(text: str) -> SourceRef:
        if text.startswith("file://"):
            parts = urlsplit(text)
            if parts.netloc not in ("", "localhost"):
                raise InvalidInput(f"invalid source {text!r}: a file:// URI names a local path (file:///abs/path)")
            path = unquote(parts.path)
        else:
            path = text
        if not path.startswith("/") or "\x00" in path:
            raise InvalidInput(f"invalid source {text!r}: expected an absolute path or file:///abs/path")
        return SourceRef(scheme="file", path=os.path.normpath(path))

    def __init__(self, ref: SourceRef, settings):
        super().__init__(ref, settings)
        self.real_paths: dict[str, str] = {}  # listed relative path -> the real file read

    def map_error(self, exc: Exception, what: str) -> Exception:
        if isinstance(exc, PermissionError):
            return AuthError(f"{what}: permission denied ({exc.filename})")
        if isinstance(exc, FileNotFoundError):
            return NotFound(f"{what}: no such directory")
        if isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN):
            return Retryable("io", f"{what}: {exc.strerror}")  # a hiccup of an NFS mount
        return AgentError(f"{what}: {type(exc).__name__}: {exc}")

    def tree(self, root: str) -> str:
        """The folder symlinks may point into: the root, or the HF repo folder of a snapshot."""
        p = Path(root)
        if p.parent.name == "snapshots" and (p.parent.parent / "blobs").is_dir():
            return str(p.parent.parent)
        return root

    def list_objects(self) -> Iterator[ObjectInfo]:
        what = self.ref.display()
        root = os.path.realpath(self.ref.path)
        if not os.path.exists(root):
            raise NotFound(f"{what}: no such directory")
        if not os.path.isdir(root):
            raise InvalidInput(f"{what}: not a directory")
        tree = self.tree(root)
        visited = {root}
        stack = [("", root)]
        while stack:
            rel_dir, real_dir = stack.pop()
            try:
                entries = sorted(os.scandir(real_dir), key=lambda e: e.name)
            except PermissionError:
                if not rel_dir:
                    raise
                self.warn("source_skipped", f"{what}: skipping {rel_dir} (cannot read it: permission denied)", path=rel_dir)
                continue
            for e in entries:
                rel = rel_dir + e.name
                if not rel_dir and e.name in SKIP_AT_TOP:
                    self.warn("source_skipped", f"{what}: skipping {rel} (not model data)", path=rel)
                    continue
                real = e.path
                if e.is_symlink():
                    real = os.path.realpath(e.path)
                    if not _inside(real, tree):
                        self.warn("source_skipped", f"{what}: skipping {rel}: a symlink out of the source tree", path=rel)
                        continue
                    if os.path.isdir(real):
                        if real not in visited:  # a loop of links is walked once
                            visited.add(real)
                            stack.append((rel + "/", real))
                        continue
                    if not os.path.isfile(real):
                        self.warn("source_skipped", f"{what}: skipping {rel}: a dangling symlink", path=rel)
                        continue
                elif e.is_dir(follow_symlinks=False):
                    stack.append((rel + "/", real))
                    continue
                elif not e.is_file(follow_symlinks=False):
                    continue  # sockets, fifos, devices: not files to copy
                yield self._info(rel, real)

    def _info(self, rel: str, real: str) -> ObjectInfo:
        st = os.stat(real)
        # Bookkeeping is read only if it is a mirror's (then an unreadable lockfile fails that read, exit 3):
        # hf's zero-byte `.lock` files, a lease, a partial of a pull under way never stop the listing.
        if not is_bookkeeping(rel) and not os.access(real, os.R_OK):
            raise PermissionError(errno.EACCES, "permission denied", rel)
        self.real_paths[rel] = real
        stamp = str(st.st_mtime_ns)
        key = hashlib.sha1(f"{rel}\0{st.st_size}\0{stamp}".encode()).hexdigest()
        return ObjectInfo(key=rel, size=st.st_size, content_version=stamp, etag=f"local-{key}",
                          record={"mtime_ns": st.st_mtime_ns})

    def reader(self, engine: str, commit: str) -> RangeReader:
        if engine in ("xet", "hf_transfer"):
            raise InvalidInput(f"--engine {engine} is for Hugging Face sources; a local path uses auto or http")
        return LocalReader(self)


class LocalReader(RangeReader):
    name = "local"

    def __init__(self, source: LocalSource):
        self.source = source

    def _check(self, file: RemoteFile, fd: int) -> None:
        st = os.fstat(fd)
        if st.st_size != file.size or st.st_mtime_ns != file.version.get("mtime_ns"):
            raise changed(self.source, file, "size or mtime changed")

    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        real = self.source.real_paths.get(file.path) or os.path.join(os.path.realpath(self.source.ref.path), file.path)
        try:
            fd = os.open(real, os.O_RDONLY)
        except FileNotFoundError:
            raise changed(self.source, file, "removed") from None
        except OSError as exc:
            raise self.source.map_error(exc, f"{self.source.ref.display()} {file.path}") from None
        try:
            self._check(file, fd)
            pos = start
            while pos < end:
                data = os.pread(fd, min(READ_SIZE, end - pos), pos)
                if not data:
                    break
                pos += len(data)
                yield data
            self._check(file, fd)  # rewritten while we read: these bytes may mix two versions
        finally:
            os.close(fd)
