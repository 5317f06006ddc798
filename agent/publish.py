"""`push`, the second half: publish a ready snapshot of the staging cache under DEST.

The order is the guarantee. `.model-agent/publishing` goes up first; a lockfile of another commit
comes down before any file is overwritten (readers see "not published", never a mix); the files go
up, each whole or not at all; the lockfile goes up last, then `publishing` comes down. A push killed
anywhere leaves no lockfile that vouches for what is not there, and its re-run uploads only what is
missing (the stored digest says which objects are already right).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .destinations.base import Destination, Stored, Upload
from .errors import InvalidInput, NotFound
from .lockfile import read_lock
from .log import Logger
from .progress import PullProgress
from .published import LOCK_NAME, PUBLISHING_NAME, RECORDS, NotOurs, PublishedLock, parse_lock, published_file


@dataclass
class PushResult:
    dest: str
    commit: str
    files: int
    uploaded_files: int
    uploaded_bytes: int
    skipped_files: int
    seconds: float
    already_published: bool = False
    last: str = "the lockfile"  # what made it visible, written after every file: a lockfile, or a manifest


def staged_lock(layout, commit: str, revision: str, source: str) -> PublishedLock:
    """The published lockfile of a snapshot the pull just made ready in the staging cache."""
    lock = read_lock(layout.lock_path(commit))
    if lock is None:
        raise NotFound(f"{source}@{commit[:12]}: the staging cache has no lockfile for this snapshot")
    what = f"{source}@{commit[:12]}"
    files = tuple(published_file(e, what) for e in lock["files"])
    return PublishedLock(repo_id=layout.repo_id, repo_type=layout.repo_type, revision=revision, commit=commit,
                         files=files, source=source)


class Publisher:
    def __init__(self, dest: Destination, lock: PublishedLock, snapshot: Path, settings: Settings, logger: Logger, *,
                 overwrite: bool = False, model: str = "", listeners: list | None = None, tty: bool = False):
        self.dest, self.lock, self.snapshot = dest, lock, snapshot
        self.settings, self.logger, self.overwrite = settings, logger, overwrite
        self.model = model or lock.repo_id  # the `model` label: the same as the pull's
        self.progress = PullProgress(logger, self.model, bar=tty and logger.fmt == "text",
                                     interval=settings.progress_interval, listeners=listeners)
        source = getattr(dest, "source", None)  # a bucket destination retries through its source's policy
        if source is not None and hasattr(source, "on_retry"):
            source.on_retry = lambda reason, delay, exc: self.progress.retry(reason, delay, str(exc))
        self._last = "the lockfile"  # what made the snapshot visible: a registry says its manifest instead
        self.started = time.monotonic()

    def what(self) -> str:
        return f"push {self.lock.repo_id}@{self.lock.commit[:12]} to {self.dest.display()}"

    def run(self) -> PushResult:
        if callable(getattr(self.dest, "publish", None)):
            return self._run_by_digest()
        current = self._published()
        self._refuse_another_model(current)
        stored = self.dest.stored()
        todo = self._missing(stored)
        if current is not None and current.same_model(self.lock) and current.commit == self.lock.commit and not todo:
            return self._result(0, 0, already=True)
        # The files an earlier commit published here: from its lockfile, or, if a push of this one died
        # after removing it, from that push's note. Only those are ever removed; a stranger's stay.
        previous = set(f.path for f in current.files) if current is not None else self._noted_previous()
        self.dest.write_record(PUBLISHING_NAME, self._publishing_note(previous))
        if current is not None:
            # Before the first byte of another commit lands: no reader may still trust the old lockfile.
            self.dest.delete_record(LOCK_NAME)
            self.logger.info("unpublished", f"{self.dest.display()}: removed the lockfile of "
                             f"{current.repo_id}@{current.commit[:12]} before publishing {self.lock.commit[:12]}",
                             dest=self.dest.display(), previous_commit=current.commit)
        self._upload(todo, present=sum(f.size for f in self.lock.files) - sum(u.size for u in todo))
        self._remove_stale(stored, previous)
        self.dest.write_record(LOCK_NAME, self.lock.to_bytes())
        self.dest.delete_record(PUBLISHING_NAME)
        self.dest.tidy()
        return self._result(len(todo), sum(u.size for u in todo))

    def _run_by_digest(self) -> PushResult:
        """A destination that owns the last step (a registry, agent/destinations/oci.py): `published()` is
        what it holds now, `missing(items)` the blobs it lacks, and `publish(lock)` makes the snapshot
        visible in one step (the manifest PUT flips the tag) and returns its digest. Nothing is
        unpublished first and nothing stale removed: blobs no manifest names are invisible, and the tag
        names the old manifest, whole, until the new one replaces it."""
        current = self._published_by_dest()
        self._refuse_another_model(current)
        todo = self.dest.missing([self._item(f) for f in self.lock.files])
        if current is not None and current.same_model(self.lock) and current.commit == self.lock.commit and not todo:
            return self._result(0, 0, already=True)
        self._upload(todo, present=sum(f.size for f in self.lock.files) - sum(u.size for u in todo))
        digest = self.dest.publish(self.lock)
        self._last = f"the manifest {digest}"
        self.logger.info("manifest_pushed", f"{self.dest.display()}: now names {digest} "
                         f"({self.lock.repo_id}@{self.lock.commit[:12]})", dest=self.dest.display(), digest=digest,
                         commit=self.lock.commit)
        return self._result(len(todo), sum(u.size for u in todo))

    def _published_by_dest(self) -> PublishedLock | None:
        try:
            return self.dest.published()
        except NotOurs as exc:
            if self.overwrite:
                return None
            raise InvalidInput(f"{self.what()}: {exc}; pass --overwrite to replace it") from None

    def _refuse_another_model(self, current: PublishedLock | None) -> None:
        if current is not None and not current.same_model(self.lock) and not self.overwrite:
            raise InvalidInput(f"{self.what()}: it already holds {current.repo_id}@{current.commit[:12]}, another "
                               "model: choose another prefix, or pass --overwrite to replace it")

    def _remove_stale(self, stored: dict[str, Stored], previous: set[str]) -> None:
        """Files an older commit published that this one has not (a renamed shard): tools that read the
        prefix directly (vLLM's runai streamer, KServe) would otherwise see both. Removed before the new
        lockfile goes up. Files no lockfile of ours named are left alone, and named in the log."""
        ours = {f.path for f in self.lock.files}
        stale = sorted(p for p in previous - ours if p in stored)
        foreign = sorted(set(stored) - ours - previous)
        if foreign:
            self.logger.warn("foreign_files", f"{self.dest.display()}: {len(foreign)} file(s) not in "
                             f"{self.lock.repo_id}@{self.lock.commit[:12]} left in place (e.g. {foreign[0]})",
                             dest=self.dest.display(), files=foreign[:20])
        if stale:
            self.dest.remove(stale)
            self.logger.info("removed_stale", f"{self.dest.display()}: removed {len(stale)} file(s) of the previous "
                             "commit", dest=self.dest.display(), files=stale[:20])

    def _noted_previous(self) -> set[str]:
        try:
            note = json.loads(self.dest.read_record(PUBLISHING_NAME) or b"{}")
            return {str(p) for p in note.get("replacing", [])}
        except (ValueError, AttributeError, TypeError):
            return set()

    def _published(self) -> PublishedLock | None:
        data = self.dest.read_record(LOCK_NAME)
        if data is None:
            return None
        try:
            return parse_lock(data, self.dest.display())
        except InvalidInput:
            if self.overwrite:
                return None
            raise InvalidInput(f"{self.what()}: {RECORDS}{LOCK_NAME} there is not a lockfile this agent can read: "
                               "pass --overwrite to replace it") from None

    def _missing(self, stored: dict[str, Stored]) -> list[Upload]:
        todo = []
        for f in self.lock.files:
            item = self._item(f)
            there = stored.get(f.path)
            if there is not None and there.size == f.size:
                if there.digest == f.etag or (there.digest is None and self.dest.confirm(item, there)):
                    continue
            todo.append(item)
        return todo

    def _item(self, f) -> Upload:
        return Upload(path=f.path, local=(self.snapshot / f.path).resolve(), size=f.size, digest=f.etag,
                      sha256=f.sha256)

    def _upload(self, todo: list[Upload], present: int) -> None:
        self.progress.set_phase("publish")
        total = sum(f.size for f in self.lock.files)
        self.progress.start_transfer(self.lock.commit, total, len(self.lock.files), present)
        self.logger.info("publish", f"{self.what()}: {len(todo)} of {len(self.lock.files)} files to upload, "
                         f"{sum(u.size for u in todo) / 2**20:.1f} MiB" if self.logger.fmt != "json" else "",
                         model=self.model, commit=self.lock.commit, dest=self.dest.display(), files=len(todo),
                         bytes_missing=sum(u.size for u in todo))
        # Large files go up in parallel parts inside the store's SDK: few files at a time, so the parts
        # of one file are not starved by many small ones, and the pool never exceeds --workers.
        lanes = max(1, min(4, self.settings.workers, len(todo)))
        stop = threading.Event()
        try:
            with ThreadPoolExecutor(lanes, thread_name_prefix="push") as pool:
                futures = [pool.submit(self._one, item, stop) for item in sorted(todo, key=lambda u: -u.size)]
                try:
                    wait(futures, return_when=FIRST_EXCEPTION)
                except BaseException:  # SIGTERM, ^C: cancel what is in flight rather than finish it
                    stop.set()
                    self.dest.close()
                    raise
                stop.set()
                for fut in futures:
                    if fut.done() and fut.exception() is not None:
                        raise fut.exception()
        finally:
            self.progress.stop()

    def _one(self, item: Upload, stop: threading.Event) -> None:
        if stop.is_set():
            return
        self.dest.upload(item, self.progress.add_bytes)
        self.progress.file_done(item)

    def _publishing_note(self, previous: set[str]) -> bytes:
        return json.dumps({"repo_id": self.lock.repo_id, "commit": self.lock.commit, "host": socket.gethostname(),
                           "pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "replacing": sorted(previous)}).encode()

    def _result(self, files: int, nbytes: int, already: bool = False) -> PushResult:
        return PushResult(dest=self.dest.display(), commit=self.lock.commit, files=len(self.lock.files),
                          uploaded_files=files, uploaded_bytes=nbytes, skipped_files=len(self.lock.files) - files,
                          seconds=time.monotonic() - self.started, already_published=already,
                          last=self._last)
