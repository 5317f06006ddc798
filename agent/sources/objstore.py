"""What the object-store backends (s3://, gs://, az://) and the mounted-path source share.

A bucket has no revisions, so its identity is its content: the sha1 of the sorted manifest lines
`path\\tsize\\tversion\\n` (DESIGN.md, "On disk"). The same bucket state always yields the same
snapshot folder, and a pull of an unchanged bucket is a no-op. Every byte read afterwards is pinned
to the listed version (If-Match, generation, VersionId): if an object changes under a running
pull, the read fails with `SourceChanged` (exit 7, retryable) instead of mixing old and new.

A prefix that mirrors a Hub snapshot (a published lockfile, or an `hf download --local-dir` tree) is
read back with the Hub's identity instead: agent/mirror.py recognises it from the raw listing.
"""

from __future__ import annotations

import hashlib
import re
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

from .. import httpio
from ..errors import AgentError, InvalidInput, NotFound, Retryable, TransientError
from ..keepalive import KeepAlivePool
from ..layout import safe_relpath
from ..mirror import SMALL_MAX, Mirror, is_bookkeeping, recognise
from ..retry import RetryPolicy, call_with_retry
from .base import RangeGate, RangeReader, RangesIgnored, RemoteFile, Source, SourceRef

T = TypeVar("T")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_SAFE_KEY = re.compile(r"[^A-Za-z0-9._-]")


class SourceChanged(TransientError):
    """An object changed (or vanished) after the listing this pull is pinned to.

    Exit 7: the Job's retry resolves the new bucket state and pulls that, whole. Nothing of the
    interrupted pull is marked ready, so no snapshot ever mixes the two states.
    """

    kind = "source_changed"


def require_sdk(module: str, extra: str, what: str):
    """Import an optional cloud SDK, or say which extra installs it (exit 2)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise InvalidInput(f"{what}: this source needs the '{extra}' extra: pip install 'model-agent[{extra}]' "
                           f"(Python module {module} is missing)") from None


def content_id(files: Iterable[RemoteFile]) -> str:
    """sha1 hex of the sorted lines `path\\tsize\\tversion\\n`: the snapshot folder of a bucket state."""
    lines = sorted(f"{f.path}\t{f.size}\t{f.version.get('content_version', '')}\n" for f in files)
    return hashlib.sha1("".join(lines).encode()).hexdigest()


def content_key(*parts: str) -> str:
    """A file-system-safe blob / partial-file name from a store's own content identifiers."""
    return _SAFE_KEY.sub("_", "-".join(p for p in parts if p))[:200]


