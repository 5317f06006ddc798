"""One pull, whatever the source: resolve, plan, transfer, verify, commit.

The ready marker is the only thing readers trust, so it is written last, and the ref for a
moving revision is flipped only after it: `refs/main` never points at a snapshot that is not
ready (sync mode relies on this to flip revisions atomically).
"""

from __future__ import annotations

import errno
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import directio
from .config import Settings
from .errors import NotFound, TimedOut
from .inspect_cache import ready_commit, ready_lock
from .layout import HubCacheLayout, LocalDirLayout, fsync_dirs, promote, temp_name
from .lease import Lease, LeaseLost, LeaseWatch
from .lockfile import Lock, LockedFile, is_ready, read_lock, retire_snapshot, write_lock, write_ready
from .log import Logger
from .plan import apply_globs, ensure_room, make_plan
from .progress import PullProgress
from .retry import RetryPolicy
from .sources.base import RemoteFile, Source, SourceRef, open_source
from .sources.huggingface import COMMIT_SHA
from .transfer import FileJob, Transfer


@dataclass
class PullResult:
    model: str
    revision: str
    commit: str
    path: Path  # the snapshot folder (HF layout) or the local dir
    files: int
    bytes_total: int
    bytes_fetched: int  # over the network in this process
    seconds: float
    engine: str
    already_ready: bool = False
    bytes_resumed: int = 0  # found in partial files an earlier run left: never fetched again


def make_layout(settings: Settings, source: Source):
    if settings.local_dir is not None:
        return LocalDirLayout(settings.local_dir)
    repo_type, repo_id = source.layout_repo()
    return HubCacheLayout(settings.cache_dir, repo_type, repo_id)


def snapshot_path(layout, commit: str) -> Path:
    return layout.snapshot_dir(commit) if isinstance(layout, HubCacheLayout) else layout.root


PARTIAL_TTL = 24 * 3600.0  # a Hub partial of another revision, untouched this long, is garbage
LEASE_ATTEMPTS = 3  # a writer that lost its lease waits for it again this many times before exit 7


def sweep_partials(partial_dir: Path, done_etags: set[str], *, keep_others_for: float) -> int:
    """After a successful pull (under the lease, so no live writer owns them): remove the partials of
    content now complete, and the partials of other content untouched for `keep_others_for` seconds.
    A changed bucket object's partial can never be resumed (its key is the old version), so for
    object stores that is 0: they go at once. Returns how many files were removed."""
    if not partial_dir.is_dir():
        return 0
    removed, now = 0, time.time()
    for p in partial_dir.glob("*.ma-*.incomplete*"):
        try:
            stale = p.name.split(".", 1)[0] in done_etags or now - p.stat().st_mtime >= keep_others_for
            if stale:
                p.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


