"""Google Cloud Storage: `gs://BUCKET/PREFIX/`.

google-cloud-storage lists and google-auth supplies credentials (GOOGLE_APPLICATION_CREDENTIALS,
workload identity, the metadata server; STORAGE_EMULATOR_HOST for emulators). The bytes are
ranged GETs of the JSON API's media endpoint on our keep-alive connections, pinned twice: `generation=`
reads exactly the listed generation and `ifGenerationMatch=` refuses any other (412).
"""

from __future__ import annotations

import threading
from urllib.parse import quote

from ..checksums import b64_to_hex
from ..errors import AgentError, AuthError, CertificateError, InvalidInput, NotFound, Retryable, untrusted_reason
from ..proxies import REQUESTS_CA_VARIABLES, ca_bundle_from
from .base import RangeReader, RemoteFile, SourceRef, register
from .objstore import (ObjectInfo, ObjectStoreSource, PinnedHttpReader, changed, content_key,
                       parse_bucket_uri, require_sdk)


@register
class GcsSource(ObjectStoreSource):
    schemes = ("gs",)

    @staticmethod
    def parse(text: str) -> SourceRef:
        return parse_bucket_uri(text, "gs")

    def __init__(self, ref: SourceRef, settings):
        super().__init__(ref, settings)
        self._client = None
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                storage = require_sdk("google.cloud.storage", "gcs", self.ref.display())
                from google.auth.exceptions import DefaultCredentialsError

                try:
                    self._client = storage.Client()
                except (DefaultCredentialsError, OSError):
                    # No credentials anywhere: public buckets still work anonymously.
                    self._client = storage.Client.create_anonymous_client()
            return self._client

    def map_error(self, exc: Exception, what: str) -> Exception:
        from google.api_core import exceptions as gx
        from google.auth import exceptions as ax

        if untrusted := untrusted_reason(exc):
            return CertificateError.untrusted(what, "the GCS endpoint", untrusted, "REQUESTS_CA_BUNDLE",
                                              ca_bundle_from(REQUESTS_CA_VARIABLES))
        if credential_blip(exc):
            return Retryable("credentials", f"{what}: the credential source did not answer ({type(exc).__name__}); "
                                            "trying again")
        if isinstance(exc, (gx.Unauthorized, gx.Forbidden, ax.RefreshError, ax.DefaultCredentialsError)):
            return AuthError(f"{what}: access refused ({type(exc).__name__}): check the credentials and bucket IAM")
        if isinstance(exc, gx.NotFound):
            return NotFound(f"{what}: bucket {self.ref.bucket!r} not found")
        if isinstance(exc, (gx.TooManyRequests, gx.ServerError, gx.RequestRangeNotSatisfiable)):
            return Retryable(f"gcs_{getattr(exc, 'code', 'error')}", f"{what}: {type(exc).__name__}")
        if isinstance(exc, gx.BadRequest):
            return InvalidInput(f"{what}: {exc.message if hasattr(exc, 'message') else exc}")
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or type(exc).__module__.startswith(("requests", "urllib3")):
            return Retryable("connection", f"{what}: {type(exc).__name__}")
        return AgentError(f"{what}: {type(exc).__name__}: {exc}")

    def list_objects(self):
        timeout = self.settings.stall_timeout
        # retry=None: one retry policy for the whole agent, ours.
        for blob in self.client().list_blobs(self.ref.bucket, prefix=self.ref.prefix, retry=None, timeout=timeout):
            md5 = b64_to_hex(blob.md5_hash)  # absent on composite objects
            crc = b64_to_hex(blob.crc32c)
            checksums = {k: v for k, v in (("md5", md5), ("crc32c", crc)) if v}
            generation = str(blob.generation)
            record = {"generation": generation, **({"crc32c": blob.crc32c} if blob.crc32c else {}),
                      **({"md5": md5} if md5 else {})}
            if "gzip" in (blob.content_encoding or "").lower():
                record["content_encoding"] = blob.content_encoding  # refused by the reader, see GcsReader.for_file
            yield ObjectInfo(
                key=blob.name, size=int(blob.size or 0), content_version=generation,
                etag=content_key(md5) if md5 else content_key("gcs", crc or "", generation),
                checksums=checksums, record=record,
            )

    def reader(self, engine: str, commit: str) -> RangeReader:
        if engine in ("xet", "hf_transfer"):
            raise InvalidInput(f"--engine {engine} is for Hugging Face sources; object stores use auto or http")
        return GcsReader(self)


def credential_blip(exc: Exception) -> bool:
    """A token refresh that failed because its source was unreachable or unwell (the metadata server's
    503 or timeout, a token endpoint's 5xx), not because it said no. google-auth marks the token
    endpoints' transient answers `retryable`; the metadata server's 5xx and timeouts it reports only
    in words ("metadata server unavailable"), while its 403/404 (no such service account) is a no."""
    from google.auth import exceptions as ax

    if isinstance(exc, ax.TransportError):
        return True  # the token endpoint could not be reached at all
    if isinstance(exc, ax.RefreshError):
        return bool(getattr(exc, "retryable", False)) or "metadata server unavailable" in str(exc).lower()
    return False


class GcsReader(PinnedHttpReader):
    def __init__(self, source: GcsSource):
        super().__init__(source)
        # google-cloud-storage talks through requests: it trusts REQUESTS_CA_BUNDLE (or CURL_CA_BUNDLE).
        self.pool.trust(ca_bundle_from(REQUESTS_CA_VARIABLES), "REQUESTS_CA_BUNDLE")
        client = source.client()
        self.base = client._connection.API_BASE_URL.rstrip("/")
        self.credentials = client._credentials
        self._auth_lock = threading.Lock()
        self._auth_request = None

    def request_for(self, file: RemoteFile, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        gen = file.version["generation"]
        name = quote(self.source.ref.prefix + file.path, safe="")
        url = (f"{self.base}/download/storage/v1/b/{quote(self.source.ref.bucket, safe='')}/o/{name}"
               f"?alt=media&generation={gen}&ifGenerationMatch={gen}")
        with self._auth_lock:  # google-auth refreshes tokens in place: one thread at a time
            if self._auth_request is None:
                from google.auth.transport.requests import Request

                self._auth_request = Request()
            try:
                self.credentials.before_request(self._auth_request, "GET", url, headers)
            except Exception as exc:  # noqa: BLE001
                raise self.source.map_error(exc, self.what(file)) from None
        return url, headers

    def for_file(self, file: RemoteFile) -> RangeReader:
        """Refuse, before any byte moves, an object stored gzip-encoded (`gsutil cp -z`, `gcloud storage
        cp --gzip-local`): GCS sends it decompressed, so it matches neither its listed size nor its
        CRC32C, and ignores ranges. `gcloud storage cp` decompresses it after checking the stored bytes;
        this agent does not change bytes, so it says why and how to get past it (exit 2)."""
        if file.version.get("content_encoding"):
            raise InvalidInput(f"{self.what(file)}: stored with Content-Encoding: {file.version['content_encoding']} "
                               "(gsutil cp -z), which GCS decompresses on the way and so cannot be verified: "
                               "upload it without -z / --gzip-local, or leave it out with --exclude")
        return self

    def check_version(self, file: RemoteFile, headers, what: str) -> None:
        got = headers.get("x-goog-generation")
        if got and got != file.version["generation"]:
            raise changed(self.source, file, f"generation is now {got}")
