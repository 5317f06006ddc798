"""Blob uploads and the manifest PUT (OCI distribution spec, "Pushing blobs in chunks").

POST `/v2/<repo>/blobs/uploads/` opens an upload (with `?mount=<digest>&from=<repo>` the registry may
link a blob it holds in another repository instead: 201, no byte sent); PATCH sends chunks with
`Content-Range: <first>-<last>`, each answered with the Location of the next request (it carries the
upload's state: distribution signs the offset into it); GET on that Location says how many bytes the
registry holds (`Range: 0-<last>`), which is where a killed push resumes; PUT `?digest=` closes it and
the registry checks the digest. The manifest goes last, so a tag never names a missing blob.

A resume must use the Location the last acknowledged PATCH returned. A PATCH killed half-way may
leave bytes the Location does not account for; distribution then cancels the upload (BLOB_UPLOAD_INVALID,
"upload resumed at wrong offset"), so `push_blob` starts a new one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urljoin

from .. import httpio
from ..errors import AgentError, IntegrityError, NotFound, Retryable, TransientError

RESTARTS = 3  # new uploads after the registry dropped one (each costs the bytes sent so far)
DEFAULT_CHUNK = 64 << 20  # per PATCH: what one request risks on a broken connection, and one worker holds
_RANGE = re.compile(r"^(?:bytes=)?0-(\d+)$")


@dataclass(frozen=True)
class Upload:
    repository: str
    location: str  # absolute URL of the next request on this upload
    offset: int  # bytes the registry holds


class UploadLost(NotFound):
    """The upload session is gone (expired, cancelled, or resumed at a wrong offset): start a new one."""


class Uploads:
    """Mixed into RegistryClient: needs `session`, `call`, `what`, `stat_blob`."""

    def start_upload(self, repository: str, *, mount: str | None = None,
                     mount_from: str | None = None) -> Upload | None:
        """Open an upload, or mount `mount` from `mount_from` (None: mounted, nothing to send)."""
        from .client import fail, push_scope

        what = self.what(repository, mount or "") + " (upload)"
        url = f"/v2/{repository}/blobs/uploads/"
        if mount and mount_from:
            url += f"?mount={quote(mount)}&from={quote(mount_from)}"

        def attempt() -> Upload | None:
            resp = self.session.request("POST", url, scope=push_scope(repository, mount_from or ""), what=what,
                                        headers={"Content-Length": "0"}, body=b"")
            if resp.status == 201 and mount:
                httpio.drain(resp)
                return None
            if resp.status != 202:
                raise fail(resp, what)
            httpio.drain(resp)
            return self._upload_from(repository, resp, 0, what)

        return self.call(attempt, what)

    def upload_status(self, repository: str, location: str) -> Upload:
        """Where an upload stands: the offset to resume from. UploadLost when the registry dropped it."""
        from .client import fail, push_scope

        what = self.what(repository) + " (upload status)"

        def attempt() -> Upload:
            resp = self.session.request("GET", location, scope=push_scope(repository), what=what)
            if resp.status in (404, 400):
                error = fail(resp, what)
                raise UploadLost(f"{what}: the registry no longer holds this upload ({error}); starting a new one")
            if resp.status != 204:
                raise fail(resp, what)
            httpio.drain(resp)
            return self._upload_from(repository, resp, None, what, base=location)

        return self.call(attempt, what)

    def upload_chunk(self, upload: Upload, data: bytes | None = None, *, path: Path | None = None,
                     length: int = 0) -> Upload:
        """PATCH the next chunk (`data`, or `length` bytes of `path` from the upload's offset)."""
        from .client import fail, push_scope
        from .session import FileSlice

        size = len(data) if data is not None else length
        what = f"{self.what(upload.repository)} (upload bytes {upload.offset}-{upload.offset + size - 1})"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size),
                   "Content-Range": f"{upload.offset}-{upload.offset + size - 1}"}
        body = data if data is not None else (lambda: FileSlice(path, upload.offset, size))
        resp = self.session.request("PATCH", upload.location, scope=push_scope(upload.repository), what=what,
                                    headers=headers, body=body)
        if resp.status != 202:
            raise fail(resp, what)
        httpio.drain(resp)
        done = self._upload_from(upload.repository, resp, upload.offset + size, what, base=upload.location)
        if done.offset != upload.offset + size:
            raise Retryable("upload_offset", f"{what}: the registry holds {done.offset} bytes after the chunk")
        return done

    def finish_upload(self, upload: Upload, digest: str) -> None:
        """PUT `?digest=`: the registry checks the bytes against it (IntegrityError if they differ)."""
        from .client import fail, push_scope

        what = self.what(upload.repository, digest) + " (upload)"
        sep = "&" if "?" in upload.location else "?"
        resp = self.session.request("PUT", f"{upload.location}{sep}digest={quote(digest)}",
                                    scope=push_scope(upload.repository), what=what,
                                    headers={"Content-Length": "0", "Content-Type": "application/octet-stream"},
                                    body=b"")
        if resp.status not in (201, 204):
            raise fail(resp, what)
        httpio.drain(resp)
        stored = resp.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise IntegrityError(f"{what}: the registry stored {stored}")

    def push_blob(self, repository: str, digest: str, path: Path | None, size: int, *, data: bytes | None = None,
                  chunk_size: int = DEFAULT_CHUNK, resume: Upload | None = None, mount_from: str | None = None,
                  on_upload: Callable[[Upload], None] = lambda upload: None) -> bool:
        """Upload a blob unless the repository holds it (True when bytes were sent). `resume` continues an
        upload from the registry's offset; `on_upload` sees each acknowledged state (persist its location
        to resume after a kill); `mount_from` tries a cross-repository mount first."""
        if self.stat_blob(repository, digest) == size:
            return False
        upload = None
        if resume is not None:
            try:
                upload = self.upload_status(repository, resume.location)
            except UploadLost:
                upload = None
        for _ in range(RESTARTS):
            if upload is None:
                upload = self.start_upload(repository, mount=digest if mount_from else None, mount_from=mount_from)
                if upload is None:
                    return False  # mounted
            on_upload(upload)
            try:
                upload = self._send_from(upload, digest, path, size, data, chunk_size, on_upload)
                break
            except UploadLost:
                upload = None  # a chunk broke half-way and the registry dropped the upload: start again
        else:
            raise TransientError(f"{self.what(repository, digest)}: the registry dropped the upload {RESTARTS} times")
        self.call(lambda: self.finish_upload(upload, digest), self.what(repository, digest))
        return True

    def _send_from(self, upload: Upload, digest: str, path: Path | None, size: int, data: bytes | None,
                   chunk_size: int, on_upload: Callable[[Upload], None]) -> Upload:
        """PATCH the rest of the blob from the upload's offset; the acknowledged state after the last chunk."""
        what = self.what(upload.repository, digest)
        while upload.offset < size:
            take = min(chunk_size, size - upload.offset)
            piece = data[upload.offset:upload.offset + take] if data is not None else None
            upload = self.call(lambda at=upload, piece=piece, take=take: self._chunk_or_status(at, piece, path, take),
                               what)
            on_upload(upload)
        if upload.offset > size:
            raise IntegrityError(f"{what}: the registry holds {upload.offset} bytes of a {size}-byte blob")
        return upload

    def _chunk_or_status(self, upload: Upload, data: bytes | None, path: Path | None, length: int) -> Upload:
        try:
            return self.upload_chunk(upload, data, path=path, length=length)
        except Retryable:
            # The chunk may have landed in part: the next try starts where the registry says it is.
            status = self.upload_status(upload.repository, upload.location)
            if status.offset != upload.offset:
                return status
            raise

    def put_manifest(self, repository: str, identifier: str, data: bytes, media_type: str) -> str:
        """PUT the manifest under a tag (or its digest); returns its digest. Push it after its blobs."""
        from .client import fail, push_scope, sha256_digest

        digest = sha256_digest(data)
        what = self.what(repository, identifier) + " (manifest)"

        def attempt() -> str:
            resp = self.session.request("PUT", f"/v2/{repository}/manifests/{identifier}",
                                        scope=push_scope(repository), what=what,
                                        headers={"Content-Type": media_type}, body=data)
            if resp.status not in (200, 201):
                raise fail(resp, what)
            httpio.drain(resp)
            stored = resp.headers.get("Docker-Content-Digest")
            if stored and stored != digest:
                raise IntegrityError(f"{what}: the registry stored {stored}, our bytes hash to {digest}")
            return digest

        return self.call(attempt, what)

    def _upload_from(self, repository: str, resp, offset: int | None, what: str, base: str = "") -> Upload:
        location = resp.headers.get("Location")
        if not location:
            raise AgentError(f"{what}: the registry answered without the upload's Location")
        location = urljoin(base or self.session.base + "/", location)
        m = _RANGE.match((resp.headers.get("Range") or "").strip())
        if m is not None:
            # distribution writes `0-0` for an empty upload (and, ambiguously, for one byte): read as 0
            last = int(m.group(1))
            offset = last + 1 if last > 0 else 0
        elif offset is None:
            offset = 0
        return Upload(repository=repository, location=location, offset=offset)
