"""S3 and S3-compatible stores (MinIO, Ceph RGW, SeaweedFS): `s3://BUCKET/PREFIX/`.

The SDK (botocore, boto3's core) does what it is best at: the credential chain (env, profile, IRSA, instance role, SSO) and
the listing. The bytes go through presigned, pinned GETs on our own keep-alive connections: measured on
SeaweedFS it moves the same bytes with less CPU than boto3's get_object (see bench/objstore.py and
README "Object stores"). Presigning is local computation, done once per file (~0.6 ms), not per range.
"""

from __future__ import annotations

import re
import threading
import time

from .. import httpio
from ..checksums import b64_to_hex
from ..errors import AgentError, AuthError, CertificateError, InvalidInput, NotFound, Retryable, untrusted_reason
from ..proxies import ca_bundle_from
from .base import RangeReader, RemoteFile, SourceRef, register
from .imds import imds_address, instance_role_unreachable
from .objstore import (ObjectInfo, ObjectStoreSource, PinnedHttpReader, content_key, parse_bucket_uri,
                       require_sdk)

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
PRESIGN_SECONDS = 3600
# Part sizes are learned by HEADs (one per part) only up to this many parts: ~20 ms each on AWS.
HEAD_PARTS_MAX = 64
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-([0-9]+)$")
# S3's additional checksums that this agent can recompute (crc64nvme would need awscrt).
_CHECKSUM_HEADERS = (("x-amz-checksum-crc32c", "crc32c"), ("x-amz-checksum-crc32", "crc32"),
                          ("x-amz-checksum-sha256", "sha256"))
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "InvalidToken",
               "ExpiredToken", "AccountProblem", "InvalidSecurity", "UnauthorizedAccess"}
_MISSING_CODES = {"NoSuchBucket", "NoSuchKey", "NotFound", "404"}
_RETRY_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "ThrottlingException",
                "RequestTimeTooSkewed", "503", "500", "502", "504"}


