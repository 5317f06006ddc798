"""Where things live on the cache volume, and the only code that writes them into place.

Two layouts share one interface: the Hugging Face cache layout (byte-compatible with what
huggingface_hub writes) and a flat `--local-dir`. Every write here is temp-then-rename with
fsync, so a reader sees either the old state or the new one, never half of either.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import InvalidInput

RECORDS_DIR = ".model-agent"
_REPO_TYPE_PREFIX = {"model": "models", "dataset": "datasets"}


def safe_relpath(path: str, *, context: str) -> str:
    """Return `path` if it stays inside the folder it is joined to, else raise InvalidInput.

    Listings come from servers and buckets we do not control: a `../` or absolute name must
    never let them write outside the snapshot.
    """
    bad = (
        not path
        or "\\" in path
        or "\x00" in path
        or path.startswith("/")
        or re.match(r"^[A-Za-z]:", path) is not None
    )
    parts = PurePosixPath(path).parts
    if bad or any(p in ("..", ".", "") for p in path.split("/")) or not parts:
        raise InvalidInput(f"{context}: refusing file name {path!r}: it would escape the destination folder")
    if parts[0] == RECORDS_DIR:
        raise InvalidInput(f"{context}: refusing file name {path!r}: {RECORDS_DIR}/ is reserved for model-agent")
    return path


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # some filesystems do not allow opening directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dirs(folders, *, top: Path) -> None:
    """fsync each folder and every folder above it up to `top`, once each, deepest first.

    For what a commit creates without fsyncing it one by one (snapshot links, duplicate copies, and
    the folders made for them): btrfs does not order such entries through its journal, so they are
    made durable here before a lockfile or marker vouches for them.
    """
    todo: set[Path] = set()
    for folder in folders:
        while folder not in todo:
            todo.add(folder)
            if top not in folder.parents:
                break  # `top` itself, or a folder outside it: nothing above to fsync
            folder = folder.parent
    for folder in sorted(todo, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)


def temp_name(final: Path, suffix: str = "tmp") -> Path:
    """A per-process name next to `final`: a broken lock can never make two writers share it."""
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{suffix}")


def atomic_write(final: Path, data: bytes, *, scratch: Path | None = None) -> None:
    """`scratch`: the folder (on the same file system) that holds the temp file, when a stray temp
    file next to `final` would be read as data (a ref, by huggingface_hub's cache scan)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
        tmp = scratch / tmp.name
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def promote(tmp: Path, final: Path, *, synced: bool = False, fsync_parent: bool = True) -> None:
    """Move a finished, verified temp file to its final name (same folder or same filesystem).

    `synced`: the caller already fsynced the data. `fsync_parent=False`: the caller fsyncs the
    folder itself later (once for many files), before anything that vouches for them is written.
    """
    if not synced:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    if fsync_parent:
        final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    if fsync_parent:
        fsync_dir(final.parent)


def relative_symlink(target: Path, link: Path) -> None:
    """Point `link` at `target` with a relative link, replacing whatever was there atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == rel:
        return
    tmp = temp_name(link, "link")
    try:
        os.symlink(rel, tmp)
        os.replace(tmp, link)
    finally:
        if tmp.is_symlink():
            tmp.unlink()


def repo_folder_name(repo_type: str, repo_id: str) -> str:
    return "--".join([_REPO_TYPE_PREFIX[repo_type], *repo_id.split("/")])


@dataclass(frozen=True)
class HubCacheLayout:
    """`<cache>/models--ORG--NAME/{blobs,snapshots,refs}` plus our records under `.model-agent/`."""

    cache_dir: Path
    repo_type: str
    repo_id: str

    @property
    def root(self) -> Path:
        return self.cache_dir / repo_folder_name(self.repo_type, self.repo_id)

    @property
    def records(self) -> Path:
        return self.root / RECORDS_DIR

    def final_path(self, etag: str, relpath: str) -> Path:
        """Where a verified file's bytes live: the content-addressed blob."""
        return self.root / "blobs" / etag

    def partial_dir(self) -> Path:
        return self.root / "blobs"

    def snapshot_dir(self, commit: str) -> Path:
        return self.root / "snapshots" / commit

    def ref_path(self, revision: str) -> Path:
        return self.root / "refs" / revision

    def lock_path(self, commit: str) -> Path:
        return self.records / f"{commit}.lock.json"

    def ready_path(self, commit: str) -> Path:
        return self.records / f"{commit}.ready"

    def lease_path(self) -> Path:
        # huggingface_hub keeps its own lock files in this folder; a cache scan ignores it.
        return self.cache_dir / ".locks" / repo_folder_name(self.repo_type, self.repo_id) / "model-agent.lease"

    def read_ref(self, revision: str) -> str | None:
        try:
            return self.ref_path(revision).read_text().strip() or None
        except OSError:
            return None

    def link_file(self, commit: str, relpath: str, etag: str) -> Path:
        """Link the snapshot's `relpath` to its blob; returns the folder to fsync before the lockfile."""
        link = self.snapshot_dir(commit) / relpath
        relative_symlink(self.final_path(etag, relpath), link)
        return link.parent

    def write_ref(self, revision: str, commit: str) -> None:
        """`refs/<revision>` holds `commit`; written only when it changes, so a read-only consumer of an
        up-to-date cache never writes. The temp file is made in our records folder: one a kill left
        in refs/ would be a ref to huggingface_hub, naming no commit (a "corrupted" repo).

        A full commit gets `refs/<commit>` too, which huggingface_hub itself does not write:
        `hf cache prune` deletes every snapshot no ref names, and a pinned snapshot must survive it.
        That ref only protects, so a cache that cannot take it (a read-only mount of a snapshot
        pulled before the ref existed) does not fail the pull."""
        if self.read_ref(revision) == commit:
            return
        try:
            atomic_write(self.ref_path(revision), commit.encode(), scratch=self.records)
        except OSError:
            if revision != commit:
                raise


@dataclass(frozen=True)
class LocalDirLayout:
    """Files flat under D (like KServe's /mnt/models); records in `D/.model-agent/`."""

    dest: Path

    @property
    def root(self) -> Path:
        return self.dest

    @property
    def records(self) -> Path:
        return self.dest / RECORDS_DIR

    def final_path(self, etag: str, relpath: str) -> Path:
        return self.dest / relpath

    def partial_dir(self) -> Path:
        return self.records / "partial"

    def lock_path(self, commit: str) -> Path:
        return self.records / "lock.json"

    def ready_path(self, commit: str) -> Path:
        return self.records / "ready"

    def lease_path(self) -> Path:
        return self.records / "lease"

    def read_ref(self, revision: str) -> str | None:
        try:
            return self.ready_path("").read_text().strip() or None
        except OSError:
            return None

    def link_file(self, commit: str, relpath: str, etag: str) -> Path | None:
        return None  # the file already sits at its final path

    def write_ref(self, revision: str, commit: str) -> None:
        return None  # a local dir holds one snapshot; the ready marker names its commit
