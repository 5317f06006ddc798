"""Step 2, plan: which files to fetch, which are already there, and whether they fit on the disk."""

from __future__ import annotations

import fnmatch
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import checksums
from .errors import DiskFull, InvalidInput
from .lockfile import is_ready, read_lock
from .sources.base import RemoteFile


def _match(path: str, pattern: str) -> bool:
    # Same rules as huggingface_hub's filter_repo_objects: `*` crosses '/', a trailing '/' means
    # "everything below", so `--include` behaves as users of `hf download` expect.
    if pattern.endswith("/"):
        pattern += "*"
    return fnmatch.fnmatchcase(path, pattern)


def apply_globs(files: list[RemoteFile], include: tuple[str, ...], exclude: tuple[str, ...], what: str,
                on_unmatched: Callable[[list[str]], None] = lambda patterns: None) -> list[RemoteFile]:
    """The files the globs keep. As in huggingface_hub, an --include pattern that matches nothing is
    only worth a warning (`on_unmatched`) while another one matches: `--include '*.bin' --include
    '*.safetensors'` is how one asks for "the weights, in whichever format the repo has"."""
    for pattern in (*include, *exclude):
        if not pattern or "\x00" in pattern:
            raise InvalidInput(f"{what}: invalid glob {pattern!r}")
    unmatched = [p for p in include if not any(_match(f.path, p) for f in files)]
    if include and len(unmatched) == len(include):
        names = " ".join(f"--include {p!r}" for p in unmatched)
        verb = "matches" if len(unmatched) == 1 else "match"
        raise InvalidInput(f"{what}: {names} {verb} no file ({len(files)} files listed)")
    if unmatched:
        on_unmatched(unmatched)
    kept = [f for f in files if (not include or any(_match(f.path, p) for p in include))
            and not any(_match(f.path, p) for p in exclude)]
    if not kept:
        raise InvalidInput(f"{what}: the include/exclude globs leave no file to download")
    refuse_file_folder_clash(kept, what)
    return kept


def refuse_file_folder_clash(files: list[RemoteFile], what: str) -> None:
    """A bucket may hold `x` and `x/y`; a file system cannot. Found here, before the first byte, as
    bad input (exit 2) rather than as a FileExistsError halfway through (exit 1, which Jobs retry).
    After the globs: leaving one of the two out is the way through."""
    paths = {f.path for f in files}
    for f in files:
        parts = f.path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in paths:
                raise InvalidInput(f"{what}: {folder!r} is both a file and a folder (of {f.path!r}); a file system "
                                   f"cannot hold both: remove one from the source, or leave one out with --exclude")


def trusted_etags(layout) -> set[tuple[str, str]]:
    """(path, etag) pairs that a lockfile of ours vouches for: verified before they were promoted.

    A lockfile vouches only while the ready marker names its commit. In a local dir a pull of another
    commit overwrites files in place: from its first byte on, the old lockfile describes files that
    may no longer be there, so those are re-hashed rather than trusted.
    """
    trusted: set[tuple[str, str]] = set()
    if not layout.records.is_dir():
        return trusted
    for lock_path in layout.records.glob("*lock.json"):
        lock = read_lock(lock_path) or {}
        commit = lock.get("commit")
        if not isinstance(commit, str) or layout.lock_path(commit) != lock_path \
                or not is_ready(layout.ready_path(commit), commit):
            continue
        for entry in lock.get("files", []):
            etag = entry.get("etag") or entry.get("sha256")
            if isinstance(entry.get("path"), str) and etag:
                trusted.add((entry["path"], etag))
    return trusted


@dataclass
class Plan:
    files: list[RemoteFile]  # everything in the snapshot after the globs
    missing: list[RemoteFile] = field(default_factory=list)  # unique by etag: what to fetch
    present_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing_bytes(self) -> int:
        return sum(f.size for f in self.missing)


def make_plan(files: list[RemoteFile], layout, *, trust_blobs_by_etag: bool) -> Plan:
    """Subtract what is on disk already. Bytes we promoted ourselves are trusted by the lockfile of a
    ready snapshot (or, in the HF layout, by their content-addressed name); anything else is re-hashed."""
    trusted = trusted_etags(layout)
    trusted_keys = {etag for _, etag in trusted}
    plan = Plan(files=files)
    seen: set[str] = set()
    for f in files:
        if f.etag in seen:
            continue  # same content under two names: fetch once
        seen.add(f.etag)
        final = layout.final_path(f.etag, f.path)
        try:
            size = final.stat().st_size
        except OSError:
            size = -1
        if size != f.size:
            ok = False
        elif (f.path, f.etag) in trusted or (trust_blobs_by_etag and f.etag in trusted_keys):
            ok = True
        else:
            ok = not checksums.mismatches(final, f.size, f.checksums)
        if ok:
            plan.present_bytes += f.size
        else:
            plan.missing.append(f)
    return plan


def partials_held(partial_dir: Path, etags: set[str]) -> dict[Path, int]:
    """The partials on disk for these content keys, and what the disk holds of each: not its apparent
    size, since one written at range offsets is sparse, and crediting its holes would let a pull
    start that cannot fit."""
    held: dict[Path, int] = {}
    if partial_dir.is_dir():
        for p in partial_dir.glob("*.ma-*.incomplete"):
            if p.name.split(".", 1)[0] in etags:
                try:
                    st = p.stat()
                except OSError:
                    continue
                held[p] = min(st.st_size, st.st_blocks * 512)
    return held


def ensure_room(partial_dir: Path, plan: Plan, margin: int, what: str) -> int:
    """Check, before the first byte, that the pull fits. Resuming copies a partial (agent/resume.py),
    so the largest one is needed twice for a moment; where that does not fit but starting those
    files over would (the partials' own space comes back), the partials are removed instead.
    Returns how many were removed; raises DiskFull when neither fits."""
    held = partials_held(partial_dir, {f.etag for f in plan.missing})
    need = max(plan.missing_bytes - sum(held.values()), 0)
    try:
        check_disk_space(partial_dir, need + max(held.values(), default=0), margin, what)
        return 0
    except DiskFull:
        check_disk_space(partial_dir, need, margin, what)
    for p in held:  # a paused writer that still holds one keeps writing to an unlinked file
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".json").unlink(missing_ok=True)
    return len(held)


def check_disk_space(where: Path, need: int, margin: int, what: str) -> None:
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + margin > free:
        gib = 2**30
        raise DiskFull(
            f"{what}: needs {need / gib:.2f} GiB (+{margin / gib:.2f} GiB margin) on {where}, "
            f"only {free / gib:.2f} GiB free",
            need=need + margin, free=free,
        )
