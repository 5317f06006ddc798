"""Hash files the way their sources do, streaming, with the GIL released for big blocks."""

from __future__ import annotations

import base64
import hashlib
try:  # the `s3` extra: zlib-ng's SIMD CRC32, 24 GB/s here against the system zlib's 2.8 GB/s
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover
    from zlib import crc32 as _crc32
from pathlib import Path

BLOCK = 8 * 2**20
try:  # installed with google-cloud-storage (the `gcs` extra): hardware CRC32C in C
    import google_crc32c
except ImportError:  # pragma: no cover - without it, GCS objects are verified by size and MD5
    google_crc32c = None
_PLAIN = ("sha256", "git_sha1", "md5", "md5_base64", "crc32") + (("crc32c",) if google_crc32c is not None else ())
# S3's COMPOSITE checksum of a multipart object: the checksum of its parts' checksums. The expected
# value is "HEX-PARTS:SIZES" (S3 reports "BASE64-PARTS"; the sizes come from the store, see
# agent/sources/s3.py): SIZES is "P" when every part but the last has P bytes, else the sizes of
# every part but the last, "S1,S2,...". The last part is always the rest of the object.
COMPOSITE = tuple(f"{a}_composite" for a in ("crc32", "crc32c", "sha256") if a in _PLAIN)
SUPPORTED = _PLAIN + COMPOSITE
# When a store offers a CRC of the whole object as well as an MD5, the CRC alone is checked: it
# catches the same transfer and storage corruption (it is what S3 and GCS check themselves) at a
# fraction of the CPU. Measured here: md5 680 MB/s, crc32 24 GB/s (zlib-ng), crc32c 12 GB/s; on a 2-core
# node the MD5 of a model's small files was the largest CPU cost of an s3:// pull after the I/O.
CHEAPER = {"md5": ("crc32c", "crc32") + COMPOSITE, "md5_base64": ("crc32c", "crc32") + COMPOSITE}


def _hasher(algo: str, size: int, expected: str = ""):
    if algo in COMPOSITE:
        return _Composite(algo.removesuffix("_composite"), expected)
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "git_sha1":
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)  # git hashes a header before the content
        return h
    if algo in ("md5", "md5_base64"):
        return hashlib.md5(usedforsecurity=False)
    if algo == "crc32c" and google_crc32c is not None:
        return _Crc32c()
    if algo == "crc32":
        return _Crc32()
    raise ValueError(algo)


class _Composite:
    """A multipart object's checksum: each part hashed alone, then the parts' digests hashed."""

    def __init__(self, base: str, expected: str):
        self.base = base
        self.spec = expected.rpartition(":")[2]
        self._sizes = _part_sizes(expected) or [1]
        self._count = _part_count(expected)
        self._part = _hasher(base, 0)
        self._in_part = 0
        self._digests: list[bytes] = []

    def _part_size(self) -> int | float:
        """The size of the part being hashed: the object's last part takes whatever is left."""
        i = len(self._digests)
        if self._count and i >= self._count - 1:
            return float("inf")
        return self._sizes[min(i, len(self._sizes) - 1)]

    def update(self, data) -> None:
        view = memoryview(data)
        while view:
            part_size = self._part_size()
            take = int(min(len(view), part_size - self._in_part))
            self._part.update(view[:take])
            self._in_part += take
            view = view[take:]
            if self._in_part == part_size:
                self._digests.append(bytes.fromhex(self._part.hexdigest()))
                self._part, self._in_part = _hasher(self.base, 0), 0

    def parts(self) -> list[bytes]:
        """The digest of every part fed so far, the last one possibly short."""
        return self._digests + ([bytes.fromhex(self._part.hexdigest())] if self._in_part else [])

    def hexdigest(self) -> str:
        return _composite_hex(self.base, self.parts(), self.spec)


def _part_sizes(expected: str) -> list[int]:
    """The part sizes of a composite checksum's expected value "HEX-PARTS:SIZES" ([] if absent)."""
    spec = expected.rpartition(":")[2] if ":" in expected else ""
    return [int(s) for s in spec.split(",") if s.isdigit() and int(s) > 0]


def _part_count(expected: str) -> int:
    count = expected.partition("-")[2].partition(":")[0]
    return int(count) if count.isdigit() else 0


def _composite_hex(base: str, parts: list[bytes], spec: str) -> str:
    outer = _hasher(base, 0)
    outer.update(b"".join(parts))
    return f"{outer.hexdigest()}-{len(parts)}:{spec}"


class _Crc32:
    """hashlib-style CRC32 (zlib's polynomial, as S3's x-amz-checksum-crc32, big-endian hex)."""

    def __init__(self):
        self._value = 0

    def update(self, data) -> None:
        self._value = _crc32(data, self._value)

    def value(self) -> int:
        return self._value

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


class _Crc32c:
    """hashlib-style CRC32C (as GCS reports it, big-endian; here as 8 hex digits)."""

    def __init__(self):
        self._c = google_crc32c.Checksum()

    def update(self, data) -> None:
        # The C extension takes only `bytes`: one copy, cheap next to the read it follows.
        self._c.update(data if isinstance(data, bytes) else bytes(data))

    def value(self) -> int:
        return int.from_bytes(self._c.digest(), "big")

    def hexdigest(self) -> str:
        return self._c.digest().hex()


def _digest(algo: str, h) -> str:
    return base64.b64encode(h.digest()).decode() if algo == "md5_base64" else h.hexdigest()


def b64_to_hex(value: str | None) -> str | None:
    """A store's base64 digest (GCS, S3, Azure headers) as lowercase hex; None when not valid."""
    import binascii

    if not value:
        return None
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        return None