def parse_bucket_uri(text: str, scheme: str, *, account: str = "") -> SourceRef:
    """`scheme://bucket/prefix` -> SourceRef. The prefix always names a folder (ends in '/')."""
    body = text.split("://", 1)[1] if "://" in text else text
    bucket, _, prefix = body.partition("/")
    if not _BUCKET.match(bucket):
        raise InvalidInput(f"invalid source {text!r}: expected {scheme}://BUCKET/PREFIX/")
    prefix = prefix.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # `s3://b/llama` means the folder llama/, never also llama-2/...
    return SourceRef(scheme=scheme, bucket=bucket, prefix=prefix, account=account)


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object, before its key is turned into a safe relative path."""

    key: str
    size: int
    content_version: str  # what the content id hashes: changes whenever the bytes may have
    etag: str  # content key: blob name in the HF layout, partial-file key
    checksums: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # lockfile fields: etag, version_id, generation, ...


class ObjectStoreSource(Source):
    """resolve = list + content id; list_files = that same listing; readers pinned per object."""

    logger = None  # set by the pipeline when it has one
    has_revisions = False

    def __init__(self, ref: SourceRef, settings):
        super().__init__(ref, settings)
        self.policy = RetryPolicy(settings.retry_max_failures, settings.retry_base_delay)
        self.on_retry: Callable[[str, float, Exception], None] = lambda reason, delay, exc: None
        self._files: list[RemoteFile] | None = None
        self._mirror: Mirror | None = None  # what the listing showed the prefix to be, if a mirror
        self._failure: AgentError | None = None  # a listing that failed before the pull ran (see default_revision)

    # -- what each backend provides ---------------------------------------------------------------
    @abstractmethod
    def list_objects(self) -> Iterator[ObjectInfo]:
        """Every object under the prefix, raw (markers and bookkeeping folders included); SDK errors may escape."""

    @abstractmethod
    def map_error(self, exc: Exception, what: str) -> Exception:
        """The contract's meaning of an SDK error: AuthError, NotFound, Retryable, InvalidInput..."""

    # -- the Source interface ---------------------------------------------------------------------
    def default_revision(self) -> str:
        """`main`, or the revision a published prefix names. Asked before the pull runs (and by `wait`):
        a listing that fails here is kept and raised by resolve(), where a pull reports its errors, and
        `wait` carries on with `main` as before. Offline, nothing is listed."""
        if self.settings.offline:
            return "main"
        try:
            found = self.mirror()
        except AgentError as exc:
            self._failure = exc
            return "main"
        return found.revision if found is not None and found.revision else "main"

    def layout_repo(self) -> tuple[str, str]:
        from .huggingface import check_repo_id

        if self.settings.repo_id:  # wins over a lockfile's name; nothing listed (`wait` needs no bucket access)
            return "model", check_repo_id(self.settings.repo_id)
        found = None if self.settings.offline else self.mirror()
        if found is not None and found.repo_id:
            return found.repo_type, check_repo_id(found.repo_id)
        if found is not None:
            raise InvalidInput(f"{self.ref.display()}: a tree made by hf download --local-dir does not say which repo "
                               "it is: give --repo-id ORG/NAME (or pull it with --local-dir DIR)")
        raise InvalidInput(f"{self.ref.display()}: an object-store source needs --local-dir DIR, or --repo-id "
                           "ORG/NAME to store it in the Hugging Face cache layout under that name")

    def resolve(self, revision: str) -> str:
        from .huggingface import check_revision

        check_revision(revision)
        found = self.mirror()
        if found is not None:
            return found.resolve(revision, self.ref.display())
        return content_id(self.listing())

    def list_files(self, commit: str) -> list[RemoteFile]:
        files = self.listing()
        if self._mirror is not None:
            self._mirror.check_commit(commit, self.ref.display())
            return files
        now = content_id(files)
        if now != commit:
            raise NotFound(f"{self.ref.display()}: content id {commit[:12]} is not what the source holds now "
                           f"({now[:12]}); pull without a content id to take the current state")
        return files

    # -- shared machinery -------------------------------------------------------------------------
    def call(self, fn: Callable[[], T], what: str) -> T:
        def attempt() -> T:
            try:
                return fn()
            except (AgentError, Retryable):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a meaning right here
                raise self.map_error(exc, what) from None

        return call_with_retry(attempt, policy=self.policy, what=what, on_retry=self.on_retry)

    def mirror(self) -> Mirror | None:
        self.listing()
        return self._mirror

    def listing(self) -> list[RemoteFile]:
        if self._failure is not None:
            raise self._failure
        if self._files is None:
            what = self.ref.display()
            objects = self.relative(self.call(lambda: list(self.list_objects()), what))
            settings = self.settings
            found = recognise(objects, lambda paths: self.read_small(objects, paths), what=what,
                              include=settings.include, exclude=settings.exclude, warn=self.warn)
            self._mirror = found
            if found is not None:
                self._files = list(found.files)
            else:
                self._files = self.to_files({rel: o for rel, o in objects.items() if not is_bookkeeping(rel)})
        return self._files

    def relative(self, objects: list[ObjectInfo]) -> dict[str, ObjectInfo]:
        """The listing by path under the prefix, without zero-byte "directory markers": `x/` (S3 consoles,
        s3fs) or `x` with objects under it (ADLS Gen2, some sync tools). Skipped as azcopy does; a real
        file there could not be written next to the folder anyway (agent/plan.py refuses other clashes)."""
        folders = {key[:i] for key in (o.key for o in objects) for i, c in enumerate(key) if c == "/"}
        prefix = self.ref.prefix
        return {o.key.removeprefix(prefix): o for o in objects
                if not (o.size == 0 and (o.key.endswith("/") or o.key in folders))}

    def to_files(self, objects: dict[str, ObjectInfo]) -> list[RemoteFile]:
        what = self.ref.display()
        files = [RemoteFile(path=safe_relpath(rel, context=what), size=obj.size, etag=obj.etag,
                            checksums=dict(obj.checksums), version={**obj.record, "content_version": obj.content_version})
                 for rel, obj in objects.items()]
        if not files:
            raise NotFound(f"{what}: no objects under this prefix")
        return files

    def read_small(self, objects: dict[str, ObjectInfo], paths: list[str]) -> dict[str, bytes]:
        """Whole small objects (a lockfile, download metadata), read as the files are: pinned to the
        listed version, retried, several at a time (a tree has one metadata file per model file)."""
        what = self.ref.display()
        reader = self.reader("http", "")

        def one(rel: str) -> bytes:
            obj = objects[rel]
            if obj.size > SMALL_MAX:
                raise InvalidInput(f"{what} {rel}: {obj.size} bytes, too large for a lockfile or metadata file")
            file = RemoteFile(path=rel, size=obj.size, etag=obj.etag,
                              version={**obj.record, "content_version": obj.content_version})
            return self.call(lambda: b"".join(bytes(p) for p in reader.read_range(file, 0, file.size)), f"{what} {rel}")

        try:
            with ThreadPoolExecutor(max(1, min(16, self.settings.workers, len(paths)))) as pool:
                return dict(zip(paths, pool.map(one, paths)))
        finally:
            reader.close()

    def warn(self, event: str, message: str, **fields) -> None:
        if self.logger is not None:
            self.logger.warn(event, message, **fields)


