"""Hugging Face Hub repos: `ORG/NAME`, `hf://ORG/NAME@REV`, `hf://datasets/ORG/NAME`.

Metadata goes through the two Hub API calls of agent/sources/hubapi.py (huggingface_hub's requests,
made with the agent's own HTTP client: its import alone cost a quarter of a second per pull). Bytes go
through the engines in `agent.engines`.
"""

from __future__ import annotations

import re
from typing import Callable, TypeVar
from urllib.parse import quote

from ..errors import InvalidInput, NotFound
from ..layout import safe_relpath
from ..retry import RetryPolicy, call_with_retry
from .base import RangeReader, RemoteFile, Source, SourceRef, register
from .hubapi import HubApi

T = TypeVar("T")
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# What the Hub lists, and nothing else: these become file names under blobs/ (and partial names), so
# a broken or hostile endpoint's "../x" would otherwise be a path outside it.
_LISTED_IDS = {"blob id": re.compile(r"[0-9a-f]{40}"), "LFS sha256": re.compile(r"[0-9a-f]{64}"),
               "xet hash": re.compile(r"[0-9a-f]{64}")}


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith((".", "-")):
        raise InvalidInput(f"invalid repo id {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.')")
    return repo_id


# What `git check-ref-format --allow-onelevel` refuses: control characters, space, ~ ^ : ? * [ \,
# "..", "@{", a lone "@", an empty component ("//", a leading or trailing "/"), a component that
# starts with "." or ends with ".lock", a trailing ".". A revision names refs/<revision> on disk, so
# anything else could land outside refs/ or as a file named like the folder (`--revision .`).
_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{")


def check_revision(revision: str) -> str:
    components = revision.split("/")
    if (not revision or revision == "@" or revision.endswith(".") or _BAD_REF_CHARS.search(revision)
            or any(not c or c.startswith(".") or c.endswith(".lock") for c in components)):
        raise InvalidInput(f"invalid revision {revision!r}: not a name git accepts for a branch, tag or commit")
    return revision


@register
class HubSource(Source):
    schemes = ("hf",)
    logger = None  # set by the pull (pipeline.py): the engines' one-time lines (xet's `memory`)

    @staticmethod
    def parse(text: str) -> SourceRef:
        body = text[len("hf://"):] if text.startswith("hf://") else text
        repo_type = "model"
        if body.startswith("datasets/"):
            repo_type, body = "dataset", body[len("datasets/"):]
        elif body.startswith("models/"):
            body = body[len("models/"):]
        revision = None
        if "@" in body:
            body, revision = body.split("@", 1)
            check_revision(revision)
        return SourceRef(scheme="hf", repo_id=check_repo_id(body.strip("/")), repo_type=repo_type, revision=revision)

    def __init__(self, ref: SourceRef, settings):
        super().__init__(ref, settings)
        self._api = None
        self.policy = RetryPolicy(settings.retry_max_failures, settings.retry_base_delay)
        self.on_retry: Callable[[str, float, Exception], None] = lambda reason, delay, exc: None

    @property
    def api(self) -> HubApi:
        if self._api is None:
            self._api = HubApi(self.settings.hf_endpoint, lambda: self.settings.token, self.settings.stall_timeout)
        return self._api

    def what(self, revision: str | None = None) -> str:
        rev = f"@{revision}" if revision else ""
        return f"{self.ref.display()}{rev}"

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return call_with_retry(fn, policy=self.policy, what=what, on_retry=self.on_retry)

    def resolve(self, revision: str) -> str:
        check_revision(revision)
        what = self.what(revision)
        sha = self._call(lambda: self.api.revision_sha(self.ref.repo_type, self.ref.repo_id, revision, what), what)
        if not isinstance(sha, str) or not COMMIT_SHA.match(sha):
            raise NotFound(f"{what}: the Hub returned no commit for this revision")
        return sha

    def list_files(self, commit: str) -> list[RemoteFile]:
        what = self.what(commit)
        entries = self._call(lambda: self.api.tree(self.ref.repo_type, self.ref.repo_id, commit, what), what)
        return [self._remote_file(entry, what) for entry in entries if entry.get("type") == "file"]

    @staticmethod
    def _remote_file(entry: dict, what: str) -> RemoteFile:
        """A tree entry as huggingface_hub's RepoFile reads it: `oid` the git blob id, `lfs.oid` the
        sha256 of an LFS file, `xetHash` its Xet hash."""
        lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else None
        sha256 = lfs.get("oid") if lfs is not None else None
        blob_id, xet_hash, size = entry.get("oid"), entry.get("xetHash"), entry.get("size")
        if not isinstance(entry.get("path"), str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"{what}: the Hub listed a file without a path or a size: is HF_ENDPOINT a Hub?")
        path = safe_relpath(entry["path"], context=what)
        for kind, value in (("blob id", blob_id), ("LFS sha256", sha256), ("xet hash", xet_hash)):
            if (value is not None or kind == "blob id") and not _LISTED_IDS[kind].fullmatch(str(value)):
                raise InvalidInput(f"{what} {path}: the Hub listed {kind} {str(value)[:80]!r}, "
                                   "which is not hex of the right length: is HF_ENDPOINT a Hub?")
        return RemoteFile(
            path=path,
            size=size,
            etag=sha256 or blob_id,  # the blob name huggingface_hub itself would use
            # git's blob id is a checksum too: it verifies the small non-LFS files for free.
            checksums={"sha256": sha256} if sha256 else {"git_sha1": blob_id},
            xet_hash=xet_hash,
            version={"etag": sha256 or blob_id},
        )

    def file_url(self, commit: str, path: str) -> str:
        kind = "datasets/" if self.ref.repo_type == "dataset" else ""
        return f"{self.settings.hf_endpoint}/{kind}{self.ref.repo_id}/resolve/{commit}/{quote(path)}"

    def xet_token_url(self, commit: str) -> str:
        kind = "datasets" if self.ref.repo_type == "dataset" else "models"
        return f"{self.settings.hf_endpoint}/api/{kind}/{self.ref.repo_id}/xet-read-token/{commit}"

    def reader(self, engine: str, commit: str = "") -> RangeReader:
        from ..engines import hub_reader

        return hub_reader(self, engine, commit)
