"""Garbage collection of a node cache: least recently used first, within watermarks, never unsafe.

What may go: snapshots no longer declared, and superseded commits of declared models. What never
goes: a pinned model, the commit a declared revision points at, a blob another kept snapshot links,
anything in a repo whose writer lease is live. The ready marker is removed first, so no reader
trusts a snapshot that is being taken apart.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .cache_index import Repo, Snapshot, scan


@dataclass(frozen=True)
class Keep:
    """What the declared list protects: (repo_type, repo_id) -> revisions; and pinned repos."""

    revisions: dict[tuple[str, str], set[str]]
    pinned: set[tuple[str, str]]


@dataclass
class Victim:
    repo: Repo
    snapshot: Snapshot
    reason: str
    frees: int  # bytes freed given the victims chosen before it


def _kept_commits(repo: Repo, keep: Keep) -> set[str]:
    revisions = keep.revisions.get((repo.repo_type, repo.repo_id), set())
    return {repo.refs[rev] for rev in revisions if rev in repo.refs} | {rev for rev in revisions if rev in repo.snapshots}


def candidates(repos: list[Repo], keep: Keep, lease_ttl: float) -> list[tuple[Repo, Snapshot, str]]:
    out = []
    for repo in repos:
        key = (repo.repo_type, repo.repo_id)
        if key in keep.pinned:
            continue
        if repo.lease_age is not None and repo.lease_age < 5 * lease_ttl:
            continue  # a pull is (or may be) in progress: its snapshot is not ours to judge
        declared = key in keep.revisions
        kept = _kept_commits(repo, keep)
        for commit, snap in repo.snapshots.items():
            if commit in kept:
                continue
            reason = "superseded: " + ", ".join(f"{r}->{repo.refs[r][:12]}" for r in sorted(keep.revisions[key]) if r in repo.refs) \
                if declared else "not declared"
            out.append((repo, snap, reason))
    # Least recently used first.
    return sorted(out, key=lambda item: item[1].last_used)


def choose(repos: list[Repo], keep: Keep, *, must_free: int, lease_ttl: float) -> list[Victim]:
    """Victims, LRU first, until `must_free` bytes would be freed (all candidates if never)."""
    victims: list[Victim] = []
    freed = 0
    gone: dict[Path, set[str]] = {}
    for repo, snap, reason in candidates(repos, keep, lease_ttl):
        if freed >= must_free:
            break
        removed = gone.setdefault(repo.folder, set())
        removed.add(snap.commit)
        still_linked: set[str] = set()
        for other in repo.snapshots.values():
            if other.commit not in removed:
                still_linked |= set(other.blobs)
        frees = sum(size for name, size in snap.blobs.items() if name not in still_linked)
        victims.append(Victim(repo, snap, reason, frees))
        freed += frees
    return victims


def delete_snapshot(repo: Repo, commit: str) -> int:
    """Remove one snapshot, marker first; then the blobs no remaining snapshot links. Returns bytes."""
    layout = repo.layout
    layout.ready_path(commit).unlink(missing_ok=True)
    layout.lock_path(commit).unlink(missing_ok=True)
    for rev, c in list(repo.refs.items()):
        if c == commit:
            layout.ref_path(rev).unlink(missing_ok=True)
            del repo.refs[rev]
    snap = repo.snapshots.pop(commit)
    shutil.rmtree(layout.snapshot_dir(commit), ignore_errors=True)
    still_linked: set[str] = set()
    for other in repo.snapshots.values():
        still_linked |= set(other.blobs)
    freed = 0
    for name, size in snap.blobs.items():
        if name not in still_linked:
            blob = repo.folder / "blobs" / name
            try:
                blob.unlink()
                freed += size
            except FileNotFoundError:
                pass
    if not repo.snapshots:
        shutil.rmtree(repo.folder, ignore_errors=True)
        shutil.rmtree(layout.lease_path().parent, ignore_errors=True)
    return freed


def usage(cache_dir: Path, repos: list[Repo], by_volume: bool) -> tuple[int, int]:
    """(used, total) bytes: of the whole volume for percent budgets, of the cache for byte budgets."""
    if by_volume:
        du = shutil.disk_usage(cache_dir)
        return du.used, du.total
    return sum(r.size for r in repos), 0


def collect(cache_dir: Path, keep: Keep, *, high: int, low: int, by_volume: bool, lease_ttl: float,
            need: int = 0, dry_run: bool = False, force: bool = False) -> tuple[list[Victim], int, int]:
    """Run GC if usage (plus `need`, for a pull that must fit) is over `high`, down to `low`.

    Returns (victims, bytes freed, usage before)."""
    repos = scan(cache_dir)
    used, _ = usage(cache_dir, repos, by_volume)
    if not force and used + need <= high:
        return [], 0, used
    victims = choose(repos, keep, must_free=max(used + need - low, 0) if not force else 1 << 62, lease_ttl=lease_ttl)
    freed = 0
    if not dry_run:
        for v in victims:
            freed += delete_snapshot(v.repo, v.snapshot.commit)
    else:
        freed = sum(v.frees for v in victims)
    return victims, freed, used
