"""sha256 checks: a benchmark that times broken downloads is useless, so every run is verified.

Hashes are computed here, independently of the hub and of model-agent's own verification.
hashlib releases the GIL, so two threads hash two shards at once on the 2 cores.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PIECE = 8 * 2**20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(PIECE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def expected_hashes(files: dict[str, Path]) -> dict[str, tuple[int, str]]:
    """repo path -> (size, sha256) of the source files."""
    with ThreadPoolExecutor(2) as pool:
        digests = dict(zip(files, pool.map(sha256_of, files.values())))
    return {name: (path.stat().st_size, digests[name]) for name, path in files.items()}


def _problem(root: Path, name: str, size: int, digest: str) -> str | None:
    path = root / name
    if not path.is_file():  # follows the HF cache's snapshot symlinks into blobs/
        return f"{name}: missing"
    if path.stat().st_size != size:
        return f"{name}: size {path.stat().st_size} != {size}"
    if sha256_of(path) != digest:
        return f"{name}: sha256 mismatch"
    return None


def check_tree(root: Path, expected: dict[str, tuple[int, str]]) -> list[str]:
    """Problems found under `root` (empty list = every file present with the right bytes)."""
    with ThreadPoolExecutor(2) as pool:
        found = pool.map(lambda item: _problem(root, item[0], *item[1]), expected.items())
        return [p for p in found if p]
