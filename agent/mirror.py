"""A prefix that mirrors a Hub snapshot, recognised from its bookkeeping and read back with the Hub's identity.

Buckets and paths are listed raw; this module decides what the listing is (DESIGN.md, "Publishing"):

- a **published** prefix: `.model-agent/lock.json`, written last by `push` (or a `pull --local-dir`
  folder's own lockfile of a Hub pull: the same schema). It names the repo, the revision, the original
  commit and every file's size and Hub etag;
- a tree made by **`hf download --local-dir`**: `.cache/huggingface/download/<path>.metadata` (three
  lines: commit, etag, timestamp; huggingface_hub's _local_folder.py) and, when `snapshot_download`
  made it, the commit's whole file listing `.cache/huggingface/trees/<commit>.json` (_tree_cache.py);
- neither: a plain folder, stored under its content id as before.

Either way the bookkeeping folders never enter a snapshot. A mirror's files carry the Hub's blob name
as their etag and the published sha256 / git blob sha1 as a checksum, on top of the store's own
version (the reads stay pinned to it), so a consumer pinned to the Hub commit cannot tell the pull
from one from the Hub, and a mirror that is not what it claims fails the pull (exit 5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import InvalidInput, NotFound, TransientError
from .layout import safe_relpath
from .plan import _match as glob_match  # the one rule for --include/--exclude, huggingface_hub's
from .published import (HEX40, LOCK_NAME, PUBLISHING_NAME, RECORDS, PublishedFile, PublishedLock, parse_lock,
                        published_file)
from .sources.base import RemoteFile

if TYPE_CHECKING:
    from .sources.objstore import ObjectInfo

HF_FOLDER = ".cache/huggingface/"  # huggingface_hub's bookkeeping in a --local-dir tree
BOOKKEEPING = (RECORDS, HF_FOLDER)
HF_DOWNLOAD = HF_FOLDER + "download/"
HF_TREES = HF_FOLDER + "trees/"
METADATA = ".metadata"
SMALL_MAX = 64 * 2**20  # a lockfile or tree listing larger than this is not one (100k files: ~20 MB)
NAMES_SHOWN = 5
# What a published digest covers: the store's MD5 re-checks the same bytes at a third of sha256's speed.
COVERED = ("md5", "md5_base64")

Read = Callable[[list[str]], dict[str, bytes]]  # paths under the prefix -> their bytes (small objects)
Warn = Callable[..., None]  # Logger.warn's signature: (event, message, **fields)


class BeingPublished(TransientError):
    """`.model-agent/publishing` without a lockfile: a push is under way, or one died. Exit 7: the
    Job's retry finds the lockfile once the push finishes (or a re-run of the push repairs it)."""

    kind = "being_published"


class MirrorIncomplete(TransientError):
    """A mirror names files it does not hold (at their size): still filling, or a push rewriting it."""

    kind = "mirror_incomplete"


def is_bookkeeping(path: str) -> bool:
    return path.startswith(BOOKKEEPING)


