"""The registry HTTP API v2 (the OCI distribution spec): manifests and blobs of one registry.

Reads: a manifest by tag or digest (OCI image manifest and index, docker v2 manifest and list), its
bytes checked against the digest asked for and the `Docker-Content-Digest` the registry sends; a blob's
size (HEAD); byte ranges of a blob (GET, redirects followed without credentials; a 206 must start where
asked). Writes (agent/oci/upload.py): uploads and the manifest, last.

Statuses mean what the contract says: 401 (after one token refresh) and 403 are AuthError (exit 3); a
404 is NotFound (exit 4) naming the repository and tag or digest; 408, 429 and 5xx are `Retryable` for
the caller's retry policy (manifest calls retry here, blob reads in the shared transfer); a manifest
that does not hash to its digest is IntegrityError (exit 5). No message holds a credential or token.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from .. import httpio
from ..errors import (
    AgentError,
    AuthError,
    IntegrityError,
    InvalidInput,
    NotFound,
    Retryable,
    TransientError,
)
from ..retry import RetryPolicy, call_with_retry
from ..sources.base import RangesIgnored
from .auth import Credential
from .reference import is_digest
from .session import Session
from .upload import Uploads

T = TypeVar("T")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
MAX_MANIFEST = 4 << 20  # distribution refuses manifests over 4 MiB; a bigger answer is not a manifest
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class Manifest:
    digest: str  # sha256 of `data`: the immutable id a tag resolves to
    media_type: str
    data: bytes

    def json(self) -> dict:
        try:
            value = json.loads(self.data)
        except ValueError:
            raise InvalidInput(f"manifest {self.digest} is not JSON") from None
        if not isinstance(value, dict):
            raise InvalidInput(f"manifest {self.digest} is not a JSON object")
        return value


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str, *mount_from: str) -> str:
    """The scopes of a push (and of a mount's source): one token covers them all."""
    return " ".join([f"repository:{repository}:pull,push", *(pull_scope(r) for r in mount_from if r)])


def registry_error(resp, body: bytes, what: str) -> Exception:
    """The meaning of a non-success status, with the registry's error code when it sends one."""
    codes = []
    try:
        codes = [str(e.get("code")) for e in json.loads(body).get("errors", []) if isinstance(e, dict)]
    except (ValueError, AttributeError):
        pass
    code = f" ({', '.join(codes)})" if codes else ""
    status = resp.status
    if status == 401:
        return AuthError(f"{what}: sign-in required or the credentials were refused (HTTP 401{code})")
    if status == 403:
        return AuthError(f"{what}: access denied (HTTP 403{code})")
    if status == 404:
        return NotFound(f"{what}: not found (HTTP 404{code})")
    if "DIGEST_INVALID" in codes or "SIZE_INVALID" in codes:
        return IntegrityError(f"{what}: the registry says the bytes do not match the digest (HTTP {status}{code})")
    if status == 416:
        return Retryable("upload_offset", f"{what}: the registry holds another offset of this upload (HTTP 416)")
    error = httpio.classify_status(status, resp.headers, what)
    if isinstance(error, Retryable) or not codes:
        return error
    return TransientError(f"{what}: unexpected HTTP {status}{code}") if status >= 500 else \
        AgentError(f"{what}: the registry refused the request (HTTP {status}{code})")


def fail(resp, what: str) -> Exception:
    """Read (a bounded part of) an error body and return its meaning; the connection is settled."""
    try:
        body = resp.read(64 * 1024)
    except Exception:  # noqa: BLE001 - the status alone still has a meaning
        body = b""
    finally:
        httpio.settle(resp)
    return registry_error(resp, body, what)


class RegistryClient(Uploads):
    """One registry, one credential (or anonymous). Shared by worker threads."""

    def __init__(self, registry: str, *, credential: Credential | None = None, plain_http: bool = False,
                 ca_bundle: str | None = None, stall_timeout: float = 60.0, policy: RetryPolicy | None = None,
                 user_agent: str = "model-agent"):
        self.registry = registry
        self.session = Session(registry, credential, plain_http=plain_http, ca_bundle=ca_bundle,
                               connect_timeout=min(30.0, stall_timeout), read_timeout=stall_timeout,
                               user_agent=user_agent)
        self.policy = policy or RetryPolicy()
        self.on_retry: Callable[[str, float, Exception], None] = lambda reason, delay, exc: None

    def what(self, repository: str, identifier: str = "") -> str:
        sep = "@" if is_digest(identifier) else ":"
        return f"oci://{self.registry}/{repository}" + (f"{sep}{identifier}" if identifier else "")

    def call(self, attempt: Callable[[], T], what: str) -> T:
        """A control-plane call under the one retry policy (blob bytes are retried by the transfer)."""
        return call_with_retry(attempt, policy=self.policy, what=what, on_retry=self.on_retry)

    def close(self) -> None:
        self.session.close()

    # -- manifests ---------------------------------------------------------------------------------------
    def get_manifest(self, repository: str, identifier: str, accept: tuple[str, ...] = MANIFEST_TYPES) -> Manifest:
        """The manifest a tag or digest names, its bytes checked against the digest."""
        what = self.what(repository, identifier)
        return self.call(lambda: self._get_manifest(repository, identifier, accept, what), what)

    def _get_manifest(self, repository: str, identifier: str, accept: tuple[str, ...], what: str) -> Manifest:
        resp = self.session.request("GET", f"/v2/{repository}/manifests/{identifier}", scope=pull_scope(repository),
                                    what=what, headers={"Accept": ", ".join(accept)})
        if resp.status != 200:
            raise fail(resp, what)
        try:
            data = resp.read(MAX_MANIFEST + 1)
        except Exception as exc:
            raise Retryable("connection", f"{what}: connection error reading the manifest "
                            f"({type(exc).__name__})") from exc
        finally:
            httpio.settle(resp)
        if len(data) > MAX_MANIFEST:
            raise InvalidInput(f"{what}: the manifest is larger than {MAX_MANIFEST >> 20} MiB: not a manifest")
        digest = sha256_digest(data)
        claimed = resp.headers.get("Docker-Content-Digest")
        for expected, source in ((identifier if is_digest(identifier) else None, "the digest asked for"),
                                 (claimed if claimed and claimed.startswith("sha256:") else None,
                                  "the registry's Docker-Content-Digest")):
            if expected and expected != digest:
                raise IntegrityError(f"{what}: the manifest's bytes hash to {digest}, not {expected} ({source})")
        media_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        return Manifest(digest=digest, media_type=media_type or _declared_type(data), data=data)

    def head_manifest(self, repository: str, identifier: str) -> str | None:
        """The digest a tag names now (None: no such tag), without reading the manifest."""
        what = self.what(repository, identifier)

        def attempt() -> str | None:
            resp = self.session.request("HEAD", f"/v2/{repository}/manifests/{identifier}",
                                        scope=pull_scope(repository), what=what,
                                        headers={"Accept": ", ".join(MANIFEST_TYPES)})
            if resp.status == 404:
                httpio.drain(resp)
                return None
            if resp.status != 200:
                raise fail(resp, what)
            httpio.drain(resp)
            return resp.headers.get("Docker-Content-Digest") or None

        return self.call(attempt, what)

    # -- blobs -------------------------------------------------------------------------------------------
    def stat_blob(self, repository: str, digest: str) -> int | None:
        """The blob's size, or None when the repository does not hold it."""
        what = self.what(repository, digest)

        def attempt() -> int | None:
            resp = self.session.request("HEAD", f"/v2/{repository}/blobs/{digest}", scope=pull_scope(repository),
                                        what=what, follow=True)
            httpio.drain(resp)
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise registry_error(resp, b"", what)
            length = resp.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None

        return self.call(attempt, what)

    def read_blob(self, repository: str, digest: str, start: int = 0, end: int | None = None,
                  size: int | None = None) -> Iterator[memoryview]:
        """Yield bytes [start, end) of a blob (end None: to its end), in pieces of our read buffer that are
        reused: consume each before the next. A range answered with the whole blob raises RangesIgnored
        (before any byte) carrying that body, as the shared transfer expects of a RangeReader."""
        what = f"{self.what(repository, digest)} bytes {start}-{'' if end is None else end - 1}"
        ranged = start > 0 or (end is not None and (size is None or end < size))
        headers = {"Accept-Encoding": "identity"}
        if ranged:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        resp = self.session.request("GET", f"/v2/{repository}/blobs/{digest}", scope=pull_scope(repository),
                                    what=what, headers=headers, follow=True)
        if resp.status == 206:
            try:
                _check_range(resp.headers, start, end, size, what)
            except BaseException:
                httpio.drain(resp)
                raise
        elif resp.status == 200 and ranged:
            raise RangesIgnored(what, httpio.stream_body(resp, what), lambda: httpio.settle(resp))
        elif resp.status != 200:
            raise fail(resp, what)
        yield from httpio.stream_body(resp, what)


def _check_range(headers, start: int, end: int | None, size: int | None, what: str) -> None:
    m = _CONTENT_RANGE.fullmatch((headers.get("Content-Range") or "").strip())
    if m is None:
        raise Retryable("bad_range", f"{what}: 206 without a valid Content-Range")
    total = m.group(3)
    if size is not None and total != "*" and int(total) != size:
        raise IntegrityError(f"{what}: the blob is {total} bytes, the manifest says {size}")
    if int(m.group(1)) != start or (end is not None and int(m.group(2)) != end - 1):
        raise Retryable("bad_range", f"{what}: got bytes {m.group(1)}-{m.group(2)}")


def _declared_type(data: bytes) -> str:
    try:
        value = json.loads(data)
        return str(value.get("mediaType") or "") if isinstance(value, dict) else ""
    except ValueError:
        return ""
