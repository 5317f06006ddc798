"""The small source interface and the registry that picks a backend by URI scheme.

A source does three things: resolve what the user asked for to an immutable id, list the files
at that id, and hand out a reader of byte ranges pinned to that id. Adding a backend adds one
module that calls `register`; the pipeline never learns scheme names.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Iterator

from ..ahead import units_of
from ..errors import InvalidInput

if TYPE_CHECKING:
    from ..ahead import AheadBudget
    from ..config import Settings


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative, already checked by layout.safe_relpath
    size: int
    etag: str  # content key: the blob name in the HF layout, the partial-file key everywhere
    checksums: dict = field(default_factory=dict, compare=False)  # algo -> hex: sha256, git_sha1, md5
    xet_hash: str | None = None
    version: dict = field(default_factory=dict, compare=False)  # recorded in the lockfile

    @property
    def sha256(self) -> str | None:
        return self.checksums.get("sha256")


@dataclass(frozen=True)
class SourceRef:
    """A SOURCE argument parsed once into a typed value."""

    scheme: str
    repo_id: str = ""  # Hub repos; for object stores, --repo-id (HF layout) if given
    repo_type: str = "model"
    revision: str | None = None  # from `hf://org/name@rev`
    bucket: str = ""
    prefix: str = ""
    account: str = ""
    path: str = ""

    def display(self) -> str:
        """Credential-free text for logs, lockfiles and errors."""
        if self.scheme == "hf":
            kind = "datasets/" if self.repo_type == "dataset" else ""
            return f"hf://{kind}{self.repo_id}"
        if self.scheme == "file":
            return f"file://{self.path}"
        if self.scheme == "oci":
            return self.path  # the reference as written: oci://REGISTRY/REPOSITORY[:TAG][@DIGEST]
        return f"{self.scheme}://{self.bucket}/{self.prefix}"

    def model_id(self) -> str:
        """The bounded `model` label of every metric: the repo id, else the bucket path."""
        return self.repo_id or self.display()

    def known_as(self, repo_id: str | None) -> "SourceRef":
        """This source under `repo_id` (--repo-id, a models file's `repo_id`): a bucket or folder is
        stored and labelled by that name; a Hub repo keeps its own."""
        if not repo_id or self.scheme == "hf":
            return self
        return replace(self, repo_id=repo_id)


class RangesIgnored(Exception):
    """A ranged request of a file was answered with 200 and the whole body: the server ignores
    Range (some Hub mirrors and proxies), or the entity changed behind If-Range. Re-reading the body
    from byte 0 for every range would make the download quadratic, so the transfer takes the file
    as one stream from byte 0 instead (Transfer._stream_whole), starting with the body that came."""

    def __init__(self, path: str, body: Iterator[bytes | memoryview] | None = None,
                 discard: Callable[[], None] = lambda: None):
        super().__init__(f"{path}: the server answered a ranged request with the whole file")
        self.path = path
        self.body = body  # the whole file from byte 0, already on its way, or None
        self.discard = discard  # closes that body's connection if nobody reads it (safe to call twice)


class RangeGate:
    """Sends the first ranged request of each file alone: until its answer shows whether the server
    honours Range, the file's other ranges wait (one round trip, once per file per pull). Otherwise a
    server that ignores Range would get one request per worker at once, each answered with the whole
    body, and all but one thrown away. Once a file is known to come back whole, its ranged reads
    raise `RangesIgnored` without asking."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, threading.Event | bool] = {}  # path -> probe out, or Range honoured

    def enter(self, path: str) -> bool:
        """Before a ranged request of `path`: True if the caller is its probe (then `leave` it)."""
        while True:
            with self._lock:
                state = self._state.get(path)
                if state is None:
                    self._state[path] = threading.Event()
                    return True
            if state is True:
                return False
            if state is False:
                raise RangesIgnored(path)
            state.wait()  # bounded: the probe's request ends within its stall timeout

    def leave(self, path: str, honoured: bool | None) -> None:
        """The probe's answer: Range honoured (206), ignored (200), or unknown (an error: the next probes)."""
        with self._lock:
            probe = self._state.pop(path, None)
            if honoured is not None:
                self._state[path] = honoured
        if isinstance(probe, threading.Event):
            probe.set()


def fill_units(pieces: Iterable[bytes | memoryview], buf: memoryview) -> Iterator[int]:
    """Regroup a stream of pieces into buffer-fulls of `buf` (see RangeReader.read_range_into)."""
    return (n for n, _ in units_of(pieces, buf))


class RangeReader(ABC):
    """Reads byte ranges of listed files. Raises `Retryable` for what is worth another try."""

    ranged: ClassVar[bool] = True  # False: only whole files (partials cannot be resumed)
    name: ClassVar[str] = ""
    # Set by readers whose read_range pieces are immutable and owned by nobody else: the transfer may
    # keep those that land ahead of a file's hashing frontier, within this budget (agent/ahead.py).
    ahead_budget: "AheadBudget | None" = None

    @abstractmethod
    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[bytes | memoryview]:
        """Yield the bytes [start, end) of `file`, in order. Raise `RangesIgnored`, before yielding
        anything, when a range other than the whole file comes back as the whole file."""

    def read_range_into(self, file: RemoteFile, start: int, end: int, buf: memoryview) -> Iterator[int]:
        """The bytes [start, end) of `file` through `buf`, a buffer-full at a time: each `n` yielded
        means buf[:n] holds the next n bytes (n == len(buf) but for the last), to be used before the
        next. Readers that can read straight into `buf` override this copy."""
        return fill_units(self.read_range(file, start, end), buf)

    def fetch_whole(self, file: RemoteFile, dest: str, on_bytes: Callable[[int], None]) -> None:
        raise NotImplementedError

    def range_size(self, default: int) -> int:
        """How large the parallel ranges of one file should be for this reader."""
        return default

    def streams(self, workers: int, nbytes: int | None = None) -> int:
        """How many of this reader's ranges may be in flight at once, given --workers and the bytes it
        is to move in this run (None: the most it would ever use)."""
        return workers

    def for_file(self, file: RemoteFile) -> "RangeReader":
        """The reader that handles `file`: composite readers pick per file (xet or http)."""
        return self

    def close(self) -> None:
        return None


class Source(ABC):
    schemes: ClassVar[tuple[str, ...]] = ()
    # True when an older state can be asked for again (a Hub revision): its partial downloads are
    # worth keeping a while. A bucket's or a folder's old state never comes back by name.
    has_revisions: ClassVar[bool] = True

    def __init__(self, ref: SourceRef, settings: "Settings"):
        self.ref = ref
        self.settings = settings

    @staticmethod
    @abstractmethod
    def parse(text: str) -> SourceRef:
        """Parse SOURCE text of this backend's form; raise InvalidInput when malformed."""

    @abstractmethod
    def resolve(self, revision: str) -> str:
        """Turn a revision (or bucket state) into an immutable id: a 40-hex commit or content id."""

    @abstractmethod
    def list_files(self, commit: str) -> list[RemoteFile]:
        """Every file at that id, with size and checksum."""

    @abstractmethod
    def reader(self, engine: str, commit: str) -> RangeReader:
        """A reader pinned to `commit` for the chosen engine (`auto`: the source picks per file)."""

    def default_revision(self) -> str:
        return self.ref.revision or "main"

    def layout_repo(self) -> tuple[str, str]:
        """(repo_type, repo_id) under which the HF cache layout stores this source."""
        return self.ref.repo_type, self.ref.repo_id

    def close(self) -> None:
        return None


_REGISTRY: dict[str, type[Source]] = {}


def register(cls: type[Source]) -> type[Source]:
    for scheme in cls.schemes:
        _REGISTRY[scheme] = cls
    return cls


def _scheme_of(text: str) -> str:
    m = re.match(r"^([a-z][a-z0-9+.-]*)://", text)
    if m:
        if m.group(1) == "https" and ".blob.core.windows.net/" in text:
            return "az"  # Azure's own URL form names the account in the host
        return m.group(1)
    if text.startswith("/"):
        return "file"
    return "hf"  # ORG/NAME, the form everyone types


def _load_backends() -> None:
    # Imported for their `register` side effect; each backend imports its SDK lazily.
    from . import huggingface  # noqa: F401

    try:
        from . import local  # noqa: F401
    except ImportError:
        pass
    # Object stores: their SDKs are optional extras, imported only when a pull needs them.
    from . import azure, gcs, oci, s3  # noqa: F401


def parse_source(text: str) -> SourceRef:
    _load_backends()
    scheme = _scheme_of(text.strip())
    cls = _REGISTRY.get(scheme)
    if cls is None:
        known = ", ".join(sorted(s + "://" for s in _REGISTRY))
        raise InvalidInput(f"unsupported source {text!r}: expected ORG/NAME or one of {known}")
    return cls.parse(text.strip())


def open_source(ref: SourceRef, settings: "Settings") -> Source:
    _load_backends()
    return _REGISTRY[ref.scheme](ref, settings)
