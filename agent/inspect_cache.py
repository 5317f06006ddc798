"""Read-only questions about a cache: which commit a revision means, is it ready, is it intact."""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import checksums
from .checksums import b64_to_hex
from .errors import IntegrityError, NotFound, TimedOut
from .layout import HubCacheLayout
from .lockfile import is_ready, missing_file, read_lock
from .log import Logger
from .sources.huggingface import COMMIT_SHA


def ready_lock(layout, commit: str) -> dict | None:
    """The lockfile of `commit` if its snapshot is ready, else None. Ready: the marker names the
    commit, and every file its lockfile lists is there at its size (a marker alone survives
    `hf cache rm`, which removes the snapshot and its blobs but not our records)."""
    if not is_ready(layout.ready_path(commit), commit):
        return None
    lock = read_lock(layout.lock_path(commit))
    if lock is None or lock.get("commit") != commit:
        return None
    folder = layout.snapshot_dir(commit) if isinstance(layout, HubCacheLayout) else layout.root
    return lock if missing_file(lock, folder) is None else None


def ready_commit(layout, revision: str) -> str | None:
    """The commit `revision` names in this cache if its snapshot is ready, else None."""
    commit = revision if COMMIT_SHA.match(revision) else layout.read_ref(revision)
    if commit and ready_lock(layout, commit) is not None:
        return commit
    return None


def wait_ready(layout, revision: str, *, timeout: float, poll: float, logger: Logger, model: str,
               clock=time.monotonic, sleep=time.sleep) -> str:
    """Poll for the ready marker; the readiness gate of consumers' init containers."""
    started = clock()
    last_note = None
    while True:
        commit = ready_commit(layout, revision)
        if commit:
            logger.info("ready", f"{model}@{revision} is ready: {commit}", model=model, revision=revision, commit=commit)
            return commit
        waited = clock() - started
        if waited >= timeout:
            raise TimedOut(f"{model}@{revision}: no ready snapshot after {waited:.0f}s")
        if last_note is None or waited - last_note >= 10:
            last_note = waited
            owner = _writer(layout)
            who = f"; {owner.get('host')}/{owner.get('pid')} is pulling it" if owner else "; no writer holds it yet"
            logger.info("waiting", f"waiting for {model}@{revision} to be ready ({waited:.0f}s of {timeout:.0f}s{who})",
                        model=model, revision=revision, waited_s=int(waited), timeout_s=int(timeout), writer=owner or None)
        sleep(min(poll, max(timeout - waited, 0.01)))


def _writer(layout) -> dict:
    """Who holds the writer lease right now, if anyone (for people reading the wait log)."""
    try:
        owner = json.loads(layout.lease_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: owner.get(k) for k in ("host", "pid", "started_at")} if isinstance(owner, dict) else {}


def _expected(entry: dict, hub_source: bool) -> dict[str, str]:
    if entry.get("sha256"):
        return {"sha256": entry["sha256"]}
    etag = entry.get("etag") or ""
    # A non-LFS Hub file: its blob id is git's hash of it, in either layout. Decided by the source,
    # not by the etag's shape: an object store's etag could be 40 hex too.
    if hub_source and COMMIT_SHA.match(etag):
        return {"git_sha1": etag}
    # Object stores: whatever the pull was checked against (README "On disk": the lockfile fields).
    found = {"md5": entry.get("md5") or entry.get("content_md5") or ""}
    if entry.get("crc32c") and not entry.get("checksum_crc32c"):
        found["crc32c"] = b64_to_hex(entry["crc32c"]) or ""  # GCS lists it base64, as its API does
    for algo in ("crc32c", "crc32", "sha256"):
        value = str(entry.get(f"checksum_{algo}") or "")
        if "-" in value and entry.get("part_size"):
            found[f"{algo}_composite"] = f"{value}:{entry['part_size']}"
        elif value and "-" not in value:
            found[algo] = value
    return {a: v for a, v in found.items() if v}


def verify_snapshot(layout, revision: str, model: str) -> tuple[str, int, int]:
    """Re-hash every file of a ready snapshot against its lockfile. Returns (commit, files, bytes)."""
    commit = ready_commit(layout, revision) or (revision if COMMIT_SHA.match(revision) else layout.read_ref(revision))
    if not commit:
        raise NotFound(f"{model}@{revision}: not in the cache")
    lock = read_lock(layout.lock_path(commit))
    if lock is None or lock.get("commit") != commit:
        raise NotFound(f"{model}@{commit[:12]}: no lockfile in the cache (never completed by model-agent)")
    hub = isinstance(layout, HubCacheLayout)
    hub_source = str(lock.get("source", "")).startswith("hf://")
    problems, total = [], 0
    for entry in lock["files"]:
        path = (layout.snapshot_dir(commit) if hub else layout.root) / entry["path"]
        bad = checksums.mismatches(Path(path), int(entry["size"]), _expected(entry, hub_source))
        total += int(entry["size"])
        if bad:
            problems.append(f"{entry['path']}: {', '.join(bad)}")
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise IntegrityError(f"{model}@{commit[:12]}: {problems[0]}{more}")
    return commit, len(lock["files"]), total
