"""Where `push` publishes: the small destination interface and the registry that picks one by scheme.

A destination stores files flat under a prefix and a few small records in its `.model-agent/`
folder. It knows nothing of lockfiles or ordering: agent/publish.py decides what goes up, in which
order (the `publishing` record first, the lockfile last). Adding a store adds one module that
calls `register`; nothing names a scheme outside it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from ..errors import InvalidInput
from ..sources.base import SourceRef

if TYPE_CHECKING:
    from ..config import Settings

DIGEST_KEY = "model-agent-digest"  # object metadata: the published etag (sha256 / git sha1) of its bytes


@dataclass(frozen=True)
class Stored:
    """One object already under DEST."""

    size: int
    digest: str | None  # DIGEST_KEY as `upload` set it; None when the store carries none (then: `confirm`)


@dataclass(frozen=True)
class Upload:
    """One file of the snapshot to put at DEST/<path>."""

    path: str  # relative, safe (it came from a lockfile this agent wrote)
    local: Path  # the verified bytes in the staging cache
    size: int
    digest: str  # the published etag: the LFS sha256, or git's blob sha1
    sha256: str | None = None


class Destination(ABC):
    schemes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ref: SourceRef, settings: "Settings"):
        self.ref = ref
        self.settings = settings

    @staticmethod
    @abstractmethod
    def parse(text: str) -> SourceRef:
        """DEST text of this store's form -> SourceRef (the same parser as its source); InvalidInput if bad."""

    @abstractmethod
    def read_record(self, name: str) -> bytes | None:
        """DEST/.model-agent/<name>, or None when there is none."""

    @abstractmethod
    def write_record(self, name: str, data: bytes) -> None:
        """Write DEST/.model-agent/<name> whole: a reader sees all of it or none of it."""

    @abstractmethod
    def delete_record(self, name: str) -> None:
        """Remove DEST/.model-agent/<name>; absent is fine. Done when it returns (readers no longer see it)."""

    @abstractmethod
    def stored(self) -> dict[str, Stored]:
        """Every object under DEST but the `.model-agent/` records, by relative path."""

    @abstractmethod
    def upload(self, item: Upload, on_bytes: Callable[[int], None]) -> None:
        """Put `item.local` at DEST/<item.path>, whole or not at all, with the store's own checksum
        attached (verified by the store on arrival) and DIGEST_KEY in its metadata. Large files go up
        in parallel parts. `on_bytes(n)` as bytes leave (negative if a retry throws some away)."""

    def confirm(self, item: Upload, stored: Stored) -> bool:
        """For a store whose objects carry no DIGEST_KEY: are the bytes at DEST/<path> `item`'s? Only
        said by a store that can tell cheaply (a path re-hashes its file); otherwise uploaded again."""
        return False

    @abstractmethod
    def remove(self, paths: list[str]) -> None:
        """Remove DEST/<path> for each path (files an older commit published that this one has not)."""

    def tidy(self) -> None:
        """After the lockfile is up: remove what killed pushes left (temp files, unfinished uploads).
        One publisher per prefix (the publish Job runs one pod), so nothing left is anyone's."""
        return None

    def display(self) -> str:
        return self.ref.display()

    def close(self) -> None:
        return None


_REGISTRY: dict[str, type[Destination]] = {}


def register(cls: type[Destination]) -> type[Destination]:
    for scheme in cls.schemes:
        _REGISTRY[scheme] = cls
    return cls


def _load() -> None:
    # Imported for their `register` side effect; each imports its SDK lazily.
    from . import azure, gcs, local, oci, s3  # noqa: F401


def parse_destination(text: str) -> SourceRef:
    from ..sources.base import _scheme_of

    _load()
    scheme = _scheme_of(text.strip())
    cls = _REGISTRY.get(scheme)
    if cls is None:
        known = ", ".join(sorted(s + "://" for s in _REGISTRY if s != "file"))
        raise InvalidInput(f"unsupported destination {text!r}: expected a path or one of {known}")
    return cls.parse(text.strip())


def open_destination(ref: SourceRef, settings: "Settings") -> Destination:
    _load()
    return _REGISTRY[ref.scheme](ref, settings)
