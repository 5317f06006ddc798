"""Garbage collection of a node cache: least recently used first, within watermarks, never unsafe.

What may go, with a models file: snapshots no longer declared, and superseded commits of declared
models. Without one (`model-agent gc`): only snapshots model-agent completed for a moving revision
(a branch or tag) whose ref now points at another commit. What never goes: a pinned model, the
commit a declared revision points at, a snapshot pulled by full commit SHA (without a models file),
a snapshot model-agent did not write (without a models file), a blob another kept snapshot links,
and anything of a model whose writer lease someone else holds. A pull by full commit leaves
`refs/<commit>` (layout.write_ref), so that snapshot stays even when an earlier pull of a branch wrote
its lockfile. With a models file, a declared entry whose repo is not known (a mirror never read) could
be any snapshot, so GC removes nothing while there is one (sync.keep_for).

Each removal happens under the model's writer lease, taken by GC itself (O_EXCL): a writer either
holds it (GC skips the model and says so) or waits the short time the removal takes. Under it, GC
reads the repo again and removes the snapshot only if it is still a candidate. A lease someone else
holds is judged on GC's own monotonic clock (LeaseWatch), never by comparing its mtime with the
local clock: it is taken over only after its content stayed the same for its TTL while watched.
GC never removes a lease it does not hold. The ready marker is removed first, so no reader trusts a
snapshot that is being taken apart.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .cache_index import Repo, Snapshot, scan, scan_repo, used_path
from .lease import Lease, LeaseWatch
from .sources.huggingface import COMMIT_SHA


UNKNOWN_IDENTITY = ("its source has not said which repo it holds (never pulled, or unreadable), so any snapshot "
                    "could be its own: nothing removed")


@dataclass(frozen=True)
class Keep:
    """What the declared list protects: (repo_type, repo_id) -> revisions (names or commits); and pinned repos.

    `listed=False`: there is no list (plain `gc`); each snapshot's own lockfile says if it is wanted.
    `unknown`: declared entries whose repo is not known (a mirror not read yet): any snapshot could be
    theirs, so nothing is removed while there is one."""

    revisions: dict[tuple[str, str], set[str]]
    pinned: set[tuple[str, str]]
    listed: bool = True
    unknown: tuple[str, ...] = ()


@dataclass
class Victim:
    repo: Repo
    snapshot: Snapshot
    reason: str
    frees: int  # bytes freed given the victims chosen before it


@dataclass
class Outcome:
    victims: list[Victim] = field(default_factory=list)
    freed: int = 0
    used: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (repo_id, why)


def _superseded(repo: Repo, snap: Snapshot) -> bool:
    """Completed by us for a moving revision whose ref now names another commit."""
    rev = snap.requested
    if rev is None or COMMIT_SHA.match(rev) or repo.pinned_by_commit(snap.commit):
        return False  # not ours to judge, or pulled by commit (first or since): wanted
    return repo.refs.get(rev) not in (None, snap.commit)


def _kept_commits(repo: Repo, keep: Keep) -> set[str]:
    if not keep.listed:
        return {c for c, snap in repo.snapshots.items() if not _superseded(repo, snap)}
    revisions = keep.revisions.get((repo.repo_type, repo.repo_id), set())
    return {repo.refs[rev] for rev in revisions if rev in repo.refs} | {rev for rev in revisions if rev in repo.snapshots}


def _reason(repo: Repo, snap: Snapshot, keep: Keep) -> str:
    if not keep.listed:
        return f"superseded: {snap.requested}->{repo.refs[snap.requested][:12]}"
    key = (repo.repo_type, repo.repo_id)
    if key not in keep.revisions:
        return "not declared"
    moved = [r for r in sorted(keep.revisions[key]) if r in repo.refs and repo.refs[r] != r]  # not refs/<commit>
    return "superseded: " + ", ".join(f"{r}->{repo.refs[r][:12]}" for r in moved)


def candidates(repos: list[Repo], keep: Keep) -> list[tuple[Repo, Snapshot, str]]:
    out = []
    for repo in repos:
        if (repo.repo_type, repo.repo_id) in keep.pinned:
            continue
        kept = _kept_commits(repo, keep)
        out += [(repo, snap, _reason(repo, snap, keep)) for commit, snap in repo.snapshots.items() if commit not in kept]
    return sorted(out, key=lambda item: item[1].last_used)  # least recently used first


def _frees(repo: Repo, commit: str, gone: set[str]) -> int:
    still_linked: set[str] = set()
    for other in repo.snapshots.values():
        if other.commit != commit and other.commit not in gone:
            still_linked |= set(other.blobs)
    return sum(size for name, size in repo.snapshots[commit].blobs.items() if name not in still_linked)


def choose(repos: list[Repo], keep: Keep, *, must_free: int) -> list[Victim]:
    """Victims, LRU first, until `must_free` bytes would be freed (all candidates if never)."""
    victims: list[Victim] = []
    freed = 0
    gone: dict[Path, set[str]] = {}
    for repo, snap, reason in candidates(repos, keep):
        if freed >= must_free:
            break
        frees = _frees(repo, snap.commit, gone.setdefault(repo.folder, set()))
        gone[repo.folder].add(snap.commit)
        victims.append(Victim(repo, snap, reason, frees))
        freed += frees
    return victims


def delete_snapshot(repo: Repo, commit: str) -> int:
    """Remove one snapshot, marker first; then the blobs no remaining snapshot links. Returns bytes.

    The caller holds the model's lease. The lease's own folder (under `.locks/`) is never touched."""
    layout = repo.layout
    freed = _frees(repo, commit, set())
    layout.ready_path(commit).unlink(missing_ok=True)
    layout.lock_path(commit).unlink(missing_ok=True)
    used_path(layout, commit).unlink(missing_ok=True)
    for rev, c in list(repo.refs.items()):
        if c == commit:  # a ref left naming a missing commit makes huggingface_hub's scan call the repo corrupted
            _remove_ref(layout.ref_path(rev), top=repo.folder / "refs")
            del repo.refs[rev]
    snap = repo.snapshots.pop(commit)
    shutil.rmtree(layout.snapshot_dir(commit), ignore_errors=True)
    if not repo.snapshots:
        shutil.rmtree(repo.folder, ignore_errors=True)  # partials too: no writer holds the lease
        return freed
    still_linked = set().union(*(set(other.blobs) for other in repo.snapshots.values()))
    for name in snap.blobs:
        if name not in still_linked:
            (repo.folder / "blobs" / name).unlink(missing_ok=True)
    return freed


def _remove_ref(path: Path, *, top: Path) -> None:
    """Remove a ref file, and the folders of a nested one (`refs/pr/1`) it leaves empty."""
    path.unlink(missing_ok=True)
    for folder in path.parents:
        if folder == top or top not in folder.parents:
            break
        try:
            folder.rmdir()
        except OSError:
            break  # not empty: another ref lives there


def _watch(path: Path, ttl: float, watches: dict[Path, LeaseWatch]):
    """('free' | 'held' | 'stale', info, who) of a lease, on GC's own clock: `watches` lives as long as
    the caller, so only a long-lived caller ever sees a lease stay unchanged for its TTL."""
    state, info = watches.setdefault(path, LeaseWatch(path, ttl)).poll()
    owner = info.owner if info else {}
    return state, info, f"writer lease held by {owner.get('host')}/{owner.get('pid')}"


def claim(repo: Repo, ttl: float, watches: dict[Path, LeaseWatch]) -> tuple[Lease | None, str]:
    """Take the model's writer lease for a removal: (lease, "") or (None, why not)."""
    lease = Lease(repo.layout.lease_path(), ttl=ttl)
    if not lease.try_create():
        state, info, who = _watch(lease.path, ttl, watches)
        taken = (state == "free" and lease.try_create()) or (state == "stale" and info is not None and lease.take_over(info))
        if not taken:
            return None, who
        watches.pop(lease.path, None)
    lease.start_heartbeat()  # a slow rmtree on NFS must not look like a dead writer
    return lease, ""


