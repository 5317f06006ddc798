"""JSON shapes of the Hub API, built from our repo model.

Field names and nesting follow what huggingface_hub parses (ModelInfo, RepoFile, RepoFolder,
GitRefs, GitCommitInfo), so the real client reads our answers without special cases.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from .blobs import Blob
from .repo import Commit, Repo

_SAFE_SCAN = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None}, "pickleImportScan": None}


def iso(ts: float) -> str:
    """The Hub's timestamp format: ISO 8601, milliseconds, 'Z'."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (ts % 1 * 1000)


def _object_id(repo: Repo) -> str:
    # the Hub returns a 24-hex MongoDB id as "_id"; derive a stable one
    return hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24]


def sibling(path: str, blob: Blob, with_blobs: bool) -> dict:
    if not with_blobs:
        return {"rfilename": path}
    entry: dict = {"rfilename": path, "blobId": blob.git_oid, "size": blob.size}
    if blob.lfs:
        entry["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
    return entry


def repo_info(repo: Repo, commit: Commit, *, with_blobs: bool, expand: list[str] | None) -> dict:
    """Body of GET /api/{type}s/{id}[/revision/{rev}]."""
    unique = {b.sha256: b.size for b in commit.files.values()}
    full = {
        "_id": _object_id(repo),
        "id": repo.repo_id,
        "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
        "sha": commit.sha,
        "lastModified": iso(commit.date),
        "createdAt": iso(repo.created),
        "private": repo.private,
        "gated": "auto" if repo.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": [sibling(p, b, with_blobs) for p, b in sorted(commit.files.items())],
        "usedStorage": sum(unique.values()),
    }
    if repo.repo_type == "model":
        full["modelId"] = repo.repo_id
        full["spaces"] = []
    if expand:
        # with expand, the Hub returns only the requested properties (plus the ids)
        return {k: v for k, v in full.items() if k in ("_id", "id") or k in expand}
    return full


def file_entry(path: str, blob: Blob) -> dict:
    """A tree entry for a file: `oid` is the git blob id (the pointer's for LFS files)."""
    entry: dict = {"type": "file", "oid": blob.git_oid, "size": blob.size}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
    if blob.xet_hash:
        entry["xetHash"] = blob.xet_hash
    entry["path"] = path
    return entry


def override_entry(entry: dict, override: dict[str, str]) -> dict:
    """A file entry as a broken server would list it (see HubServer.listing_overrides)."""
    entry = dict(entry)
    for key, value in override.items():
        if key == "lfs_oid":
            entry["lfs"] = dict(entry.get("lfs") or {"size": entry["size"], "pointerSize": 0}, oid=value)
        else:
            entry[key] = value
    return entry


def dir_entry(path: str, tree_oid: str) -> dict:
    return {"type": "directory", "oid": tree_oid, "size": 0, "path": path}


def path_entry(repo: Repo, commit: Commit, path: str, expand: bool) -> dict | None:
    """Tree entry for a file or directory path, or None if the commit has no such path."""
    if path in commit.files:
        entry = file_entry(path, commit.files[path])
    elif path and path in commit.trees:
        entry = dir_entry(path, commit.trees[path])
    else:
        return None
    if expand:
        last = repo.last_commit_of(commit, path)
        entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": iso(last.date)}
        if entry["type"] == "file":
            entry["securityFileStatus"] = dict(_SAFE_SCAN)
    return entry


def tree_paths(commit: Commit, base: str, recursive: bool) -> list[str] | None:
    """Paths listed under directory `base` ("" = root), sorted; None if `base` is no directory."""
    if base and base not in commit.trees:
        return None
    prefix = base + "/" if base else ""
    out = []
    for path in list(commit.trees) + list(commit.files):
        if path and path.startswith(prefix) and (recursive or "/" not in path[len(prefix):]):
            out.append(path)
    return sorted(out)


def refs(repo: Repo) -> dict:
    def ref(kind: str, name: str, sha: str) -> dict:
        return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

    return {
        "branches": [ref("heads", n, s) for n, s in sorted(dict(repo.branches).items())],
        "converts": [],
        "tags": [ref("tags", n, s) for n, s in sorted(dict(repo.tags).items())],
        "pullRequests": [],
    }


def commit_entry(commit: Commit) -> dict:
    return {
        "id": commit.sha,
        "title": commit.title,
        "message": commit.message,
        "authors": [{"user": "devhub", "avatar": None}],
        "date": iso(commit.date),
    }