class PinnedHttpReader(RangeReader):
    """Ranged GETs over keep-alive connections (the fastest reader measured, see bench/objstore.py).

    A backend supplies the URL and headers of a pinned read; this class owns the HTTP rules:
    a 206 must start where asked, a 412 or 404 means the object changed since the listing.
    """

    name = "http"

    def __init__(self, source: ObjectStoreSource):
        self.source = source
        settings = source.settings
        self.pool = KeepAlivePool(connect_timeout=min(30.0, settings.stall_timeout), read_timeout=settings.stall_timeout)
        self.gate = RangeGate()

    @abstractmethod
    def request_for(self, file: RemoteFile, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        """(url, headers) of a GET pinned to the listed version of `file`."""

    def check_version(self, file: RemoteFile, headers, what: str) -> None:
        """Refuse a response whose validator says it is another version than the listed one: its ETag
        (S3, Azure); a store that pins by something else (GCS: the generation) overrides this."""
        got = (headers.get("ETag") or "").strip('"')
        if got and file.version.get("etag") and got != file.version["etag"]:
            raise changed(self.source, file, f"ETag is now {got}")

    def refused(self, file: RemoteFile, resp, what: str) -> Exception | None:
        """A backend's own reading of a 403 (an expired presigned URL...), or None."""
        return None

    def learn_checksums(self, file: RemoteFile, headers) -> None:
        """Record checksums a whole-object response offers beyond the listing (S3's x-amz-checksum-*)."""

    def before_ranged_read(self, file: RemoteFile) -> None:
        """Called before every ranged GET of `file` (S3 learns the object's checksum here, once)."""

    def what(self, file: RemoteFile) -> str:
        return f"{self.source.ref.display()} {file.path}"

    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[memoryview]:
        return self._read(file, start, end, None)

    def read_range_into(self, file: RemoteFile, start: int, end: int, buf: memoryview) -> Iterator[int]:
        return self._read(file, start, end, buf)

    def _read(self, file: RemoteFile, start: int, end: int, buf: memoryview | None) -> Iterator:
        """Pieces of our read buffer, or (`buf` given) units read straight into the caller's buffer."""
        what = self.what(file)
        whole = (start == 0 and end == file.size) or file.size == 0
        headers = {"Accept-Encoding": "identity", "User-Agent": "model-agent"}
        if not whole:
            headers["Range"] = f"bytes={start}-{end - 1}"
            self.before_ranged_read(file)
        probe, honoured = not whole and self.gate.enter(file.path), None
        try:
            url, headers = self.request_for(file, headers)
            resp = self.pool.get(url, headers, what)
            honoured = {206: True, 200: False}.get(resp.status)
        finally:
            if probe:
                self.gate.leave(file.path, honoured)
        status = resp.status
        if status in (200, 206):
            try:
                self.check_version(file, resp.headers, what)
                if whole and status == 200:
                    self.learn_checksums(file, resp.headers)
                if status == 206:
                    httpio.check_content_range(resp.headers, start, end, file.size, what)
            except BaseException:
                resp.drain()
                raise
            if status == 200 and not whole:  # a server that ignores Range: the transfer streams the file
                self.gate.leave(file.path, False)
                raise RangesIgnored(file.path, resp.pieces(what), resp.release)
            yield from (resp.pieces(what) if buf is None else resp.units(buf, what))
            return
        resp.drain()
        if status in (404, 412):
            raise changed(self.source, file, f"HTTP {status}")
        if status == 403:
            special = self.refused(file, resp, what)
            if special is not None:
                raise special
        raise httpio.classify_status(status, resp.headers, what)

    def close(self) -> None:
        self.pool.close()


def changed(source: Source, file: RemoteFile, detail: str) -> SourceChanged:
    return SourceChanged(f"{source.ref.display()} {file.path}: changed or removed since the listing this pull is "
                         f"pinned to ({detail}); nothing was marked ready; pull again to get the new state")
