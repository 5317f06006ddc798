"""`gs://BUCKET/PREFIX/` as DEST: the files flat under the prefix, through the source's client.

The client and credential chain are agent/sources/gcs.py's (google-auth: GOOGLE_APPLICATION_CREDENTIALS,
workload identity, the metadata server; STORAGE_EMULATOR_HOST), and so is the meaning of its errors.
Every SDK call runs once per attempt (retry=None) inside the source's `call`: one retry policy.

What google-cloud-storage 3.x sends and checks (read in its blob.py and _media/_upload.py):
- up to 8 MiB, one multipart request whose object resource carries the CRC32C of the bytes sent;
  GCS refuses the object if its own differs. The SDK does not compare the answer, so we do (an
  emulator may not refuse).
- above, a resumable upload in --chunk-size pieces (a multiple of 256 KiB): the running CRC32C goes
  in `x-goog-hash` with the last piece (GCS refuses to finalize on a mismatch) and the SDK compares
  the final answer, deleting the object on a mismatch (DataCorruption).
A mismatch is retried: the file is sent again. One that retrying does not cure is exit 5.
Any failed attempt starts the file again, in a new session: going on from where a session stopped
needs its status query (`Content-Range: bytes */SIZE`), which fake-gcs-server answers by finishing
the object empty, so it could not be tested here.

Large files are not split across parallel requests: transfer_manager.upload_chunks_concurrently
needs the XML multipart API, which fake-gcs-server does not serve (404), and a parallel composite
upload leaves objects without an MD5. `push` uploads a few files at a time instead.
"""

from __future__ import annotations

import base64
import io
import threading
from typing import Callable, TypeVar

from ..errors import IntegrityError, Retryable, TransientError
from ..published import RECORDS
from ..sources.base import SourceRef
from ..sources.gcs import GcsSource
from .base import DIGEST_KEY, Destination, Stored, Upload, register

T = TypeVar("T")
CHECKSUM_MISMATCH = "checksum_mismatch"  # the Retryable reason that becomes exit 5 once retries run out
RESUMABLE_UNIT = 256 * 1024  # a resumable upload's pieces are multiples of this


