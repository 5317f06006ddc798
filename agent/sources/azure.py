"""Azure Blob Storage: `az://CONTAINER/PREFIX/` and `https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX/`.

Credentials, first found wins: AZURE_STORAGE_CONNECTION_STRING; else the account (from the URL or
AZURE_STORAGE_ACCOUNT) with AZURE_STORAGE_KEY, or AZURE_STORAGE_SAS_TOKEN, or azure-identity's
DefaultAzureCredential (managed identity, workload identity, a service principal's AZURE_* env).
`--endpoint-url` names the blob service outside Azure's public cloud (`https://ACCOUNT.blob.core.
chinacloudapi.cn`, `...usgovcloudapi.net`, Azure Stack, Azurite).
azure-storage-blob does the listing and decides how each read is authorized (a per-blob SAS it signs
with the account key, the caller's SAS, an Entra ID token); the bytes go through the same pinned,
ranged GETs on keep-alive connections as S3 and GCS (objstore.PinnedHttpReader).
"""

from __future__ import annotations

import re
import threading
import time
from urllib.parse import urlsplit

from ..errors import AgentError, AuthError, CertificateError, InvalidInput, NotFound, Retryable, untrusted_reason
from ..proxies import REQUESTS_CA_VARIABLES, ca_bundle_from
from .base import RangeReader, RemoteFile, SourceRef, register
from .objstore import ObjectInfo, ObjectStoreSource, PinnedHttpReader, content_key, parse_bucket_uri, require_sdk

SAS_SECONDS = 3600  # the per-blob read SAS signed with an account key
_ACCOUNT_HOST = re.compile(r"^([a-z0-9]{3,24})\.blob\.core\.windows\.net$")


@register
class AzureSource(ObjectStoreSource):
    schemes = ("az",)

    @staticmethod
    def parse(text: str) -> SourceRef:
        if text.startswith("https://"):
            parts = urlsplit(text)
            if parts.query:
                raise InvalidInput("an Azure URL with a query string (a SAS?) would put a secret in the job's arguments: "
                                   "pass the SAS in AZURE_STORAGE_SAS_TOKEN instead")
            m = _ACCOUNT_HOST.match(parts.hostname or "")
            if not m:
                raise InvalidInput(f"invalid source {text!r}: expected https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX/")
            return parse_bucket_uri("az://" + parts.path.lstrip("/"), "az", account=m.group(1))
        return parse_bucket_uri(text, "az")

    def __init__(self, ref: SourceRef, settings):
        super().__init__(ref, settings)
        self._container = None
        self._lock = threading.Lock()

    def container(self):
        with self._lock:
            if self._container is None:
                blob = require_sdk("azure.storage.blob", "azure", self.ref.display())
                s = self.settings
                opts = dict(
                    retry_total=0,  # one retry policy for the whole agent, ours
                    connection_timeout=min(30.0, s.stall_timeout), read_timeout=s.stall_timeout,
                )
                if s.azure_connection_string:
                    service = blob.BlobServiceClient.from_connection_string(s.azure_connection_string, **opts)
                else:
                    account = self.ref.account or s.azure_account
                    if not account and not s.azure_endpoint:
                        raise InvalidInput(f"{self.ref.display()}: which storage account? Use https://ACCOUNT.blob.core."
                                           "windows.net/CONTAINER/PREFIX/, AZURE_STORAGE_ACCOUNT, --endpoint-url "
                                           "or AZURE_STORAGE_CONNECTION_STRING")
                    url = (s.azure_endpoint or f"https://{account}.blob.core.windows.net").rstrip("/")
                    if s.azure_account_key and not account:
                        raise InvalidInput(f"{self.ref.display()}: AZURE_STORAGE_KEY needs the account name: AZURE_STORAGE_ACCOUNT")
                    if s.azure_account_key:
                        credential = {"account_name": account, "account_key": s.azure_account_key}
                    elif s.azure_sas_token:
                        credential = s.azure_sas_token.lstrip("?")
                    else:
                        identity = require_sdk("azure.identity", "azure", self.ref.display())
                        credential = identity.DefaultAzureCredential()
                    service = blob.BlobServiceClient(url, credential=credential, **opts)
                self._container = service.get_container_client(self.ref.bucket)
            return self._container

    def map_error(self, exc: Exception, what: str) -> Exception:
        from azure.core import exceptions as ax

        if untrusted := untrusted_reason(exc):
            return CertificateError.untrusted(what, self.settings.endpoint_url or "the blob endpoint", untrusted,
                                              "REQUESTS_CA_BUNDLE", ca_bundle_from(REQUESTS_CA_VARIABLES))
        status = getattr(exc, "status_code", None)
        code = str(getattr(exc, "error_code", "") or "")
        if isinstance(exc, ax.ClientAuthenticationError) or status in (401, 403) or "CredentialUnavailable" in type(exc).__name__:
            return AuthError(f"{what}: access refused ({code or status or type(exc).__name__}): check the credentials and RBAC")
        if isinstance(exc, ax.ResourceNotFoundError) or status == 404:
            if code == "ContainerNotFound":
                return NotFound(f"{what}: container {self.ref.bucket!r} does not exist")
            return NotFound(f"{what}: not found ({code or status})")
        if status and (status >= 500 or status in (408, 429)):
            return Retryable(f"azure_{status}", f"{what}: HTTP {status} {code}")
        if isinstance(exc, (ax.ServiceRequestError, ax.ServiceResponseError, ConnectionError, TimeoutError)):
            return Retryable("connection", f"{what}: {type(exc).__name__}")
        if isinstance(exc, ValueError):
            return InvalidInput(f"{what}: {exc}")
        return AgentError(f"{what}: {type(exc).__name__}: {code or exc}")

    def list_objects(self):
        for b in self.container().list_blobs(name_starts_with=self.ref.prefix or None, include=["metadata"]):
            if (b.metadata or {}).get("hdi_isfolder") == "true":
                continue  # ADLS Gen2 lists each folder, empty ones too, as a zero-byte blob: not a file
            md5 = bytes(b.content_settings.content_md5).hex() if b.content_settings.content_md5 else None
            etag = str(b.etag).strip('"')
            version_id = getattr(b, "version_id", None)
            record = {"etag": etag, **({"content_md5": md5} if md5 else {}), **({"version_id": version_id} if version_id else {})}
            yield ObjectInfo(
                key=b.name, size=int(b.size), content_version=etag, etag=content_key(etag),  # = the lockfile's etag
                checksums={"md5": md5} if md5 else {}, record=record,
            )

    def reader(self, engine: str, commit: str) -> RangeReader:
        if engine in ("xet", "hf_transfer"):
            raise InvalidInput(f"--engine {engine} is for Hugging Face sources; object stores use auto or http")
        return AzureReader(self)