def _remove(repo: Repo, commit: str, keep: Keep, ttl: float, watches: dict[Path, LeaseWatch]) -> int | str | None:
    """Bytes freed; why it was skipped; or None if, read again under the lease, it is no candidate."""
    lease, why = claim(repo, ttl, watches)
    if lease is None:
        return why
    try:
        fresh = scan_repo(repo.folder)
        if fresh is None or commit not in {s.commit for _, s, _ in candidates([fresh], keep)}:
            return None
        return delete_snapshot(fresh, commit)
    finally:
        lease.release()


def usage(cache_dir: Path, repos: list[Repo], by_volume: bool) -> tuple[int, int]:
    """(used, total) bytes: of the whole volume for percent budgets, of the cache for byte budgets."""
    if by_volume:
        du = shutil.disk_usage(cache_dir)
        return du.used, du.total
    return sum(r.size for r in repos), 0


def collect(cache_dir: Path, keep: Keep, *, high: int, low: int, by_volume: bool, lease_ttl: float,
            need: int = 0, dry_run: bool = False, force: bool = False,
            watches: dict[Path, LeaseWatch] | None = None) -> Outcome:
    """Run GC if usage (plus `need`, for a pull that must fit) is over `high`, down to `low`.

    `watches`: the lease watches of a long-lived caller (the sync daemon), so a dead writer's lease is
    recognised across rounds; a one-shot `gc` starts afresh and so never takes a lease over."""
    watches = {} if watches is None else watches
    if not cache_dir.is_dir():
        return Outcome()
    repos = scan(cache_dir)
    out = Outcome(used=usage(cache_dir, repos, by_volume)[0])
    if not force and out.used + need <= high:
        return out
    if keep.unknown:
        out.skipped += [(model, UNKNOWN_IDENTITY) for model in keep.unknown]
        return out
    must_free = max(out.used + need - low, 0) if not force else 1 << 62
    eligible = []
    for repo in repos:
        state, _, who = _watch(repo.layout.lease_path(), lease_ttl, watches)
        if state == "held" and candidates([repo], keep):
            out.skipped.append((repo.repo_id, who))
        elif state != "held":
            eligible.append(repo)
    if dry_run:
        out.victims = choose(eligible, keep, must_free=must_free)
        out.freed = sum(v.frees for v in out.victims)
        return out
    for repo, snap, reason in candidates(eligible, keep):
        if out.freed >= must_free:
            break
        freed = _remove(repo, snap.commit, keep, lease_ttl, watches)
        if isinstance(freed, str):
            out.skipped.append((repo.repo_id, freed))
        elif freed is not None:
            out.victims.append(Victim(repo, snap, reason, freed))
            out.freed += freed
    return out