@register
class GcsDestination(Destination):
    schemes = ("gs",)

    @staticmethod
    def parse(text: str) -> SourceRef:
        return GcsSource.parse(text)

    def __init__(self, ref: SourceRef, settings):
        super().__init__(ref, settings)
        self.source = GcsSource(ref, settings)
        self.timeout = (min(30.0, settings.stall_timeout), settings.stall_timeout)
        self.piece = max(RESUMABLE_UNIT, settings.chunk_size // RESUMABLE_UNIT * RESUMABLE_UNIT)

    def _blob(self, key: str, **kw):
        return self.source.client().bucket(self.ref.bucket).blob(key, **kw)

    def _record(self, name: str) -> tuple[str, str]:
        key = self.ref.prefix + RECORDS + name
        return key, f"{self.display()} {RECORDS}{name}"

    def read_record(self, name: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        key, what = self._record(name)

        def read() -> bytes | None:
            try:
                return self._blob(key).download_as_bytes(retry=None, timeout=self.timeout)
            except NotFound:
                return None  # a missing bucket says so at the first listing or write

        return self.source.call(read, what)

    def write_record(self, name: str, data: bytes) -> None:
        key, what = self._record(name)
        kind = "application/json" if name.endswith(".json") else "text/plain"
        # One request (a record is small): an object appears whole or not at all.
        call_checked(self.source, lambda: self._send(key, io.BytesIO(data), len(data), {}, kind, lambda n: None, what),
                     what)

    def delete_record(self, name: str) -> None:
        self._delete(*self._record(name))

    def remove(self, paths: list[str]) -> None:
        for rel in paths:
            self._delete(self.ref.prefix + rel, f"{self.display()} {rel}")

    def _delete(self, key: str, what: str) -> None:
        from google.api_core.exceptions import NotFound

        def delete() -> None:
            try:
                self._blob(key).delete(retry=None, timeout=self.timeout)
            except NotFound:
                pass  # absent is what was asked

        self.source.call(delete, what)

    def stored(self) -> dict[str, Stored]:
        prefix, records = self.ref.prefix, self.ref.prefix + RECORDS

        def listing() -> list[tuple[str, int, str | None]]:
            # The listing carries each object's metadata (projection noAcl): no request per object.
            blobs = self.source.client().list_blobs(self.ref.bucket, prefix=prefix, retry=None, timeout=self.timeout)
            return [(b.name, int(b.size or 0), (b.metadata or {}).get(DIGEST_KEY)) for b in blobs]

        found = {}
        for key, size, digest in self.source.call(listing, self.display()):
            if not key.startswith(records) and not key.endswith("/"):
                found[key[len(prefix):]] = Stored(size, digest)
        return found

    def upload(self, item: Upload, on_bytes: Callable[[int], None]) -> None:
        what = f"{self.display()} {item.path}"

        def attempt() -> None:
            with open(item.local, "rb") as f:
                self._send(self.ref.prefix + item.path, f, item.size, {DIGEST_KEY: item.digest},
                           "application/octet-stream", on_bytes, what)

        call_checked(self.source, attempt, what)

    def _send(self, key: str, f, size: int, metadata: dict, kind: str, on_bytes: Callable[[int], None],
              what: str) -> None:
        """One attempt at putting `size` bytes of `f` at `key`, checked as the module docstring says."""
        from google.api_core.exceptions import BadRequest
        from google.cloud.storage.exceptions import DataCorruption

        blob = self._blob(key, chunk_size=self.piece)
        blob.metadata = metadata or None
        sent = CountingReader(f, on_bytes)
        try:
            blob.upload_from_file(sent, size=size, content_type=kind, checksum="crc32c", retry=None,
                                  timeout=self.timeout)
        except DataCorruption:
            sent.take_back()  # the SDK already deleted the object it could not vouch for
            raise Retryable(CHECKSUM_MISMATCH, f"{what}: the crc32c GCS computed differs from the one "
                                               "of the bytes sent") from None
        except BadRequest as exc:
            sent.take_back()
            if "crc32c" not in str(exc.message).lower():
                raise
            # GCS refused the object: "Provided CRC32C "…" doesn't match calculated CRC32C "…"."
            raise Retryable(CHECKSUM_MISMATCH, f"{what}: GCS refused it, its crc32c differs from the one "
                                               "of the bytes sent") from None
        except BaseException:
            sent.take_back()
            raise
        if blob.crc32c != sent.crc32c():
            sent.take_back()
            self._discard(blob.name, blob.generation)
            raise Retryable(CHECKSUM_MISMATCH, f"{what}: GCS stored crc32c {blob.crc32c}, the bytes sent "
                                               f"have {sent.crc32c()}")

    def _discard(self, key: str, generation) -> None:
        """Delete the one generation this push wrote and cannot vouch for; a newer one is someone else's."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            self._blob(key).delete(if_generation_match=generation, retry=None, timeout=self.timeout)
        except (NotFound, PreconditionFailed):
            pass


class CountingReader:
    """The file as the SDK reads it: reports each piece to on_bytes and keeps the CRC32C of what was read.
    The SDK reads sequentially and, with retry=None, never rewinds within one attempt."""

    def __init__(self, f, on_bytes: Callable[[int], None]):
        import google_crc32c

        self.f, self.on_bytes = f, on_bytes
        self.count = 0
        self.checksum = google_crc32c.Checksum()
        self._lock = threading.Lock()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.checksum.update(data)
        self.count += len(data)
        self.on_bytes(len(data))
        return data

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def crc32c(self) -> str:
        return base64.b64encode(self.checksum.digest()).decode()

    def take_back(self) -> None:
        """The bytes of a failed attempt count for nothing: un-report them (once)."""
        with self._lock:
            count, self.count = self.count, 0
        if count:
            self.on_bytes(-count)


def call_checked(source, fn: Callable[[], T], what: str) -> T:
    """`source.call`, where a checksum mismatch that outlasts the retry budget is integrity (exit 5),
    not a transient failure (exit 7): the store kept disagreeing with the verified local bytes."""
    try:
        return source.call(fn, what)
    except TransientError as exc:
        cause = exc.__cause__
        if isinstance(cause, Retryable) and cause.reason == CHECKSUM_MISMATCH:
            raise IntegrityError(f"{cause}, on each of {source.policy.max_failures} tries") from None
        raise
