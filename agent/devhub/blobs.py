"""Content storage for the dev hub: hashing, LFS pointers and where bytes live on disk.

A `Blob` is one file's content as the Hub knows it: its size, its sha256 (the LFS oid),
the git object id git would store for it, and the path the server streams it from.
Files handed in as `Path` are served from that path (multi-GB benchmark models must never
be copied or loaded into memory); files handed in as `bytes` are written once under
`data_dir/blobs/` so every file is served by the same sendfile code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

HASH_PIECE = 8 * 1024 * 1024  # streaming hash read size: keeps memory flat on multi-GB files
LFS_SPEC = "https://git-lfs.github.com/spec/v1"


@dataclass(frozen=True)
class Blob:
    path: Path  # file the bytes are streamed from
    size: int
    sha256: str  # LFS oid; what the Hub calls X-Linked-Etag
    git_oid: str  # sha1 of the git blob: content for regular files, the pointer for LFS files
    lfs: bool
    pointer_size: int  # size of the LFS pointer file git stores (0 for regular files)
    xet_hash: str | None = None

    @property
    def etag(self) -> str:
        """Unquoted ETag the resolve endpoint advertises: sha256 for LFS, git oid otherwise."""
        return self.sha256 if self.lfs else self.git_oid


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git-lfs commits in place of the content (its sha1 is the tree oid)."""
    return f"version {LFS_SPEC}\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_oid(data: bytes) -> str:
    """sha1 of the git object header + data, exactly what `git hash-object` prints."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def hash_file(path: Path, size: int, *, git: bool) -> tuple[str, str | None]:
    """Streaming sha256 (and git blob sha1 if `git`) in 8 MiB reads: memory stays flat and
    hashlib releases the GIL, so a server hashing a big file keeps answering requests."""
    sha = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % size) if git else None
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(HASH_PIECE)
        view = memoryview(buf)
        while n := f.readinto(buf):
            sha.update(view[:n])
            if blob is not None:
                blob.update(view[:n])
    return sha.hexdigest(), blob.hexdigest() if blob is not None else None


class _HashCache:
    """Remembers hashes of big files by (path, size, mtime) across runs.

    Benchmarks re-serve the same multi-GB files many times; re-hashing them each start
    would dominate the setup time.
    """

    MIN_SIZE = 1024 * 1024  # smaller files hash faster than the cache costs

    def __init__(self, file: Path):
        self._file = file
        self._lock = threading.Lock()
        try:
            self._data: dict[str, list] = json.loads(file.read_text())
        except (OSError, ValueError):
            self._data = {}

    def hashes(self, path: Path, st: os.stat_result, *, git: bool) -> tuple[str, str | None]:
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        with self._lock:
            hit = self._data.get(key)
        if hit and (hit[1] or not git):
            return hit[0], hit[1]
        sha256, oid = hash_file(path, st.st_size, git=git)
        if st.st_size >= self.MIN_SIZE:
            with self._lock:
                self._data[key] = [sha256, oid]
                tmp = self._file.with_name(f"{self._file.name}.{threading.get_ident()}.tmp")
                tmp.write_text(json.dumps(self._data))
                tmp.replace(self._file)
        return sha256, oid


class BlobStore:
    """Turns `bytes | Path` into `Blob`s; files >= `lfs_threshold` bytes are stored as LFS."""

    def __init__(self, data_dir: Path, lfs_threshold: int):
        self.blob_dir = Path(data_dir) / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.lfs_threshold = lfs_threshold
        self._cache = _HashCache(Path(data_dir) / "hash-cache.json")

    def ingest(self, content: bytes | Path) -> Blob:
        if isinstance(content, (bytes, bytearray, memoryview)):
            return self._ingest_bytes(bytes(content))
        if isinstance(content, (str, os.PathLike)):
            return self._ingest_path(Path(content))
        raise TypeError(f"file content must be bytes or Path, not {type(content).__name__}")

    def _make_blob(self, path: Path, size: int, sha256: str, content_oid: str | None) -> Blob:
        if size >= self.lfs_threshold:
            pointer = lfs_pointer(sha256, size)
            return Blob(path, size, sha256, git_blob_oid(pointer), True, len(pointer))
        assert content_oid is not None
        return Blob(path, size, sha256, content_oid, False, 0)

    def _ingest_bytes(self, data: bytes) -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.blob_dir / sha256
        if not target.exists():
            # write-then-rename so a concurrent reader never sees a half-written blob
            tmp = target.with_name(f"{sha256}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        oid = git_blob_oid(data) if len(data) < self.lfs_threshold else None
        return self._make_blob(target, len(data), sha256, oid)

    def _ingest_path(self, path: Path) -> Blob:
        st = path.stat()
        # git's content oid is only needed for regular files; LFS files are known by sha256
        sha256, oid = self._cache.hashes(path, st, git=st.st_size < self.lfs_threshold)
        return self._make_blob(path, st.st_size, sha256, oid)