class AzureReader(PinnedHttpReader):
    """Ranged GETs pinned with If-Match, on the same keep-alive path as S3 and GCS: byte-exact resume
    and the same stall watchdog. The SDK still decides how each request is authorized: a read-only
    SAS it signs per blob with the account key, the caller's SAS, or a bearer token from
    azure-identity (managed or workload identity)."""

    API_VERSION = "2021-08-06"  # any version that accepts bearer tokens; ranges and If-Match are older

    def __init__(self, source: AzureSource):
        super().__init__(source)
        # azure-core's requests transport trusts REQUESTS_CA_BUNDLE (or CURL_CA_BUNDLE), as requests does.
        self.pool.trust(ca_bundle_from(REQUESTS_CA_VARIABLES), "REQUESTS_CA_BUNDLE")
        self.azure = source
        self.container = source.container()
        self._urls: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def request_for(self, file: RemoteFile, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        headers["x-ms-version"] = self.API_VERSION
        headers["If-Match"] = f'"{file.version["etag"]}"'
        blob = self.container.get_blob_client(self.azure.ref.prefix + file.path)
        credential = blob.credential
        if hasattr(credential, "get_token"):  # Entra ID: tokens are cached and renewed by azure-identity
            headers["Authorization"] = f"Bearer {credential.get_token('https://storage.azure.com/.default').token}"
            return blob.url, headers
        if getattr(credential, "account_key", None):
            return self._signed_url(blob, credential), headers
        return blob.url, headers  # the caller's SAS (already in the URL), or a public container

    def _signed_url(self, blob, credential) -> str:
        """A read-only SAS for this one blob, signed locally with the account key, renewed hourly."""
        import datetime as dt

        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        now = time.monotonic()
        with self._lock:
            cached = self._urls.get(blob.blob_name)
            if cached and cached[0] > now:
                return cached[1]
        sas = generate_blob_sas(
            account_name=credential.account_name, container_name=blob.container_name, blob_name=blob.blob_name,
            account_key=credential.account_key, permission=BlobSasPermissions(read=True),
            expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=SAS_SECONDS),
        )
        url = f"{blob.url}?{sas}"
        with self._lock:
            self._urls[blob.blob_name] = (now + SAS_SECONDS / 4, url)
        return url