def selected(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return (not include or any(glob_match(path, p) for p in include)) and not any(glob_match(path, p) for p in exclude)


def repo_path(path: str, what: str) -> str:
    """A path a lockfile or tree listing names, checked as any listed key: never outside the snapshot,
    never into a bookkeeping folder (which no snapshot holds)."""
    path = safe_relpath(path, context=what)
    if is_bookkeeping(path):
        raise InvalidInput(f"{what}: refusing file name {path!r}: {path.split('/')[0]}/ is bookkeeping, never model data")
    return path


def some(names: list[str]) -> str:
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more


@dataclass(frozen=True)
class Mirror:
    kind: str  # "published" or "hf download tree"
    repo_id: str  # "" for a tree: it does not say (--repo-id names it)
    repo_type: str
    revision: str | None  # the published revision name; a tree does not say (then: "main")
    commit: str  # the Hub commit
    files: tuple[RemoteFile, ...]

    def describe(self) -> str:
        name = f"{self.repo_id}@{self.revision} " if self.repo_id and self.revision else ""
        return f"{self.kind} {name}(commit {self.commit[:12]})"

    def resolve(self, revision: str, what: str) -> str:
        """The commit a revision names here. A published prefix answers to its revision and commit only;
        a tree to its commit and to any revision name (it says none: the name only labels refs/)."""
        if self.kind == "published" and revision not in (self.revision, self.commit):
            raise NotFound(f"{what}: {self.describe()} holds no revision {revision!r}: "
                           f"pull --revision {self.revision} or --revision {self.commit}")
        if HEX40.match(revision) and revision != self.commit:
            raise NotFound(f"{what}: {self.describe()} holds another commit than {revision[:12]}")
        return self.commit

    def check_commit(self, commit: str, what: str) -> None:
        if commit != self.commit:
            raise NotFound(f"{what}: {self.describe()} holds another commit than {commit[:12]}")


def recognise(objects: dict[str, ObjectInfo], read: Read, *, what: str, include: tuple[str, ...] = (),
              exclude: tuple[str, ...] = (), warn: Warn = lambda *a, **k: None) -> Mirror | None:
    """What the listing (relative path -> object, directory markers left out) is: a mirror, or None for
    a plain folder. Raises BeingPublished / MirrorIncomplete (exit 7) for a prefix that is not one yet."""
    lock_key, publishing_key = RECORDS + LOCK_NAME, RECORDS + PUBLISHING_NAME
    if lock_key in objects:
        lock = hub_lock(read([lock_key])[lock_key], what)
        if lock is not None:
            return _published(lock, objects, what, include, exclude, warn)
    if publishing_key in objects:
        note = _publishing_note(read([publishing_key])[publishing_key])
        raise BeingPublished(f"{what}: being published ({RECORDS}{PUBLISHING_NAME} is there, no {LOCK_NAME} yet"
                             f"{note}): not a model until the push finishes; retry later")
    if any(k.startswith(HF_DOWNLOAD) and k.endswith(METADATA) for k in objects):
        return _hf_tree(objects, read, what, include, exclude, warn)
    return None


def hub_lock(data: bytes, what: str) -> PublishedLock | None:
    """The lockfile as a published one, or None for a `pull --local-dir` folder of a bucket or path:
    its commit is a content id and its files carry no Hub checksums, so it has no Hub identity to keep
    (the folder is read as a plain one). A lockfile that says it is published must be a good one (exit 2)."""
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if isinstance(body, dict) and not body.get("repo_id") and not str(body.get("source", "")).startswith("hf://"):
        return None
    return parse_lock(data, what)


def _publishing_note(data: bytes) -> str:
    try:
        note = json.loads(data)
        return f": {note['repo_id']}@{str(note['commit'])[:12]} by {note['host']}/{note['pid']} since {note['started_at']}"
    except (ValueError, KeyError, TypeError):
        return ""


def mirror_file(path: str, obj: ObjectInfo, published: PublishedFile) -> RemoteFile:
    """The Hub's blob name and checksum; the store's version, so every read stays pinned to it."""
    store = {a: v for a, v in obj.checksums.items() if a not in COVERED}
    version = {**obj.record, "content_version": obj.content_version}
    if published.git_sha1:
        version["git_sha1"] = published.git_sha1  # into the lockfile: what the bytes were checked against
    return RemoteFile(path=path, size=obj.size, etag=published.etag, checksums={**store, **published.checksums()},
                      version=version)


def _data(objects: dict[str, ObjectInfo]) -> dict[str, ObjectInfo]:
    return {rel: o for rel, o in objects.items() if not is_bookkeeping(rel)}


def _published(lock: PublishedLock, objects: dict[str, ObjectInfo], what: str, include: tuple[str, ...],
               exclude: tuple[str, ...], warn: Warn) -> Mirror:
    data, problems, files = _data(objects), [], []
    for entry in lock.files:
        path = repo_path(entry.path, what)
        if not selected(path, include, exclude):
            continue
        obj = data.get(path)
        if obj is None or obj.size != entry.size:
            problems.append(path if obj is None else f"{path} ({obj.size} bytes, the lockfile says {entry.size})")
        else:
            files.append(mirror_file(path, obj, entry))
    name = f"published {lock.repo_id}@{lock.commit[:12]}"
    if problems:
        raise MirrorIncomplete(f"{what}: {name} is incomplete: {len(problems)} of its files are missing or of another "
                               f"size ({some(problems)}); a push may be rewriting it: retry later")
    stray = sorted(set(data) - {f.path for f in lock.files})
    if stray:
        warn("mirror_extra", f"{what}: {len(stray)} object(s) not in the lockfile of {name} left out ({some(stray)})",
             files=stray[:20])
    return Mirror("published", lock.repo_id, lock.repo_type, lock.revision, lock.commit, tuple(files))


@dataclass(frozen=True)
class _Downloaded:
    commit: str
    etag: str
    timestamp: float


def _metadata(data: bytes) -> _Downloaded | None:
    """huggingface_hub's download metadata (write_download_metadata), or None when it is not one: then,
    as read_download_metadata does, the file counts as not downloaded."""
    try:
        commit, etag, stamp = data.decode().split("\n")[:3]
        found = _Downloaded(commit.strip(), etag.strip(), float(stamp))
    except (UnicodeDecodeError, ValueError):
        return None
    return found if HEX40.match(found.commit) and found.etag else None


def _tree_listing(data: bytes | None) -> dict[str, tuple[int, str]] | None:
    """trees/<commit>.json: path -> (size, etag), the etag being the LFS sha256 or else the git blob id."""
    if data is None:
        return None
    try:
        body = json.loads(data)
        if body.get("format_version") != 1:
            return None  # a newer format: as huggingface_hub does, as if there were none
        return {str(p): (int(e["size"]), str(e.get("lfs_sha256") or e["blob_id"])) for p, e in body["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _downloads(objects: dict[str, ObjectInfo], read: Read, what: str, warn: Warn) -> dict[str, _Downloaded]:
    keys = {k[len(HF_DOWNLOAD):-len(METADATA)]: k for k in objects if k.startswith(HF_DOWNLOAD) and k.endswith(METADATA)}
    raw = read(sorted(keys.values()))
    found, bad = {}, []
    for path, key in keys.items():
        parsed = _metadata(raw[key])
        if parsed is None:
            bad.append(path)
        else:
            found[repo_path(path, what)] = parsed
    if bad:
        warn("mirror_metadata", f"{what}: {len(bad)} download metadata file(s) unreadable, as if not downloaded "
             f"({some(sorted(bad))})")
    if not found:
        raise InvalidInput(f"{what}: an hf download tree whose {HF_DOWNLOAD}*{METADATA} files are all unreadable")
    return found


def _hf_tree(objects: dict[str, ObjectInfo], read: Read, what: str, include: tuple[str, ...],
             exclude: tuple[str, ...], warn: Warn) -> Mirror:
    """The commit of the latest download; its files from the tree listing where there is one (the whole
    commit: what a partial copy lacks shows), else from the metadata files that name that commit."""
    downloads = _downloads(objects, read, what, warn)
    commit = max(downloads.values(), key=lambda d: d.timestamp).commit
    tree_key = f"{HF_TREES}{commit}.json"
    listing = _tree_listing(read([tree_key])[tree_key] if tree_key in objects else None)
    if listing is None:
        older = sorted(p for p, d in downloads.items() if d.commit != commit)
        if older:
            raise MirrorIncomplete(f"{what}: an hf download tree of commit {commit[:12]} also holds {len(older)} file(s) "
                                   f"of another commit ({some(older)}) and no tree listing says which belong to it: "
                                   "still being updated? re-run hf download of one revision")
        listing = {p: (-1, d.etag) for p, d in downloads.items()}  # -1: the size is the object's
    data, files, missing = _data(objects), [], []
    for path, (size, etag) in sorted(listing.items()):
        path = repo_path(path, what)
        if not selected(path, include, exclude):
            continue
        obj, done = data.get(path), downloads.get(path)
        stale = done is not None and done.commit != commit and done.etag != etag  # not re-downloaded at this commit
        if obj is None or size not in (-1, obj.size) or stale:
            missing.append(path)
        else:
            files.append(mirror_file(path, obj, published_file({"path": path, "size": obj.size, "etag": etag}, what)))
    if missing:
        raise MirrorIncomplete(f"{what}: the hf download tree of commit {commit[:12]} lacks {len(missing)} of its files "
                               f"({some(missing)}): a partial copy, or one still filling; to pull the part that is "
                               "there, pass the --include/--exclude it was downloaded with")
    extra = sorted(set(data) - set(listing))
    if extra:
        warn("mirror_extra", f"{what}: {len(extra)} file(s) left out: not part of commit {commit[:12]}, as neither its "
             f"tree listing nor its download metadata names them ({some(extra)})", files=extra[:20])
    return Mirror("hf download tree", "", "model", None, commit, tuple(files))
