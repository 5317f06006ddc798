"""S3 and S3-compatible stores as DEST: `s3://BUCKET/PREFIX/`, laid out as `hf download --local-dir`.

The client, its credential chain, endpoint and path-style handling are the S3 source's (one S3Source
inside), and so are the error meanings and the retry policy: every SDK call runs in `source.call`; the
client makes one attempt per request, but for a part, which is sent again alone (PART_ATTEMPTS, with
our policy's delays) rather than failing its whole file. The bytes go up through s3transfer, boto3's
transfer manager: a file up to --chunk-size in one PUT, a larger one in parallel parts of
--chunk-size, --workers requests at a time across all files.

Each object carries DIGEST_KEY (the published etag) in its metadata and a CRC32 of the whole object,
FULL_OBJECT even when it went up in parts: the store checks every part's CRC32 on arrival and combines
them, and a pull checks the object's with one pass over the file, with no part boundaries to learn (a
COMPOSITE checksum, the SDK's default for parts, needs them: GetObjectAttributes or a HEAD per part).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..errors import AuthError, Retryable
from ..published import RECORDS
from ..sources.base import SourceRef
from ..sources.objstore import require_sdk
from ..sources.s3 import S3Source
from .base import DIGEST_KEY, Destination, Stored, Upload, register

T = TypeVar("T")
MIN_PART = 5 * 2**20  # S3's smallest part (but the last)
MAX_PUT = 5 * 2**30  # S3's largest single PUT
# Parts no larger than this, whatever --chunk-size (the download range) says: measured in bench/push.py,
# 8 MiB parts (also the aws CLI's) took 0.59-0.96x the time of 64 MiB ones in every round: with a few
# large files on 8 workers, the last wave of big parts runs half empty.
UPLOAD_PART_MAX = 8 * 2**20
PART_ATTEMPTS = 3  # sends of one part before its file fails (and goes again whole, under our policy)
CHECKSUM = {"ChecksumAlgorithm": "CRC32", "ChecksumType": "FULL_OBJECT"}
# The store refused the bytes as they arrived (a checksum or payload hash that did not match, a body
# cut short), or an upload vanished under us: the bytes are good on our side, so send them again.
_RESEND_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "IncompleteBody", "NoSuchUpload"}
_GONE = object()  # an object listed, then deleted before its HEAD


@register
class S3Destination(Destination):
    schemes = ("s3",)

    @staticmethod
    def parse(text: str) -> SourceRef:
        return S3Source.parse(text)

    def __init__(self, ref: SourceRef, settings):
        super().__init__(ref, settings)
        self.source = S3Source(ref, settings)
        self._transfers = None  # one s3transfer TransferManager for every file: its pool bounds the requests
        self._checksum = dict(CHECKSUM)
        self._lock = threading.Lock()

    # -- records -----------------------------------------------------------------------------------
    def _record_key(self, name: str) -> str:
        return self.ref.prefix + RECORDS + name

    def read_record(self, name: str) -> bytes | None:
        client, key = self.source.client(), self._record_key(name)

        def get() -> bytes | None:
            try:
                return client.get_object(Bucket=self.ref.bucket, Key=key)["Body"].read()
            except Exception as exc:
                if _code(exc) == "NoSuchKey" or (_status(exc) == 404 and _code(exc) != "NoSuchBucket"):
                    return None
                raise

        return self._call(get, self.display() + RECORDS + name)

    def write_record(self, name: str, data: bytes) -> None:
        # One PUT: S3 shows a reader the old object or the new one, never a part of one.
        client, key = self.source.client(), self._record_key(name)
        self._call(lambda: client.put_object(Bucket=self.ref.bucket, Key=key, Body=data,
                                             ContentType="application/json", ChecksumAlgorithm="CRC32"),
                   self.display() + RECORDS + name)

    def delete_record(self, name: str) -> None:
        client, key = self.source.client(), self._record_key(name)  # absent: S3 answers 204 all the same
        self._call(lambda: client.delete_object(Bucket=self.ref.bucket, Key=key), self.display() + RECORDS + name)

    # -- what is there -----------------------------------------------------------------------------
    def stored(self) -> dict[str, Stored]:
        """The listing, then a HEAD per object for its DIGEST_KEY (listings carry no user metadata).
        The HEADs run in parallel, as many as the client has connections: ~20 ms each on AWS, so a
        model's few dozen files cost one round trip or two, a 10,000-file dataset a few seconds."""
        sizes = self._call(self._list, self.display())
        if not sizes:
            return {}
        with ThreadPoolExecutor(min(len(sizes), max(self.settings.workers, 10)), thread_name_prefix="s3-head") as pool:
            digests = list(pool.map(self._digest_of, sizes))
        return {rel: Stored(sizes[rel], digest) for rel, digest in zip(sizes, digests) if digest is not _GONE}

    def _list(self) -> dict[str, int]:
        prefix, records = self.ref.prefix, self.ref.prefix + RECORDS
        pages = self.source.client().get_paginator("list_objects_v2").paginate(Bucket=self.ref.bucket, Prefix=prefix)
        return {o["Key"][len(prefix):]: int(o["Size"]) for page in pages for o in page.get("Contents", [])
                if not o["Key"].startswith(records) and not o["Key"].endswith("/")}  # records, folder markers

    def _digest_of(self, rel: str):
        client, key = self.source.client(), self.ref.prefix + rel

        def head():
            try:
                return client.head_object(Bucket=self.ref.bucket, Key=key).get("Metadata", {}).get(DIGEST_KEY)
            except Exception as exc:
                if _status(exc) == 404:
                    return _GONE
                raise

        return self._call(head, f"{self.display()}{rel}")

    # -- bytes -------------------------------------------------------------------------------------
    def upload(self, item: Upload, on_bytes: Callable[[int], None]) -> None:
        """The whole file under our retry policy: a part that failed PART_ATTEMPTS times, or a failed
        PUT or CreateMultipartUpload, fails the transfer (s3transfer then aborts its multipart upload),
        and the next attempt sends the file again from its first byte."""
        progress = _Progress(on_bytes)

        def attempt() -> None:
            try:
                manager = self._manager()
                with self._lock:  # submitting is quick; TransferManager's ids are not counted thread-safely
                    future = manager.upload(str(item.local), self.ref.bucket, self.ref.prefix + item.path,
                                            extra_args={"Metadata": {DIGEST_KEY: item.digest}, **self._checksum},
                                            subscribers=[progress.subscriber()])
                future.result()
            except BaseException:
                progress.take_back()  # what this attempt sent is thrown away with it
                raise

        self._call(attempt, f"{self.display()}{item.path}")

    def _manager(self):
        with self._lock:
            if self._transfers is None:
                manager = require_sdk("s3transfer.manager", "s3", self.display())
                chunk = max(min(self.settings.chunk_size, UPLOAD_PART_MAX), MIN_PART)
                config = manager.TransferConfig(
                    multipart_threshold=min(chunk + 1, MAX_PUT),  # up to one chunk: a single PUT
                    multipart_chunksize=chunk,  # raised by s3transfer when a file would need > 10,000 parts
                    max_request_concurrency=self.settings.workers,
                )
                client = self.source.client()
                for operation in ("UploadPart", "CompleteMultipartUpload"):
                    client.meta.events.register(f"needs-retry.s3.{operation}", self._retry_in_place)
                self._transfers = manager.TransferManager(client, config)
                # Before FULL_OBJECT (s3transfer < 0.11) parts get a COMPOSITE checksum, which a pull
                # also verifies, at the part boundaries it then has to learn.
                self._checksum = {k: v for k, v in CHECKSUM.items() if k in manager.TransferManager.ALLOWED_UPLOAD_ARGS}
            return self._transfers

    def _retry_in_place(self, attempts: int, response=None, caught_exception=None, operation=None, **kwargs):
        """botocore's needs-retry event for a part (and the completion): a part that failed in a way
        worth another try is sent again by itself, up to PART_ATTEMPTS times with our policy's delays,
        instead of failing the file, which s3transfer would then abort: a 10 GiB file would start over
        for one lost 64 MiB part. The SDK rewinds the part's body (on_bytes gets the negative count)."""
        if caught_exception is not None:
            failure = caught_exception
        elif response is not None and response[0].status_code >= 300:
            from botocore.exceptions import ClientError

            failure = ClientError(response[1], operation.name if operation else "UploadPart")
        else:
            return None
        code = _code(failure)
        resend = code in _RESEND_CODES and code != "NoSuchUpload"  # an upload gone: the whole file, anew
        mapped = None if resend else self.source.map_error(failure, self.display())
        if attempts >= PART_ATTEMPTS or not (mapped is None or isinstance(mapped, Retryable)):
            return None
        delay = self.source.policy.delay(attempts, None, random.random)
        self.source.on_retry(f"s3_{code}" if mapped is None else mapped.reason, delay, failure)
        return delay

    # -- housekeeping ------------------------------------------------------------------------------
    def remove(self, paths: list[str]) -> None:
        """DeleteObjects, 1,000 keys a request. It answers 200 with a list of the keys it could not
        delete: the first of those is raised as the error it is (AccessDenied: exit 3)."""
        client = self.source.client()
        for start in range(0, len(paths), 1000):
            batch = paths[start:start + 1000]

            def delete(batch=batch) -> None:
                got = client.delete_objects(Bucket=self.ref.bucket, Delete={
                    "Objects": [{"Key": self.ref.prefix + p} for p in batch], "Quiet": True})
                for failed in got.get("Errors", [])[:1]:
                    from botocore.exceptions import ClientError

                    code = failed.get("Code", "")
                    status = 403 if code == "AccessDenied" else 500 if code == "InternalError" else 400
                    raise ClientError({"Error": {"Code": code, "Message": failed.get("Message", "")},
                                       "ResponseMetadata": {"HTTPStatusCode": status}}, "DeleteObjects")

            self._call(delete, f"{self.display()}: removing {len(batch)} object(s) of the previous commit")

    def tidy(self) -> None:
        """Abort the unfinished multipart uploads under the prefix: a push killed mid-file leaves its
        parts stored (and billed) until aborted. One publisher per prefix, and this push's own uploads
        are all complete or aborted by now, so every one left is a dead push's. Without permission to
        list or abort them (s3:ListBucketMultipartUploads, s3:AbortMultipartUpload), they are left to
        the bucket's lifecycle rule (AbortIncompleteMultipartUpload)."""
        client = self.source.client()

        def unfinished() -> list[tuple[str, str]]:
            pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=self.ref.bucket, Prefix=self.ref.prefix)
            return [(u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", [])]

        try:
            for key, upload_id in self._call(unfinished, f"{self.display()}: unfinished uploads"):
                self._call(lambda key=key, upload_id=upload_id: _abort(client, self.ref.bucket, key, upload_id),
                           f"{self.display()}{key[len(self.ref.prefix):]}: an unfinished upload")
        except AuthError:
            return

    def close(self) -> None:
        with self._lock:
            transfers, self._transfers = self._transfers, None
        if transfers is not None:
            transfers.shutdown(cancel=True)  # anything still going is aborted, never completed later

    # -- errors ------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T], what: str) -> T:
        """`source.call` (its retry policy and error meanings), and bytes the store refused on arrival
        sent again instead of failing the push as an unknown S3 error (exit 1)."""
        def attempt() -> T:
            try:
                return fn()
            except Exception as exc:
                code = _code(exc)
                if code in _RESEND_CODES:
                    raise Retryable(f"s3_{code}", f"{what}: the store refused the bytes as they arrived ({code}); "
                                                  "sending them again") from None
                raise

        return self.source.call(attempt, what)


class _Progress:
    """s3transfer's progress events -> on_bytes, and the count of one attempt to take back if it fails."""

    def __init__(self, on_bytes: Callable[[int], None]):
        self.on_bytes = on_bytes
        self.sent = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.sent += n
        self.on_bytes(n)  # negative when the SDK rewinds a part to send it again

    def take_back(self) -> None:
        with self._lock:
            sent, self.sent = self.sent, 0
        if sent:
            self.on_bytes(-sent)

    def subscriber(self):
        from s3transfer.subscribers import BaseSubscriber

        progress = self

        class Subscriber(BaseSubscriber):
            def on_progress(self, future, bytes_transferred, **kwargs):
                progress.add(bytes_transferred)

        return Subscriber()


def _abort(client, bucket: str, key: str, upload_id: str) -> None:
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as exc:
        if _code(exc) != "NoSuchUpload" and _status(exc) != 404:
            raise


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
