"""Reading hf_xet's `local://` CAS on disk: shards (which xorb chunks make each file) and xorb footers
(where each chunk starts in the stored xorb), as xet-core's formats define them
(xet_core_structures/src/metadata_shard/{shard_format,file_structs,xorb_structs}.rs and
xet_core_structures/src/xorb_object/xorb_object_format.rs).

On disk, under `DIR/xet/xorbs/`: shards are `shards/*.mdb`, xorbs `xorbs/default.<hash>`.
All integers are little-endian; every shard record is 48 bytes.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

RECORD = 48  # FileDataSequenceHeader/Entry, FileVerificationEntry, FileMetadataExt, XorbChunkSequence*
FLAG_VERIFICATION = 1 << 31  # the file's entries are followed by as many verification records
FLAG_METADATA_EXT = 1 << 30  # ... then by one metadata (sha256) record
BOOKEND = b"\xff" * 32  # the hash of the record that ends a section
XORB_TRAILER = 4 + 4 + 4 + 16  # num_chunks, hashes_offset_from_end, boundary_offset_from_end, nonce buffer
BOUNDARY_IDENT = b"XBLBBND"  # the constant; a doc comment in xet-core says "XBLBMDT"


def hash_hex(raw: bytes) -> str:
    """A Merkle hash's text form: each of its four little-endian u64 as %016x (not the bytes' hex)."""
    return "".join(f"{word:016x}" for word in struct.unpack("<4Q", raw))


@dataclass(frozen=True)
class Segment:
    """One term of a file: chunks [chunk_start, chunk_end) of a xorb, `size` bytes once decoded."""

    xorb: str
    size: int
    chunk_start: int
    chunk_end: int


@dataclass(frozen=True)
class XorbFooter:
    """Per chunk, where it ends in the stored xorb (header included) and in the decoded bytes."""

    stored_ends: tuple[int, ...]
    decoded_ends: tuple[int, ...]

    def stored_range(self, first: int, end: int) -> tuple[int, int]:
        """Byte range [start, end) in the stored xorb of chunks [first, end)."""
        return (self.stored_ends[first - 1] if first else 0), self.stored_ends[end - 1]

    def decoded_size(self, chunk: int) -> int:
        return self.decoded_ends[chunk] - (self.decoded_ends[chunk - 1] if chunk else 0)


def read_shard(data: bytes) -> tuple[dict[str, list[Segment]], set[str]]:
    """(file hash -> its segments, xorbs described) from a shard's file-info and CAS-info sections."""
    footer_offset = struct.unpack_from("<Q", data, len(data) - 8)[0]
    _version, file_info, xorb_info = struct.unpack_from("<3Q", data, footer_offset)
    files: dict[str, list[Segment]] = {}
    pos = file_info
    while data[pos : pos + 32] != BOOKEND:
        flags, count = struct.unpack_from("<II", data, pos + 32)
        file_hash, pos = hash_hex(data[pos : pos + 32]), pos + RECORD
        segments = []
        for _ in range(count):
            _flags, size, first, end = struct.unpack_from("<4I", data, pos + 32)
            segments.append(Segment(hash_hex(data[pos : pos + 32]), size, first, end))
            pos += RECORD
        pos += RECORD * count * bool(flags & FLAG_VERIFICATION) + RECORD * bool(flags & FLAG_METADATA_EXT)
        files[file_hash] = segments
    xorbs: set[str] = set()
    pos = xorb_info
    while data[pos : pos + 32] != BOOKEND:
        count = struct.unpack_from("<I", data, pos + 36)[0]
        xorbs.add(hash_hex(data[pos : pos + 32]))
        pos += RECORD * (1 + count)
    return files, xorbs


def read_xorb_footer(path: Path) -> XorbFooter:
    """The boundary section of a xorb's footer: info_length is the file's last u32; the section
    starts `boundary_offset_from_end` bytes before the end of the info (the trailer's third u32)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 4 - XORB_TRAILER)
        tail = f.read(XORB_TRAILER + 4)
        num_chunks, _hashes_back, boundary_back = struct.unpack_from("<3I", tail)
        info_end = size - 4
        f.seek(info_end - boundary_back)
        section = f.read(boundary_back)
    if section[:7] != BOUNDARY_IDENT or struct.unpack_from("<I", section, 8)[0] != num_chunks:
        raise ValueError(f"{path.name}: not a xorb boundary section")
    offsets = struct.unpack_from(f"<{2 * num_chunks}I", section, 12)
    return XorbFooter(offsets[:num_chunks], offsets[num_chunks:])


class LocalCas:
    """Files and xorbs of a `local://` CAS directory, read lazily; new shards are found on a miss."""

    def __init__(self, cas_dir: Path):
        self.root = Path(cas_dir) / "xet" / "xorbs"
        self._lock = threading.Lock()
        self._files: dict[str, list[Segment]] = {}
        self._xorbs: set[str] = set()
        self._read_shards: set[str] = set()
        self._footers: dict[str, XorbFooter] = {}

    def segments(self, file_hash: str) -> list[Segment] | None:
        with self._lock:
            if file_hash not in self._files:
                self._scan()
            return self._files.get(file_hash)

    def xorb_path(self, xorb: str) -> Path | None:
        with self._lock:
            if xorb not in self._xorbs:
                self._scan()
            path = self.root / "xorbs" / f"default.{xorb}"
            return path if xorb in self._xorbs and path.is_file() else None

    def footer(self, xorb: str) -> XorbFooter:
        with self._lock:
            footer = self._footers.get(xorb)
        if footer is None:
            footer = read_xorb_footer(self.root / "xorbs" / f"default.{xorb}")
            with self._lock:
                self._footers[xorb] = footer
        return footer

    def _scan(self) -> None:
        for shard in sorted((self.root / "shards").glob("*.mdb")):
            if shard.name not in self._read_shards:
                files, xorbs = read_shard(shard.read_bytes())
                self._files.update(files)
                self._xorbs |= xorbs
                self._read_shards.add(shard.name)
