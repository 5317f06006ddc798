"""`az://CONTAINER/PREFIX/` (or `https://ACCOUNT.blob.core.windows.net/...`) as DEST: block blobs
flat under the prefix, through the source's container client.

The credential chain is agent/sources/azure.py's (connection string, account key, SAS, Entra ID),
and so is the meaning of its errors; SDK retries are off there (retry_total=0) and every request
runs inside the source's `call`: one retry policy.

A file up to --chunk-size (and 64 MiB, the SDK's single-put limit) goes in one Put Blob. A larger
one in --chunk-size blocks (stage_block), then one Put Block List (commit_block_list) that makes
the blob appear whole. Every request carries the MD5 of its own body (validate_content="md5"),
which the service checks on arrival (400 Md5Mismatch); the commit sets Content-MD5 to the whole
file's MD5, which Put Block List stores unchecked and our Azure reader verifies on every pull.
The blocks are staged here rather than by upload_blob, for three reasons: the whole-file MD5 is
computed as the blocks are read, in one read of the file (upload_blob needs it before the first
byte); a block that fails is sent again alone, not the whole file; and one pool and one gate for
every file of the push keep --workers blocks in flight in all (as the S3 destination's one
transfer manager does), so a push holds at most --workers x --chunk-size bytes in memory.
Metadata names must be C identifiers, so DIGEST_KEY is stored as `model_agent_digest`.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..errors import InvalidInput, Retryable
from ..published import RECORDS
from ..sources.azure import AzureSource
from ..sources.base import SourceRef
from .base import Destination, Stored, Upload, register
from .gcs import CHECKSUM_MISMATCH, call_checked

AZURE_DIGEST_KEY = "model_agent_digest"  # DIGEST_KEY spelled as Azure metadata allows
ONE_PUT = 64 * 2**20  # azure-storage-blob's max_single_put_size: a larger upload_blob is cut in blocks
MAX_BLOCK = 4000 * 2**20  # the service's limits: a block's size, and blocks in one blob
MAX_BLOCKS = 50_000


@register
class AzureDestination(Destination):
    schemes = ("az",)

    @staticmethod
    def parse(text: str) -> SourceRef:
        return AzureSource.parse(text)

    def __init__(self, ref: SourceRef, settings):
        super().__init__(ref, settings)
        self.source = AzureSource(ref, settings)
        self.block = min(settings.chunk_size, MAX_BLOCK)
        self.in_flight = threading.BoundedSemaphore(settings.workers)  # blocks in memory, all files together
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _stager(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="az-block")
            return self._pool

    def _container(self):
        return self.source.container()

    def _record(self, name: str) -> tuple[str, str]:
        return self.ref.prefix + RECORDS + name, f"{self.display()} {RECORDS}{name}"

    def read_record(self, name: str) -> bytes | None:
        from azure.core.exceptions import ResourceNotFoundError

        key, what = self._record(name)

        def read() -> bytes | None:
            try:
                return self._container().download_blob(key).readall()
            except ResourceNotFoundError as exc:
                if exc.error_code == "BlobNotFound":
                    return None
                raise  # ContainerNotFound: exit 4

        return self.source.call(read, what)

    def write_record(self, name: str, data: bytes) -> None:
        from azure.storage.blob import ContentSettings

        key, what = self._record(name)
        kind = "application/json" if name.endswith(".json") else "text/plain"
        settings = ContentSettings(content_type=kind, content_md5=bytearray(hashlib.md5(data).digest()))
        # One Put Blob (a record is small): a blob appears whole or not at all.
        call_checked(self.source, lambda: md5_checked(lambda: self._container().upload_blob(
            key, data, overwrite=True, content_settings=settings, validate_content="md5"), what), what)

    def delete_record(self, name: str) -> None:
        self._delete(*self._record(name))

    def remove(self, paths: list[str]) -> None:
        for rel in paths:
            self._delete(self.ref.prefix + rel, f"{self.display()} {rel}")

    def _delete(self, key: str, what: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        def delete() -> None:
            try:
                self._container().delete_blob(key)
            except ResourceNotFoundError as exc:
                if exc.error_code != "BlobNotFound":
                    raise

        self.source.call(delete, what)

    def stored(self) -> dict[str, Stored]:
        prefix, records = self.ref.prefix, self.ref.prefix + RECORDS

        def listing() -> list[tuple[str, int, dict]]:
            # include=["metadata"]: the digest comes with the listing, no request per blob.
            blobs = self._container().list_blobs(name_starts_with=prefix or None, include=["metadata"])
            return [(b.name, int(b.size), b.metadata or {}) for b in blobs]

        found = {}
        for key, size, meta in self.source.call(listing, self.display()):
            if key.startswith(records) or key.endswith("/") or meta.get("hdi_isfolder") == "true":
                continue  # records, and the folder markers of an ADLS Gen2 account
            found[key[len(prefix):]] = Stored(size, meta.get(AZURE_DIGEST_KEY))
        return found

    def upload(self, item: Upload, on_bytes: Callable[[int], None]) -> None:
        what = f"{self.display()} {item.path}"
        if item.size > MAX_BLOCKS * self.block:
            # Refused before a byte moves: the service would refuse the commit after all of them.
            need = -(-item.size // MAX_BLOCKS)
            raise InvalidInput(f"{what}: {item.size} bytes is more than {MAX_BLOCKS} blocks of --chunk-size "
                               f"{self.block}: use --chunk-size {need} or more")
        if item.size <= min(self.block, ONE_PUT):
            call_checked(self.source, lambda: self._put_whole(item, on_bytes), what)
        else:
            self._put_blocks(item, on_bytes, what)

    def _put_whole(self, item: Upload, on_bytes: Callable[[int], None]) -> None:
        with self.in_flight:
            with open(item.local, "rb") as f:
                data = f.read(item.size)
            settings = self._content_settings(hashlib.md5(data).digest())
            md5_checked(lambda: self._container().upload_blob(
                self.ref.prefix + item.path, data, overwrite=True, validate_content="md5", content_settings=settings,
                metadata={AZURE_DIGEST_KEY: item.digest}), f"{self.display()} {item.path}")
        on_bytes(len(data))

    def _put_blocks(self, item: Upload, on_bytes: Callable[[int], None], what: str) -> None:
        from azure.storage.blob import BlobBlock

        blob = self._container().get_blob_client(self.ref.prefix + item.path)
        whole, ids, staged = hashlib.md5(usedforsecurity=False), [], []
        try:
            with open(item.local, "rb") as f:
                for index in range(-(-item.size // self.block)):
                    if any(s.done() and s.exception() for s in staged):
                        break  # a block failed for good: read no more
                    self.in_flight.acquire()  # released when its stage_block is over, however it ends
                    try:
                        data = f.read(self.block)
                    except BaseException:
                        self.in_flight.release()
                        raise
                    if len(data) != min(self.block, item.size - index * self.block):
                        self.in_flight.release()
                        raise InvalidInput(f"{item.local}: shorter than its locked size {item.size}")
                    whole.update(data)
                    ids.append(f"{index:08d}")  # the SDK base64s it; one length for every block of a blob
                    staged.append(self._stager().submit(self._stage, blob, ids[-1], data, on_bytes, what))
        finally:
            failure = next((e for e in (s.exception() for s in staged) if e is not None), None)  # waits for all
        if failure is not None:
            on_bytes(-sum(s.result() for s in staged if s.exception() is None))
            raise failure
        settings = self._content_settings(whole.digest())
        call_checked(self.source, lambda: blob.commit_block_list(
            [BlobBlock(block_id=i) for i in ids], content_settings=settings,
            metadata={AZURE_DIGEST_KEY: item.digest}), what)

    def _stage(self, blob, block_id: str, data: bytes, on_bytes: Callable[[int], None], what: str) -> int:
        try:
            where = f"{what} block {int(block_id)}"
            call_checked(self.source, lambda: md5_checked(
                lambda: blob.stage_block(block_id, data, length=len(data), validate_content="md5"), where), where)
        finally:
            self.in_flight.release()
        on_bytes(len(data))
        return len(data)

    @staticmethod
    def _content_settings(md5: bytes):
        from azure.storage.blob import ContentSettings

        return ContentSettings(content_type="application/octet-stream", content_md5=bytearray(md5))


def md5_checked(request: Callable[[], object], what: str) -> None:
    """One request whose body carries its MD5: the service's refusal of it is a mismatch to retry."""
    from azure.core.exceptions import HttpResponseError

    try:
        request()
    except HttpResponseError as exc:
        if exc.status_code == 400 and "md5" in f"{exc.error_code} {exc.message}".lower():
            raise Retryable(CHECKSUM_MISMATCH, f"{what}: the service computed another MD5 than the one of the "
                                               "bytes sent") from None
        raise