class Pull:
    def __init__(self, ref: SourceRef, settings: Settings, logger: Logger, *, revision: str | None = None,
                 listeners: list | None = None, tty: bool = False):
        self.ref = ref
        self.settings = settings
        self.logger = logger
        self.source = open_source(ref, settings)
        self.model = ref.model_id()
        self.progress = PullProgress(logger, self.model, bar=tty and logger.fmt == "text",
                                     interval=settings.progress_interval, listeners=listeners)
        # Before the layout and the default revision: a mirror's are in its listing, whose retries and
        # warnings (a local path's lost+found, objects a lockfile does not name) are reported as any.
        if hasattr(self.source, "on_retry"):
            self.source.on_retry = lambda reason, delay, exc: self.progress.retry(reason, delay, str(exc))
        if hasattr(self.source, "logger"):
            self.source.logger = logger
        self.layout = make_layout(settings, self.source)
        self.revision = revision or settings.revision or self.source.default_revision()
        self.started = time.monotonic()

    # -- step 1 ---------------------------------------------------------------------------------
    def resolve(self) -> str:
        """The commit to pull. Answers from the cache alone when that is enough (or required)."""
        if COMMIT_SHA.match(self.revision):
            return self.revision  # immutable: nothing to ask the network
        if self.settings.offline:
            commit = ready_commit(self.layout, self.revision)
            if commit:
                return commit
            raise NotFound(f"{self.ref.display()}@{self.revision}: HF_HUB_OFFLINE=1 and no ready snapshot in the cache")
        return self.source.resolve(self.revision)

    def run(self) -> PullResult:
        self.progress.set_phase("resolve")
        commit = self.resolve()
        if self._ready_for_request(commit):
            self.layout.write_ref(self.revision, commit)
            return self._result(commit, already_ready=True)
        if self.settings.offline:
            raise NotFound(f"{self.ref.display()}@{commit[:12]}: HF_HUB_OFFLINE=1 and the snapshot is not ready in the cache")
        attempt = 0
        try:
            while True:
                attempt += 1
                self.progress.set_phase("waiting")
                lease = self._acquire_lease(commit)
                if lease is None:
                    self.layout.write_ref(self.revision, commit)
                    return self._result(commit, already_ready=True)
                try:
                    return self._pull_locked(commit, lease)
                except LeaseLost as exc:
                    if attempt == LEASE_ATTEMPTS:
                        raise
                    # Another writer may hold it now: wait for its marker or its lease, as any waiter.
                    self.logger.warn("lease_lost", f"{self.model}: {exc}; stopped writing, waiting for the lease again",
                                     model=self.model, attempt=attempt)
                finally:
                    lease.release()
        finally:
            self.progress.stop()

    def _ready_for_request(self, commit: str) -> bool:
        """Ready, and pulled with the same include/exclude (a subset pulled earlier is not enough)."""
        lock = ready_lock(self.layout, commit)  # the marker, and every locked file still there
        if lock is None:
            return False
        same = (tuple(lock.get("include", ())), tuple(lock.get("exclude", ()))) == (self.settings.include, self.settings.exclude)
        return same or self.settings.offline

    # -- the lease ------------------------------------------------------------------------------
    def _acquire_lease(self, commit: str) -> Lease | None:
        """Hold the per-model lease, or return None once another writer has made the snapshot ready."""
        lease = Lease(self.layout.lease_path(), ttl=self.settings.lease_ttl,
                      on_error=lambda message: self.logger.warn("lease_renewal", message, model=self.model))
        watch = LeaseWatch(lease.path, self.settings.lease_ttl)
        started, last_note, failing_since = time.monotonic(), 0.0, []
        while True:
            if self._ready_for_request(commit):
                return None
            if self._try(lease.try_create, failing_since):
                break
            state, info = watch.poll()
            if state == "stale" and info is not None and self._try(lambda: lease.take_over(info), failing_since):
                self.logger.warn("lease_takeover", f"took over a stale lease of {info.owner.get('host')}/{info.owner.get('pid')}",
                                 model=self.model, previous_owner=info.owner)
                break
            if state == "free":
                continue
            waited = time.monotonic() - started
            if self.settings.lock_timeout is not None and waited > self.settings.lock_timeout:
                owner = info.owner if info else {}
                raise TimedOut(f"{self.model}: another writer ({owner.get('host')}/{owner.get('pid')}) still holds the lease after {waited:.0f}s")
            if waited - last_note >= 30 or last_note == 0:
                last_note = max(waited, 0.001)
                owner = info.owner if info else {}
                self.logger.info("waiting_for_writer", f"{self.model}: waiting for {owner.get('host')}/{owner.get('pid')} to finish",
                                 model=self.model, owner=owner)
            time.sleep(min(self.settings.poll_interval, 1.0))
        lease.start_heartbeat()
        if self._ready_for_request(commit):  # finished while we were acquiring
            lease.release()
            return None
        return lease

    def _try(self, grab, failing_since: list[float]) -> bool:
        """One attempt at the lease. A volume that refuses the write for a moment (EIO, ESTALE, an
        NFS blip) is waited out for one TTL; past that, or at once for a read-only or forbidden
        volume, the error is raised and means what it means for any write (exit 2, 6 or 1)."""
        try:
            taken = grab()
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES):
                raise
            now = time.monotonic()
            if not failing_since:
                failing_since.append(now)
                self.logger.warn("lease_renewal", f"{self.model}: cannot write the lease {self.layout.lease_path()}: "
                                 f"{type(exc).__name__} [errno {exc.errno}]; retrying", model=self.model)
            if now - failing_since[0] > self.settings.lease_ttl:
                raise
            return False
        failing_since.clear()
        return taken

    # -- steps 2 to 5 ---------------------------------------------------------------------------
    def _pull_locked(self, commit: str, lease: Lease) -> PullResult:
        what = f"{self.ref.display()}@{commit[:12]}"
        if is_ready(self.layout.ready_path(commit), commit) and ready_lock(self.layout, commit) is None:
            # Files removed under a marker (`hf cache rm`): it vouches for nothing any more.
            retire_snapshot(self.layout.ready_path(commit), self.layout.lock_path(commit))
        self.progress.set_phase("plan")
        files = apply_globs(self.source.list_files(commit), self.settings.include, self.settings.exclude, what,
                            on_unmatched=lambda patterns: self.logger.warn(
                                "include_unmatched", f"{what}: no file matches --include {', '.join(map(repr, patterns))}",
                                model=self.model, patterns=patterns))
        plan = make_plan(files, self.layout, trust_blobs_by_etag=isinstance(self.layout, HubCacheLayout))
        partial_dir = self.layout.partial_dir()
        if dropped := ensure_room(partial_dir, plan, self.settings.disk_margin, what):
            self.logger.warn("partials_dropped", f"{what}: no room to copy {dropped} partial file(s) to resume them: "
                             "starting those files over", model=self.model, partials=dropped)
        if isinstance(self.layout, LocalDirLayout):
            # After the plan (an old snapshot still vouches for the files this commit shares with it:
            # not re-hashed) and the disk check (exit 6 leaves it ready), before the first byte lands.
            self._retire_old_local_snapshot(commit)

        self.progress.set_phase("transfer")
        self.progress.start_transfer(commit, plan.total_bytes, len(files), plan.present_bytes)
        self.logger.info("start", f"pulling {what}: {len(files)} files, {plan.missing_bytes / 2**20:.1f} MiB to fetch"
                         if self.logger.fmt != "json" else "", model=self.model, revision=self.revision,
                         commit=commit, files=len(files), bytes_total=plan.total_bytes, bytes_missing=plan.missing_bytes)
        reader = self.source.reader(self.settings.engine, commit)
        chosen = Counter(reader.for_file(f).name for f in plan.missing)
        if chosen:
            self.logger.info("engine", f"engine {self.settings.engine}: " + ", ".join(f"{n} files via {e}" for e, n in chosen.items())
                             if self.logger.fmt != "json" else "", model=self.model, requested=self.settings.engine,
                             chosen=dict(chosen))
        try:
            jobs = [FileJob(f, self.layout.final_path(f.etag, f.path), partial_dir) for f in plan.missing]
            policy = RetryPolicy(self.settings.retry_max_failures, self.settings.retry_base_delay)
            Transfer(reader, self.progress, workers=self.settings.workers, chunk_size=self.settings.chunk_size,
                     policy=policy, direct_io=directio.wanted(self.settings.direct_io, partial_dir),
                     fence=lease.check).run(jobs)
        finally:
            reader.close()
        engine = "+".join(sorted(getattr(reader, "used", {reader.name}))) or reader.name

        self.progress.set_phase("commit")
        lease.check()  # a writer that lost its lease vouches for nothing
        self._commit(commit, files, engine)
        lease.check()  # the sweep may remove partials that a new holder adopted
        sweep_partials(partial_dir, {f.etag for f in files}, keep_others_for=PARTIAL_TTL if self.source.has_revisions else 0)
        self.progress.set_phase("done")
        return self._result(commit, engine=engine, files=files)

    def _retire_old_local_snapshot(self, commit: str) -> None:
        """A local dir holds one snapshot: before any file of another commit lands, nothing may vouch
        for the old one. Its files still on disk are then re-hashed by the planner, not re-fetched."""
        if not is_ready(self.layout.ready_path(commit), commit):
            retire_snapshot(self.layout.ready_path(commit), self.layout.lock_path(commit))

    def _commit(self, commit: str, files: list[RemoteFile], engine: str) -> None:
        by_etag: dict[str, RemoteFile] = {}
        touched: set[Path] = set()  # folders that got a link or a copy: durable before the lockfile
        for f in files:
            first = by_etag.setdefault(f.etag, f)
            if isinstance(self.layout, LocalDirLayout) and first is not f:
                touched.add(self._copy_duplicate(self.layout.final_path(first.etag, first.path),
                                                 self.layout.final_path(f.etag, f.path)))
            if (folder := self.layout.link_file(commit, f.path, f.etag)) is not None:
                touched.add(folder)
        fsync_dirs(touched, top=self.layout.root)
        entries = {f.path: LockedFile(f.path, f.size, f.sha256, f.etag, dict(f.version)) for f in files}
        previous = read_lock(self.layout.lock_path(commit)) if is_ready(self.layout.ready_path(commit), commit) else None
        for old in (previous or {}).get("files", []):
            # Same commit pulled before with other filters: its files are still there and verified.
            if isinstance(layout_path := old.get("path"), str) and layout_path not in entries:
                extra = {k: v for k, v in old.items() if k not in ("path", "size", "sha256", "etag")}
                entries[layout_path] = LockedFile(layout_path, int(old["size"]), old.get("sha256"), old.get("etag"), extra)
        lock = Lock(
            source=self.ref.display(), revision=self.revision, commit=commit, engine=engine,
            include=self.settings.include, exclude=self.settings.exclude,
            files=tuple(entries[p] for p in sorted(entries)),
        )
        write_lock(self.layout.lock_path(commit), lock)
        write_ready(self.layout.ready_path(commit), commit)
        self.layout.write_ref(self.revision, commit)

    @staticmethod
    def _copy_duplicate(src: Path, dst: Path) -> Path:
        """Same content under a second path. Always copied: a file already there may hold another
        commit's bytes of the same size. Returns the folder, which the caller fsyncs once."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(dst)
        try:
            shutil.copyfile(src, tmp)
            promote(tmp, dst, fsync_parent=False)
        finally:
            tmp.unlink(missing_ok=True)
        return dst.parent

    def _result(self, commit: str, *, already_ready: bool = False, engine: str = "none",
                files: list[RemoteFile] | None = None) -> PullResult:
        if files is None:
            lock = read_lock(self.layout.lock_path(commit)) or {}
            entries = lock.get("files", [])
            nfiles, total = len(entries), sum(int(e.get("size", 0)) for e in entries)
            engine = lock.get("engine", engine)
        else:
            nfiles, total = len(files), sum(f.size for f in files)
        return PullResult(
            model=self.model, revision=self.revision, commit=commit, path=snapshot_path(self.layout, commit),
            files=nfiles, bytes_total=total, bytes_fetched=self.progress.fetched,
            bytes_resumed=self.progress.resumed,
            seconds=time.monotonic() - self.started, engine=engine, already_ready=already_ready,
        )
