"""Hugging Face Hub repos: `ORG/NAME`, `hf://ORG/NAME@REV`, `hf://datasets/ORG/NAME`.

Metadata goes through huggingface_hub's HfApi (endpoint and token passed explicitly: it reads
HF_* variables at import, so changing os.environ later would not reach it). Bytes go through the
engines in `agent.engines`.
"""

from __future__ import annotations

import re
from typing import Callable, TypeVar
from urllib.parse import quote

from ..errors import AgentError, AuthError, InvalidInput, NotFound, Retryable
from ..layout import safe_relpath
from ..retry import RetryPolicy, call_with_retry
from .base import RangeReader, RemoteFile, Source, SourceRef, register

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


def hub_error(exc: Exception, what: str) -> Exception:
    """Map huggingface_hub / httpx errors to the contract's meanings."""
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.GatedRepoError):
        return AuthError(f"{what}: gated repo: accept its terms on the Hub and pass a token that has access")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return NotFound(f"{what}: repo not found (or private: pass a token that can read it)")
    if isinstance(exc, hf.RevisionNotFoundError):
        return NotFound(f"{what}: revision not found")
    if isinstance(exc, hf.HFValidationError):
        return InvalidInput(f"{what}: {exc}")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return AuthError(f"{what}: access refused (HTTP {status}): check the token")
    if status == 404:
        return NotFound(f"{what}: not found (HTTP 404)")
    if status in (408, 429) or (status and status >= 500):
        headers = exc.response.headers  # type: ignore[union-attr]
        from ..httpio import retry_after

        return Retryable(f"http_{status}", f"{what}: HTTP {status}", retry_after(headers, status))
    if type(exc).__module__.startswith(("httpx", "httpcore")):
        return Retryable("connection", f"{what}: {type(exc).__name__}")
    return AgentError(f"{what}: {type(exc).__name__}: {exc}")


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
    def api(self):
        if self._api is None:
            from huggingface_hub import HfApi

            # token=False: never let huggingface_hub fall back to a token of its own choosing.
            self._api = HfApi(endpoint=self.settings.hf_endpoint, token=self.settings.token or False)
        return self._api

    def what(self, revision: str | None = None) -> str:
        rev = f"@{revision}" if revision else ""
        return f"{self.ref.display()}{rev}"

    def _call(self, fn: Callable[[], T], what: str) -> T:
        def attempt() -> T:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - mapped to a meaning right here
                raise hub_error(exc, what) from None

        return call_with_retry(attempt, policy=self.policy, what=what, on_retry=self.on_retry)

    def resolve(self, revision: str) -> str:
        check_revision(revision)
        info = self._call(
            lambda: self.api.repo_info(self.ref.repo_id, revision=revision, repo_type=self.ref.repo_type),
            self.what(revision),
        )
        sha = getattr(info, "sha", None)
        if not sha or not COMMIT_SHA.match(sha):
            raise NotFound(f"{self.what(revision)}: the Hub returned no commit for this revision")
        return sha

    def list_files(self, commit: str) -> list[RemoteFile]:
        from huggingface_hub.hf_api import RepoFile

        entries = self._call(
            lambda: list(self.api.list_repo_tree(
                self.ref.repo_id, revision=commit, repo_type=self.ref.repo_type, recursive=True
            )),
            self.what(commit),
        )
        files = []
        for entry in entries:
            if not isinstance(entry, RepoFile):
                continue
            path = safe_relpath(entry.path, context=self.what(commit))
            lfs = entry.lfs
            sha256 = lfs.sha256 if lfs else None
            xet_hash = getattr(entry, "xet_hash", None)
            for kind, value in (("blob id", entry.blob_id), ("LFS sha256", sha256), ("xet hash", xet_hash)):
                if (value is not None or kind == "blob id") and not _LISTED_IDS[kind].fullmatch(str(value)):
                    raise InvalidInput(f"{self.what(commit)} {path}: the Hub listed {kind} {str(value)[:80]!r}, "
                                       "which is not hex of the right length: is HF_ENDPOINT a Hub?")
            files.append(RemoteFile(
                path=path,
                size=int(entry.size),
                etag=sha256 or entry.blob_id,  # the blob name huggingface_hub itself would use
                # git's blob id is a checksum too: it verifies the small non-LFS files for free.
                checksums={"sha256": sha256} if sha256 else {"git_sha1": entry.blob_id},
                xet_hash=xet_hash,
                version={"etag": sha256 or entry.blob_id},
            ))
        return files

    def file_url(self, commit: str, path: str) -> str:
        kind = "datasets/" if self.ref.repo_type == "dataset" else ""
        return f"{self.settings.hf_endpoint}/{kind}{self.ref.repo_id}/resolve/{commit}/{quote(path)}"

    def xet_token_url(self, commit: str) -> str:
        kind = "datasets" if self.ref.repo_type == "dataset" else "models"
        return f"{self.settings.hf_endpoint}/api/{kind}/{self.ref.repo_id}/xet-read-token/{commit}"

    def reader(self, engine: str, commit: str = "") -> RangeReader:
        from ..engines import hub_reader

        return hub_reader(self, engine, commit)
