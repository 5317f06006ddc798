"""A read-only census of an HF cache: repos, snapshots, refs, readiness, sizes, last use, leases.

`list` prints it; `gc` decides from it. Sizes count each blob once per repo, because snapshots of
one repo share blobs and deleting a snapshot frees only what no other snapshot links.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .layout import HubCacheLayout
from .lockfile import is_ready

_PREFIXES = {"models": "model", "datasets": "dataset"}


@dataclass
class Snapshot:
    commit: str
    ready: bool
    blobs: dict[str, int] = field(default_factory=dict)  # blob name -> size
    last_used: float = 0.0

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
    lease_age: float | None = None  # seconds since the lease file last changed; None: no lease

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
        return sorted(rev for rev, c in self.refs.items() if c == commit)


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


def _scan_snapshot(repo_dir: Path, layout: HubCacheLayout, commit: str) -> Snapshot:
    snap = Snapshot(commit=commit, ready=is_ready(layout.ready_path(commit), commit))
    try:
        snap.last_used = layout.ready_path(commit).stat().st_mtime
    except OSError:
        pass
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
            # atime is coarse (relatime) but it is the only trace a read-only consumer leaves.
            snap.last_used = max(snap.last_used, st.st_atime)
    return snap


def scan(cache_dir: Path, now: float | None = None) -> list[Repo]:
    now = time.time() if now is None else now
    repos: list[Repo] = []
    if not cache_dir.is_dir():
        return repos
    for folder in sorted(cache_dir.iterdir()):
        parsed = _parse_folder(folder.name)
        if parsed is None or not folder.is_dir():
            continue
        repo = Repo(folder=folder, repo_type=parsed[0], repo_id=parsed[1], refs=_read_refs(folder / "refs"))
        layout = repo.layout
        snaps_dir = folder / "snapshots"
        if snaps_dir.is_dir():
            for commit_dir in sorted(snaps_dir.iterdir()):
                repo.snapshots[commit_dir.name] = _scan_snapshot(folder, layout, commit_dir.name)
        try:
            repo.lease_age = now - layout.lease_path().stat().st_mtime
        except OSError:
            repo.lease_age = None
        repos.append(repo)
    return repos