@register
class S3Source(ObjectStoreSource):
    schemes = ("s3",)

    @staticmethod
    def parse(text: str) -> SourceRef:
        return parse_bucket_uri(text, "s3")

    def __init__(self, ref: SourceRef, settings):
        super().__init__(ref, settings)
        self._client = None
        self._region: str | None = None
        self._imds: tuple[str, float] | None = None  # where botocore looked for an instance role, if it found none
        self._lock = threading.Lock()

    # -- the SDK ------------------------------------------------------------------------------------
    def client(self, region: str | None = None):
        """An S3 client from the SDK's standard credential chain; path-style when an endpoint is given."""
        with self._lock:
            if self._client is not None and region in (None, self._region):
                return self._client
            # botocore is boto3's core: the same credential chain and client, without importing
            # boto3's transfer manager (~0.1 s of start-up on every pull).
            botocore_session = require_sdk("botocore.session", "s3", self.ref.display())
            from botocore import UNSIGNED
            from botocore.config import Config

            session = botocore_session.get_session()
            endpoint = self.settings.endpoint_url
            anonymous = session.get_credentials() is None  # public buckets: no credentials anywhere
            self._imds = imds_address(session) if anonymous else None
            config = Config(
                signature_version=UNSIGNED if anonymous else "s3v4",
                s3={"addressing_style": "path" if endpoint else "auto"},
                max_pool_connections=max(self.settings.workers, 10),
                # One retry policy for the whole agent: ours (agent/retry.py), not the SDK's as well.
                retries={"total_max_attempts": 1},
                connect_timeout=min(30.0, self.settings.stall_timeout),
                read_timeout=self.settings.stall_timeout,
            )
            region = region or session.get_config_variable("region") or ("us-east-1" if endpoint else None)
            self._client = session.create_client("s3", endpoint_url=endpoint, region_name=region, config=config)
            self._region = region
            return self._client

    def ca_bundle(self) -> str | None:
        """The CA bundle botocore trusts, in its order: `ca_bundle` (AWS_CA_BUNDLE or the AWS config
        file), else REQUESTS_CA_BUNDLE (botocore's endpoint.py honours it), else its default CAs."""
        botocore_session = require_sdk("botocore.session", "s3", self.ref.display())
        return botocore_session.get_session().get_config_variable("ca_bundle") or ca_bundle_from(("REQUESTS_CA_BUNDLE",))

    def map_error(self, exc: Exception, what: str) -> Exception:
        from botocore import exceptions as bx

        if untrusted := untrusted_reason(exc):
            return CertificateError.untrusted(what, self.settings.endpoint_url or "the S3 endpoint", untrusted,
                                              "AWS_CA_BUNDLE", self.ca_bundle())
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if (code in _AUTH_CODES or status in (401, 403)) and self._credentials_blipped():
                return Retryable("credentials", f"{what}: an anonymous request was refused ({code or status}) while the "
                                                "instance metadata service has a role but gave no credentials; trying again")
            if code in _AUTH_CODES or status in (401, 403):
                return AuthError(f"{what}: access refused ({code or status}): check the credentials and the bucket policy")
            if code == "NoSuchBucket":
                return NotFound(f"{what}: bucket {self.ref.bucket!r} does not exist")
            if code in _MISSING_CODES or status == 404:
                return NotFound(f"{what}: not found ({code or status})")
            if code in _RETRY_CODES or (status and (status >= 500 or status in (408, 429))):
                return Retryable(f"s3_{code or status}", f"{what}: {code or status}")
            if code == "PermanentRedirect":
                return InvalidInput(f"{what}: the bucket lives in another region or endpoint ({code})")
            return AgentError(f"{what}: S3 error {code or status}")
        if isinstance(exc, (bx.CredentialRetrievalError, bx.MetadataRetrievalError)):
            return Retryable("credentials", f"{what}: the credential source did not answer ({type(exc).__name__})")
        if isinstance(exc, bx.NoCredentialsError):
            return AuthError(f"{what}: no AWS credentials found")
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionError, bx.ReadTimeoutError,
                            bx.ConnectTimeoutError, bx.HTTPClientError)):
            return Retryable("connection", f"{what}: {type(exc).__name__}")
        if isinstance(exc, (bx.ParamValidationError, ValueError)):
            return InvalidInput(f"{what}: {exc}")
        return AgentError(f"{what}: {type(exc).__name__}: {exc}")

    def _credentials_blipped(self) -> bool:
        """botocore turns an instance-metadata timeout or 5xx into "no credentials", so the request went
        out anonymous. If the metadata service now shows a role (or is still unwell), that refusal is a
        blip: the next attempt runs the credential chain again. Exit 3 stays for a node with no role."""
        with self._lock:
            imds = self._imds
        if imds is None or not instance_role_unreachable(*imds):
            return False
        with self._lock:
            self._client, self._imds = None, None
        return True

    # -- listing -----------------------------------------------------------------------------------
    def _versioned(self, client) -> bool:
        try:
            status = client.get_bucket_versioning(Bucket=self.ref.bucket).get("Status")
        except Exception:  # noqa: BLE001 - a reader may lack s3:GetBucketVersioning: then pin by ETag alone
            return False
        return status in ("Enabled", "Suspended")

    def list_objects(self):
        client = self.client()
        if self._versioned(client):
            pages = client.get_paginator("list_object_versions").paginate(Bucket=self.ref.bucket, Prefix=self.ref.prefix)
            entries = [v for page in pages for v in page.get("Versions", []) if v.get("IsLatest")]
            self._learn_region(None, client)  # ListObjectVersions need not say the region: HeadBucket does
        else:
            entries = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.ref.bucket, Prefix=self.ref.prefix):
                self._learn_region(page)
                entries += page.get("Contents", [])
        md5_etags = self._etags_are_md5(client, entries)
        for e in entries:
            etag = str(e.get("ETag", "")).strip('"')
            version_id = e.get("VersionId")
            version_id = None if version_id in (None, "null") else version_id
            checksums = {"md5": etag} if md5_etags and _MD5_ETAG.match(etag) else {}
            record = {"etag": etag, **({"version_id": version_id} if version_id else {}), **checksums}
            yield ObjectInfo(
                key=e["Key"], size=int(e["Size"]), etag=content_key(etag),  # = the lockfile's etag: trusted on re-pulls
                content_version=f"{etag}:{version_id}" if version_id else etag, checksums=checksums, record=record,
            )

    def _learn_region(self, page, client=None) -> None:
        """AWS answers in the bucket's region; presigned URLs must be signed for that region (a URL
        signed for AWS_REGION's is refused, and each GET would fail until exit 7). From a listing
        page's x-amz-bucket-region, or (no page) from HeadBucket's, which AWS documents for every
        answer, its 301 and 403 included; botocore follows the redirect of a wrong-region client."""
        if self.settings.endpoint_url:
            return
        if page is not None:
            headers = page.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        else:
            from botocore.exceptions import ClientError

            try:
                headers = client.head_bucket(Bucket=self.ref.bucket).get("ResponseMetadata", {}).get("HTTPHeaders", {})
            except ClientError as exc:
                headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        region = headers.get("x-amz-bucket-region")
        if region and region != self._region:
            self.client(region)

    def _etags_are_md5(self, client, entries: list[dict]) -> bool:
        """A single-part ETag is the MD5 of the bytes, except under SSE-KMS / SSE-C.

        Encryption is a bucket default in practice, so one HEAD of one object tells; a bucket
        whose objects differ would show up as an integrity error, never as wrong bytes accepted.
        """
        sample = next((e for e in entries if _MD5_ETAG.match(str(e.get("ETag", "")).strip('"')) and e["Size"]), None)
        if sample is None:
            return False
        try:
            head = client.head_object(Bucket=self.ref.bucket, Key=sample["Key"])
        except Exception:  # noqa: BLE001 - cannot tell: verify by size only
            return False
        return head.get("ServerSideEncryption") not in ("aws:kms", "aws:kms:dsse") and not head.get("SSECustomerAlgorithm")

    def reader(self, engine: str, commit: str) -> RangeReader:
        if engine in ("xet", "hf_transfer"):
            raise InvalidInput(f"--engine {engine} is for Hugging Face sources; object stores use auto or http")
        return S3Reader(self)