def mismatches(path: Path, size: int, expected: dict[str, str]) -> list[str]:
    """What is wrong with the file at `path`, as short phrases; empty when it is right."""
    try:
        actual_size = path.stat().st_size
    except OSError:
        return ["missing"]
    if actual_size != size:
        return [f"size {actual_size} != {size}"]
    digests = Digests(size, expected)
    if not digests.hashers:
        return []  # nothing to hash: the size is all this source offers
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digests.update(view[:n])
    return digests.problems()


def chosen(expected: dict[str, str]) -> dict[str, str]:
    """The checksums worth computing: those this agent supports, minus any a cheaper one covers."""
    usable = {a: v for a, v in expected.items() if a in SUPPORTED and v}
    return {a: v for a, v in usable.items() if not any(c in usable for c in CHEAPER.get(a, ()))}


class Digests:
    """Every expected digest of one file, fed its bytes in order, possibly over several sittings.

    The transfer feeds it the contiguous prefix of a file while later ranges are still arriving,
    so verifying a large file costs little after its last byte lands.
    """

    def __init__(self, size: int, expected: dict[str, str]):
        self.size = size
        self.expected = chosen(expected)
        self.hashers = {a: _hasher(a, size, v) for a, v in self.expected.items()}
        self.fed = 0

    def update(self, data) -> None:
        for h in self.hashers.values():
            h.update(data)
        self.fed += len(data)

    def problems(self) -> list[str]:
        if self.fed != self.size:
            return [f"size {self.fed} != {self.size}"]
        return _compare(self.expected, {a: _digest(a, h) for a, h in self.hashers.items()})


def _compare(expected: dict[str, str], got: dict[str, str]) -> list[str]:
    return [f"{a} {got[a][:12]}… != {v[:12]}…" for a, v in expected.items() if got[a] not in (v, v.lower())]


# -- hashing the ranges of a file apart, in parallel ----------------------------------------------
# A CRC register can be carried past n bytes without reading them: it is a linear map over GF(2),
# a 32x32 bit matrix (zlib's crc32_combine). _POWERS[poly][k] is that map for 2**k zero bytes.
_POLYS = {"crc32": 0xEDB88320, "crc32c": 0x82F63B78}  # bit-reflected, as zlib and CRC32C compute them
_POWERS: dict[int, list[list[int]]] = {}


def _gf2_apply(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_apply(matrix, row) for row in matrix]


def _powers(poly: int) -> list[list[int]]:
    powers = _POWERS.get(poly)
    if powers is None:
        one_bit = [poly] + [1 << n for n in range(31)]  # the register moved past one zero bit
        m = _gf2_square(_gf2_square(_gf2_square(one_bit)))  # ... past 8 bits: one zero byte
        powers = []
        for _ in range(48):  # up to 2**48 bytes
            powers.append(m)
            m = _gf2_square(m)
        _POWERS[poly] = powers
    return powers


def crc_combine(algo: str, crc_a: int, crc_b: int, len_b: int) -> int:
    """The CRC of A+B from the CRC of A, the CRC of B and the length of B."""
    powers, k = _powers(_POLYS[algo]), 0
    while len_b:
        if len_b & 1:
            crc_a = _gf2_apply(powers[k], crc_a)
        len_b >>= 1
        k += 1
    return crc_a ^ crc_b


def _combinable(algo: str, expected: str, range_size: int) -> bool:
    if algo in _POLYS:
        return True
    if algo in COMPOSITE:  # parts must not straddle two ranges: each range then starts a part
        sizes = _part_sizes(expected)  # unequal parts (several sizes): hashed in file order
        return len(sizes) == 1 and range_size % sizes[0] == 0
    return False  # sha256, md5, git_sha1: their state cannot be combined, only fed in order


def hashed_in_file_order(expected: dict[str, str], range_size: int) -> bool:
    """True when verifying needs the file's bytes in order (sha256, md5): ranges that land ahead of
    the hashing frontier are then read back from disk."""
    return bool(chosen(expected)) and not RangeDigests.possible(expected, range_size)


class RangeDigests:
    """The digests of a file hashed range by range: each range in its own order, by whichever worker
    fetches it, combined when all have landed. No byte is read back from disk to hash it, however
    the ranges arrive. Only for checksums that combine (see `possible`); others use Digests.
    """

    @staticmethod
    def possible(expected: dict[str, str], range_size: int) -> bool:
        picked = chosen(expected)
        return bool(picked) and all(_combinable(a, v, range_size) for a, v in picked.items())

    def __init__(self, size: int, expected: dict[str, str], range_size: int):
        self.size = size
        self.expected = chosen(expected)
        count = max(1, -(-size // range_size))
        self.hashers = [{a: _hasher(a, 0, v) for a, v in self.expected.items()} for _ in range(count)]
        self.fed = [0] * count  # bytes of each range hashed, from the range's start

    def update(self, idx: int, data) -> None:
        for h in self.hashers[idx].values():
            h.update(data)
        self.fed[idx] += len(data)

    def problems(self) -> list[str]:
        if sum(self.fed) != self.size:
            return [f"size {sum(self.fed)} != {self.size}"]
        got = {}
        for algo in self.expected:
            ranges = [h[algo] for h in self.hashers]
            if algo in COMPOSITE:
                parts = [d for h in ranges for d in h.parts()]
                got[algo] = _composite_hex(ranges[0].base, parts, ranges[0].spec)
            else:
                value = ranges[0].value()
                for h, length in zip(ranges[1:], self.fed[1:]):
                    value = crc_combine(algo, value, h.value(), length)
                got[algo] = f"{value:08x}"
        return _compare(self.expected, got)
