"""The published lockfile: what `push` writes last under DEST, and what a pull of DEST trusts.

`DEST/.model-agent/lock.json` carries the snapshot's Hub identity (repo id, repo type, revision,
commit) and every file's size, its etag (the blob name in the HF cache: the LFS sha256, or git's
blob sha1 of a small file) and that checksum spelled out. A prefix without it is not published.
`DEST/.model-agent/publishing` is written before the first upload and removed after the lockfile:
a prefix holding it without a lockfile is a push under way (or one that died), never a model.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from . import __version__
from .errors import InvalidInput
from .lockfile import SCHEMA

RECORDS = ".model-agent/"  # the bookkeeping folder of a published prefix: never part of a snapshot
LOCK_NAME = "lock.json"
PUBLISHING_NAME = "publishing"
HEX40 = re.compile(r"^[0-9a-f]{40}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class NotOurs(InvalidInput):
    """DEST holds something this agent did not publish (another tool's artifact, an unreadable lockfile):
    refused unless --overwrite, and only this refusal is lifted by it."""


@dataclass(frozen=True)
class PublishedFile:
    path: str
    size: int
    etag: str  # the HF blob name: the sha256 of an LFS file, the git blob sha1 of a small one
    sha256: str | None = None
    git_sha1: str | None = None

    def checksums(self) -> dict[str, str]:
        return {k: v for k, v in (("sha256", self.sha256), ("git_sha1", self.git_sha1)) if v}

    def to_json(self) -> dict:
        out = {"path": self.path, "size": self.size, "etag": self.etag}
        out.update(self.checksums())
        return out


@dataclass(frozen=True)
class PublishedLock:
    repo_id: str
    repo_type: str
    revision: str
    commit: str
    files: tuple[PublishedFile, ...]
    source: str = ""  # credential-free: where the publish Job read it

    def same_model(self, other: "PublishedLock") -> bool:
        return (self.repo_type, self.repo_id) == (other.repo_type, other.repo_id)

    def to_bytes(self) -> bytes:
        body = {"schema": SCHEMA, "repo_id": self.repo_id, "repo_type": self.repo_type, "revision": self.revision,
                "commit": self.commit, "source": self.source, "files": [f.to_json() for f in self.files],
                "agent_version": __version__, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return (json.dumps(body, indent=2) + "\n").encode()


def published_file(entry: dict, what: str) -> PublishedFile:
    """One entry of a published (or cache) lockfile. The checksum is the etag when the entry does not
    spell it out: a 64-hex etag is an LFS sha256, a 40-hex one git's blob sha1 (the Hub's blob names)."""
    try:
        path, size = str(entry["path"]), int(entry["size"])
    except (KeyError, TypeError, ValueError):
        raise InvalidInput(f"{what}: a file entry without a path and size: {str(entry)[:120]}") from None
    etag = str(entry.get("etag") or entry.get("sha256") or "")
    sha256 = entry.get("sha256") or (etag if HEX64.match(etag) else None)
    git_sha1 = entry.get("git_sha1") or (etag if HEX40.match(etag) and not sha256 else None)
    if not (sha256 or git_sha1):
        raise InvalidInput(f"{what}: {path} has no sha256 or git blob sha1 to verify it against")
    # The blob name: a git sha1 said outright (a small Hub file), else the sha256. A cache lockfile of a
    # mirror pulled from a bucket carries the bucket's own ETag (S3's MD5) as `etag`: never a blob name.
    return PublishedFile(path, size, entry.get("git_sha1") or sha256 or etag, sha256, git_sha1)


def parse_lock(data: bytes, what: str) -> PublishedLock:
    """A published lockfile's bytes, checked; exit 2 when it is not one."""
    try:
        body = json.loads(data)
    except ValueError:
        raise InvalidInput(f"{what}: {RECORDS}{LOCK_NAME} is not JSON") from None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA or not isinstance(body.get("files"), list):
        raise InvalidInput(f"{what}: {RECORDS}{LOCK_NAME} is not a model-agent lockfile ({SCHEMA})")
    commit = str(body.get("commit") or "")
    if not HEX40.match(commit):
        raise InvalidInput(f"{what}: {RECORDS}{LOCK_NAME} names no 40-hex commit")
    repo_id, repo_type = str(body.get("repo_id") or ""), str(body.get("repo_type") or "model")
    if not repo_id and str(body.get("source", "")).startswith("hf://"):
        # A `pull --local-dir` folder's own lockfile: it names the Hub source, not the repo id.
        rest = str(body["source"])[len("hf://"):]
        repo_type, repo_id = ("dataset", rest[len("datasets/"):]) if rest.startswith("datasets/") else ("model", rest)
    files = tuple(published_file(e, what) for e in body["files"] if isinstance(e, dict))
    return PublishedLock(repo_id=repo_id, repo_type=repo_type, revision=str(body.get("revision") or commit),
                         commit=commit, files=files, source=str(body.get("source") or ""))
