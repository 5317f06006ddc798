"""A census of an HF cache: repos, snapshots, refs, readiness, sizes, last use; and the use record.

`list` prints it; `gc` decides from it. Sizes count each blob once per repo, because snapshots of
one repo share blobs and deleting a snapshot frees only what no other snapshot links.

Last use is `.model-agent/<commit>.used`, rewritten when a pull finds or makes the snapshot ready,
when `wait` sees it ready, and each sync round that declares it; else the ready marker. Its mtime is
stamped by the file server, like every other mtime GC compares it with. Access times are not used:
under relatime they move once a day, under noatime never, and `verify` moves them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .layout import HubCacheLayout, atomic_write
from .lockfile import is_ready, read_lock

_PREFIXES = {"models": "model", "datasets": "dataset"}


@dataclass
class Snapshot:
    commit: str
    ready: bool
    blobs: dict[str, int] = field(default_factory=dict)  # blob name -> size
    last_used: float = 0.0
    requested: str | None = None  # the revision its lockfile says was asked for; None: not written by us

    @property
    def size(self) -> int:
        return sum(self.blobs.values())


@dataclass
class Repo:
    folder: Path
    repo_type: str
    repo_id: str
    refs: dict[str, str] = field(default_factory=dict)  # revision -> commit
    snapshots: dict[str, Snapshot] = field(default_factory=dict)

    @property
    def layout(self) -> HubCacheLayout:
        return HubCacheLayout(self.folder.parent, self.repo_type, self.repo_id)

    @property
    def size(self) -> int:
        blobs: dict[str, int] = {}
        for snap in self.snapshots.values():
            blobs.update(snap.blobs)
        return sum(blobs.values())

    def revisions_of(self, commit: str) -> list[str]:
        """The names that point at `commit`; not `refs/<commit>` itself, the pin a pull by commit leaves."""
        return sorted(rev for rev, c in self.refs.items() if c == commit and rev != commit)

    def pinned_by_commit(self, commit: str) -> bool:
        """Pulled by its full commit: `refs/<commit>` names it (layout.write_ref)."""
        return self.refs.get(commit) == commit


def _parse_folder(name: str) -> tuple[str, str] | None:
    prefix, _, rest = name.partition("--")
    if prefix not in _PREFIXES or not rest:
        return None
    return _PREFIXES[prefix], rest.replace("--", "/")


def _read_refs(refs_dir: Path) -> dict[str, str]:
    refs: dict[str, str] = {}
    if refs_dir.is_dir():
        for path in refs_dir.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                try:
                    refs[str(path.relative_to(refs_dir))] = path.read_text().strip()
                except OSError:
                    continue
    return refs


def used_path(layout: HubCacheLayout, commit: str) -> Path:
    return layout.records / f"{commit}.used"


def record_use(layout, commit: str) -> None:
    """Note that `commit` was just wanted (pulled, found ready, waited for, declared): LRU reads it.

    Best effort: a read-only mount (EROFS), a consumer without write access (EACCES) or a full disk
    must never fail the pull or the wait that noticed the use."""
    if not isinstance(layout, HubCacheLayout) or not layout.records.is_dir():
        return  # not ours to judge, or gone: never recreate a folder GC just removed
    try:
        atomic_write(used_path(layout, commit), time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()).encode())
    except OSError:
        pass


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _scan_snapshot(repo_dir: Path, layout: HubCacheLayout, commit: str) -> Snapshot:
    snap = Snapshot(commit=commit, ready=is_ready(layout.ready_path(commit), commit))
    snap.last_used = max(_mtime(used_path(layout, commit)), _mtime(layout.ready_path(commit)))
    lock = read_lock(layout.lock_path(commit))
    if lock is not None and lock.get("commit") == commit and isinstance(lock.get("revision"), str):
        snap.requested = lock["revision"]
    for dirpath, _, names in os.walk(repo_dir / "snapshots" / commit):
        for name in names:
            link = Path(dirpath) / name
            try:
                # The repo's own blob entry (it may itself link into huggingface_hub's shared store,
                # which gc never touches).
                blob_name = Path(os.readlink(link)).name if link.is_symlink() else None
                st = link.stat()
            except OSError:
                continue
            if blob_name:
                snap.blobs[blob_name] = st.st_size
    return snap


def scan_repo(folder: Path) -> Repo | None:
    """One repo folder as it is now (GC re-reads it under the lease, right before a removal)."""
    parsed = _parse_folder(folder.name)
    if parsed is None or not folder.is_dir():
        return None
    repo = Repo(folder=folder, repo_type=parsed[0], repo_id=parsed[1], refs=_read_refs(folder / "refs"))
    snaps_dir = folder / "snapshots"
    if snaps_dir.is_dir():
        for commit_dir in sorted(snaps_dir.iterdir()):
            repo.snapshots[commit_dir.name] = _scan_snapshot(folder, repo.layout, commit_dir.name)
    return repo


def scan(cache_dir: Path) -> list[Repo]:
    if not cache_dir.is_dir():
        return []
    return [repo for folder in sorted(cache_dir.iterdir()) if (repo := scan_repo(folder)) is not None]
