"""Repositories as the Hub models them: commits of file sets, branches and tags.

Commit and tree ids are real git object ids (sha1 of git's object encoding), so they look
and behave like the Hub's: 40 hex chars, stable for identical content, different per commit.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .blobs import Blob

REPO_TYPES = ("model", "dataset", "space")
_SHA_PREFIX = re.compile(r"^[0-9a-f]{7,40}$")


def normalize_path(path: str) -> str:
    """Repo paths are kept verbatim, '..' and absolute ones included.

    The real Hub never lists such paths, but a hostile or broken HF_ENDPOINT can, and tests
    use this server to check that clients refuse them. Only what no listing can carry is
    rejected.
    """
    if not path or "\0" in path:
        raise ValueError(f"invalid path in repo: {path!r}")
    return path


def _git_object(kind: bytes, body: bytes) -> str:
    return hashlib.sha1(b"%s %d\0" % (kind, len(body)) + body).hexdigest()


def _tree_ids(files: Mapping[str, Blob]) -> dict[str, str]:
    """Git tree id of every directory ("" is the root), computed bottom-up."""
    children: dict[str, dict[str, tuple[bytes, str]]] = {"": {}}
    for path in files:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            children.setdefault("/".join(parts[:depth]), {})
    for path, blob in files.items():
        parent, _, name = path.rpartition("/")
        children[parent][name] = (b"100644", blob.git_oid)
    ids: dict[str, str] = {}
    # deepest directories first, so a parent always sees its children's ids
    for d in sorted(children, key=lambda p: -p.count("/") if p else 1):
        entries = children[d]
        # git orders entries by name, comparing directories as if they ended with '/'
        order = sorted(entries, key=lambda n: n + "/" if entries[n][0] == b"40000" else n)
        body = b"".join(
            entries[n][0] + b" " + n.encode() + b"\0" + bytes.fromhex(entries[n][1]) for n in order
        )
        ids[d] = _git_object(b"tree", body)
        if d:
            parent, _, name = d.rpartition("/")
            children[parent][name] = (b"40000", ids[d])
    return ids


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    files: Mapping[str, Blob]
    trees: Mapping[str, str]  # directory path -> git tree id ("" = root)
    message: str
    date: float

    @staticmethod
    def create(files: Mapping[str, Blob], parent: str | None, message: str) -> "Commit":
        trees = _tree_ids(files)
        date = time.time()
        stamp = f"devhub <devhub@localhost> {int(date)} +0000"
        body = f"tree {trees['']}\n"
        body += f"parent {parent}\n" if parent else ""
        body += f"author {stamp}\ncommitter {stamp}\n\n{message}\n"
        sha = _git_object(b"commit", body.encode())
        return Commit(sha, parent, MappingProxyType(dict(files)), MappingProxyType(trees), message, date)

    @property
    def title(self) -> str:
        return self.message.splitlines()[0] if self.message else ""


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool = False
    created: float = field(default_factory=time.time)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """Branch, tag, refs/heads|tags/..., full sha or an unambiguous short sha (>= 7 hex)."""
        for name, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            ref = revision[len(name):] if revision.startswith(name) else revision
            if ref in refs:
                return self.commits[refs[ref]]
        if revision in self.commits:
            return self.commits[revision]
        if _SHA_PREFIX.match(revision):
            # list(): a test thread may be committing while a request thread resolves
            hits = [c for sha, c in list(self.commits.items()) if sha.startswith(revision)]
            if len(hits) == 1:
                return hits[0]
        return None

    def history(self, commit: Commit) -> list[Commit]:
        """The commit and its ancestors, newest first."""
        out = [commit]
        while out[-1].parent:
            out.append(self.commits[out[-1].parent])
        return out

    def last_commit_of(self, commit: Commit, path: str) -> Commit:
        """Oldest commit in the unbroken run where `path` had its current content (for expand=true)."""
        oid = commit.files[path].git_oid if path in commit.files else commit.trees.get(path)
        last = commit
        for c in self.history(commit)[1:]:
            other = c.files[path].git_oid if path in c.files else c.trees.get(path)
            if other != oid:
                break
            last = c
        return last


class RepoStore:
    """All repos of one server, guarded by a lock: request threads read while tests commit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._by_sha256: dict[str, Blob] = {}
        self.moved: dict[tuple[str, str], str] = {}  # old id -> new id, answered with a redirect

    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        with self._lock:
            return self._repos.get((repo_type, repo_id))

    def exists(self, repo_type: str, repo_id: str) -> bool:
        return self.get(repo_type, repo_id) is not None

    def blob_by_sha256(self, sha256: str) -> Blob | None:
        with self._lock:
            return self._by_sha256.get(sha256)

    def create(self, repo_type: str, repo_id: str, *, private: bool, gated: bool) -> Repo:
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
            raise ValueError(f"invalid repo id: {repo_id!r}")
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            repo = Repo(repo_type, repo_id, private=private, gated=gated)
            self._repos[(repo_type, repo_id)] = repo
            return repo

    def add_commit(self, repo: Repo, files: Mapping[str, Blob], branch: str, message: str) -> Commit:
        """New commit with exactly `files` on `branch`; a new branch forks from main."""
        with self._lock:
            parent = repo.branches.get(branch) or repo.branches.get("main")
            commit = Commit.create(files, parent, message)
            repo.commits[commit.sha] = commit
            repo.branches[branch] = commit.sha
            for blob in files.values():
                self._by_sha256[blob.sha256] = blob
            return commit

    def set_ref(self, repo: Repo, kind: str, name: str, revision: str) -> str:
        with self._lock:
            commit = repo.resolve(revision)
            if commit is None:
                raise ValueError(f"unknown revision {revision!r} in {repo.repo_id}")
            (repo.tags if kind == "tag" else repo.branches)[name] = commit.sha
            return commit.sha
