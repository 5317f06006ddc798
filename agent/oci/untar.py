"""Unpacking a one-file tar layer (ModelPack `*.v1.tar`, `*.v1.tar+gzip`) as its bytes arrive, with
the layer's digest checked over everything received. Memory stays at one network piece and one copy
block whatever the file's size; the file goes straight into the transfer's temp file."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zlib
from collections.abc import Callable, Iterable

from ..errors import IntegrityError, InvalidInput

COPY_BLOCK = 1 << 20


class HashingStream(io.RawIOBase):
    """A readable stream over the blob's pieces (reused buffers: copied as they come) that hashes
    every byte handed out, so the digest covers exactly what the unpacking consumed plus the rest."""

    def __init__(self, pieces: Iterable[bytes | memoryview]):
        self.pieces = iter(pieces)
        self.hasher = hashlib.sha256()
        self.pending = b""
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self.pending:
            piece = next(self.pieces, None)
            if piece is None:
                return 0
            self.pending = bytes(piece)
        n = min(len(buf), len(self.pending))
        buf[:n] = self.pending[:n]
        self.hasher.update(self.pending[:n])
        self.pending = self.pending[n:]
        self.received += n
        return n

    def drain(self) -> None:
        while self.read(COPY_BLOCK):
            pass


def unpack_one_file(pieces: Iterable[bytes | memoryview], digest: str, archive: str, size: int, dest: str,
                    on_bytes: Callable[[int], None], what: str) -> None:
    """Write the one regular file of the tar layer `pieces` to `dest`; IntegrityError unless the layer's
    bytes hash to `digest` and the file is `size` bytes; InvalidInput for a layer of more than one file."""
    raw = HashingStream(pieces)
    stream = gzip.GzipFile(fileobj=io.BufferedReader(raw, COPY_BLOCK)) if archive == "gzip" else \
        io.BufferedReader(raw, COPY_BLOCK)
    written = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue  # the folders leading to the file
                if written is not None:
                    raise InvalidInput(f"{what}: the tar layer holds more than one file ({member.name[:200]} too)")
                written = _copy(tar.extractfile(member), dest, on_bytes)
        while stream.read(COPY_BLOCK):  # gzip: up to its trailer, which checks the CRC of what was unpacked
            pass
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # not OSError: a full disk is not this
        _check_digest(raw, digest, what)  # a corrupted layer says so first
        raise IntegrityError(f"{what}: not a readable tar layer ({type(exc).__name__}: {str(exc)[:200]})") from None
    raw.drain()  # tar's zero blocks and padding: part of the digest
    _check_digest(raw, digest, what)
    if written is None:
        raise IntegrityError(f"{what}: the tar layer holds no file")
    if written != size:
        raise IntegrityError(f"{what}: the tar layer's file is {written} bytes, its metadata says {size}")


def _copy(source, dest: str, on_bytes: Callable[[int], None]) -> int:
    written = 0
    with open(dest, "wb") as out:
        while block := source.read(COPY_BLOCK):
            out.write(block)
            written += len(block)
            on_bytes(len(block))
    return written


def _check_digest(raw: HashingStream, digest: str, what: str) -> None:
    raw.drain()
    got = "sha256:" + raw.hasher.hexdigest()
    if got != digest:
        raise IntegrityError(f"{what}: the layer's {raw.received} bytes hash to {got}, not its digest {digest}")
