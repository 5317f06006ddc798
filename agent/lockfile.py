"""The lockfile (the pinned manifest of a snapshot) and the ready marker (written last)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .layout import atomic_write, fsync_dir

SCHEMA = "model-agent.lock/v1"


@dataclass(frozen=True)
class LockedFile:
    path: str
    size: int
    sha256: str | None = None
    etag: str | None = None
    version: dict = field(default_factory=dict)  # source-specific: version_id, generation, crc32c, ...

    def to_json(self) -> dict:
        out = {"path": self.path, "size": self.size}
        if self.sha256:
            out["sha256"] = self.sha256
        if self.etag:
            out["etag"] = self.etag
        out.update(self.version)
        return out


@dataclass(frozen=True)
class Lock:
    source: str  # credential-free
    revision: str  # as requested
    commit: str
    files: tuple[LockedFile, ...]
    engine: str
    include: tuple[str, ...] = ()  # the filters this snapshot was pulled with
    exclude: tuple[str, ...] = ()
    agent_version: str = __version__
    completed_at: str = ""

    def to_json(self) -> dict:
        # By hand, not dataclasses.asdict: that deep-copies every file's record first (24 ms per 300 files).
        return {"schema": SCHEMA, "source": self.source, "revision": self.revision, "commit": self.commit,
                "files": [f.to_json() for f in self.files], "engine": self.engine, "include": list(self.include),
                "exclude": list(self.exclude), "agent_version": self.agent_version, "completed_at": self.completed_at}


def write_lock(path: Path, lock: Lock) -> None:
    stamp = lock.completed_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body = {**lock.to_json(), "completed_at": stamp}
    atomic_write(path, (json.dumps(body, indent=2, sort_keys=False) + "\n").encode())


def read_lock(path: Path) -> dict | None:
    """The lockfile as a dict, or None when it is missing or not ours (never raises on bad JSON)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("files"), list):
        return None
    return data


def write_ready(path: Path, commit: str) -> None:
    atomic_write(path, (commit + "\n").encode())


def is_ready(path: Path, commit: str | None = None) -> bool:
    """True when the marker exists (and names `commit`, when given). Readers also check that the
    lockfile's files are there (inspect_cache.ready_lock): a marker alone survives `hf cache rm`."""
    try:
        content = path.read_text().strip()
    except OSError:
        return False
    return bool(content) and (commit is None or content == commit)


def missing_file(lock: dict, folder: Path) -> str | None:
    """The first locked path that is not in `folder` at its locked size, or None when all are.

    One stat per file, which follows a snapshot link to its blob: `hf cache rm` (huggingface_hub's
    delete_revisions) removes a revision's links and blobs but not our marker. Sizes only, no hashing:
    the bytes were verified before they were promoted; `verify` is the deep check.
    """
    base = str(folder)
    for entry in lock.get("files", []):
        try:
            if os.stat(os.path.join(base, entry["path"])).st_size != int(entry["size"]):
                return str(entry["path"])
        except (OSError, KeyError, TypeError, ValueError):
            return str(entry.get("path") if isinstance(entry, dict) else entry)
    return None


def clear_ready(path: Path) -> None:
    path.unlink(missing_ok=True)


def retire_snapshot(ready: Path, lock: Path) -> None:
    """Make a snapshot vouch for nothing, durably, before any of its files is overwritten: the marker
    first (readers stop trusting it), then the lockfile (the planner stops trusting its files)."""
    if not (ready.exists() or lock.exists()):
        return
    clear_ready(ready)
    lock.unlink(missing_ok=True)
    fsync_dir(ready.parent)
    if lock.parent != ready.parent:
        fsync_dir(lock.parent)