class S3Reader(PinnedHttpReader):
    """Presigned GETs pinned with If-Match (and VersionId on versioned buckets)."""

    def __init__(self, source: S3Source):
        super().__init__(source)
        self.pool.trust(source.ca_bundle(), "AWS_CA_BUNDLE")
        self.s3 = source
        self._urls: dict[str, tuple[float, float, str]] = {}  # path -> (signed at, renew after, url)
        self._heads: dict[str, threading.Lock] = {}
        self._headed: set[str] = set()
        self._lock = threading.Lock()

    def request_for(self, file: RemoteFile, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        etag = file.version.get("etag")
        if etag:
            headers["If-Match"] = f'"{etag}"'
        # Signed into the URL, so it must be sent: a whole-object GET then carries the object's
        # full-object checksum (x-amz-checksum-crc32...), a ranged GET simply carries none.
        headers["x-amz-checksum-mode"] = "ENABLED"
        return self.url(file), headers

    def learn_checksums(self, file: RemoteFile, headers) -> None:
        """Take S3's additional checksum from a whole GET or a HEAD: FULL_OBJECT as is, COMPOSITE
        (multipart: "BASE64-PARTS") with the parts' sizes, so the parts can be hashed one by one."""
        kind = (headers.get("x-amz-checksum-type") or "").upper()
        for header, algo in _CHECKSUM_HEADERS:
            digest, _, parts = (headers.get(header) or "").partition("-")
            hexed = b64_to_hex(digest)
            if not hexed:
                continue
            if not parts and not kind:
                # No type said: before FULL_OBJECT checksums (2025), a multipart object's checksum
                # was always COMPOSITE, and some stores (moto) still send it without its "-PARTS".
                parts = _multipart_etag_parts(file.version.get("etag", ""))
            if not parts and kind != "COMPOSITE":
                file.checksums[algo] = hexed
                file.version[f"checksum_{algo}"] = hexed  # into the lockfile: what the bytes were checked against
                continue
            file.version[f"checksum_{algo}"] = f"{hexed}-{parts}"
            spec = self._part_spec(file, parts)
            if spec:
                file.checksums[f"{algo}_composite"] = f"{hexed}-{parts}:{spec}"
                file.version["part_size"] = int(spec) if spec.isdigit() else spec
            else:  # never a guess at the boundaries: a wrong one would be a false exit 5
                file.version["checksum_unchecked"] = (f"{algo} composite: the sizes of its {parts or '?'} parts are "
                                                      "unknown; verified by size only")

    def _part_spec(self, file: RemoteFile, parts: str) -> str | None:
        """The parts' sizes as the composite's expected value names them: "P" when every part but the
        last has P bytes, else the sizes of every part but the last ("S1,S2,..."). Uploaders that
        stream (smart_open, s3fs) cut unequal parts, so the real boundaries are asked for."""
        if not parts.isdigit() or int(parts) < 1:
            return None
        count = int(parts)
        if count == 1:
            return str(max(file.size, 1))
        sizes = self._sizes_from_attributes(file, count) or self._sizes_from_heads(file, count)
        if not sizes or len(sizes) != count or sum(sizes) != file.size or min(sizes) < 1:
            return None
        head, last = sizes[:-1], sizes[-1]
        if len(set(head)) == 1 and last <= head[0]:
            return str(head[0])
        return ",".join(map(str, head))

    def _sizes_from_attributes(self, file: RemoteFile, count: int) -> list[int] | None:
        """Every part's size from GetObjectAttributes (1,000 parts a call; S3 lists them for objects
        with an additional checksum, which a composite one is)."""
        sizes: dict[int, int] = {}
        marker = 0
        try:
            for _ in range(-(-count // 1000)):
                got = self.s3.client().get_object_attributes(
                    **self._params(file), ObjectAttributes=["ObjectParts"], MaxParts=1000, PartNumberMarker=marker)
                page = got.get("ObjectParts", {})
                sizes.update({int(p["PartNumber"]): int(p["Size"]) for p in page.get("Parts", []) if "Size" in p})
                if not page.get("IsTruncated"):
                    break
                marker = int(page["NextPartNumberMarker"])
        except Exception:  # noqa: BLE001 - refused (no s3:GetObjectAttributes) or unsupported: HEADs instead
            return None
        numbers = range(1, count + 1)
        return [sizes[n] for n in numbers] if sorted(sizes) == list(numbers) else None

    def _sizes_from_heads(self, file: RemoteFile, count: int) -> list[int] | None:
        """Every part's size from a HEAD per part number, for stores without GetObjectAttributes."""
        if count > HEAD_PARTS_MAX:
            return None
        try:
            return [int(self.s3.client().head_object(**self._params(file), PartNumber=n)["ContentLength"])
                    for n in range(1, count + 1)]
        except Exception:  # noqa: BLE001 - no sizes: verified by size only, never by a guess
            return None

    def before_ranged_read(self, file: RemoteFile) -> None:
        """A ranged GET carries no checksum: one HEAD per file learns it, before any range of the file
        is read (the other ranges wait), so the digests are set before their first byte."""
        with self._lock:
            once = self._heads.setdefault(file.path, threading.Lock())
        with once:
            if file.path in self._headed:
                return
            try:
                head = self.s3.client().head_object(**self._params(file), ChecksumMode="ENABLED")
                self.learn_checksums(file, head.get("ResponseMetadata", {}).get("HTTPHeaders", {}))
            except Exception:  # noqa: BLE001 - the GET that follows reports what is really wrong
                pass
            self._headed.add(file.path)

    def _params(self, file: RemoteFile) -> dict:
        params = {"Bucket": self.s3.ref.bucket, "Key": self.s3.ref.prefix + file.path}
        if file.version.get("version_id"):
            params["VersionId"] = file.version["version_id"]
        return params

    def url(self, file: RemoteFile) -> str:
        now = time.monotonic()
        with self._lock:
            cached = self._urls.get(file.path)
            if cached and cached[1] > now:
                return cached[2]
        params = {**self._params(file), "ChecksumMode": "ENABLED"}
        try:
            url = self.s3.client().generate_presigned_url("get_object", Params=params, ExpiresIn=PRESIGN_SECONDS)
        except Exception as exc:  # noqa: BLE001
            raise self.s3.map_error(exc, self.what(file)) from None
        with self._lock:
            # Renewed well before it expires; temporary credentials may end sooner (then: `refused`).
            self._urls[file.path] = (now, now + PRESIGN_SECONDS / 4, url)
        return url

    def refused(self, file: RemoteFile, resp, what: str) -> Exception | None:
        with self._lock:
            signed_at = self._urls.pop(file.path, (0.0,))[0]
        if time.monotonic() - signed_at < 60:
            return None  # a URL signed a moment ago was refused: really denied
        # Temporary credentials (IRSA, instance roles) can expire before the URL does: re-sign once.
        return httpio.UrlExpired(f"{what}: presigned URL refused (HTTP 403), signing a new one")


def _multipart_etag_parts(etag: str) -> str:
    """The part count a multipart upload's ETag ("MD5OFMD5S-PARTS") carries, or ""."""
    found = _MULTIPART_ETAG.match(etag)
    return found.group(1) if found and int(found.group(1)) > 1 else ""
