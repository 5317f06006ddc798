"""Sync mode: converge a cache to the models file, round after round, within a disk budget.

A round pulls every declared model (moving revisions are re-resolved, so a new commit on `main`
lands beside the old one and the ref flips only once it is ready), then collects garbage if the
cache is over its high watermark. One model failing, with an AgentError or an OSError, never stops
the others. Between rounds the loop sleeps for the interval, and wakes early when the models file
changes (a ConfigMap update arrives as a symlink swap, so the resolved path and its stat are
compared). `pull --config` runs the same round with garbage collection off: it shares volumes with
snapshots it knows nothing about.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import gc
from .config import Settings
from .cache_index import record_use
from .errors import AgentError, DiskFull, InvalidInput, from_oserror
from .layout import HubCacheLayout
from .log import Logger
from .metrics import Metrics
from .modelsfile import ModelsFile, ModelSpec, load
from .pipeline import Pull, PullResult
from .sources.base import SourceRef, open_source, parse_source


@dataclass
class RoundResult:
    """Keyed by declared entry (see `Declared.entry`): one repo at two revisions is two entries."""

    results: dict[str, PullResult] = field(default_factory=dict)
    errors: dict[str, AgentError] = field(default_factory=dict)
    freed: int = 0

    @property
    def exit_code(self) -> int:
        return next(iter(self.errors.values())).exit_code if self.errors else 0


def settings_for(spec: ModelSpec, base: Settings, mf: ModelsFile) -> Settings:
    """One model's settings: its own keys, then flags and MODEL_AGENT_* variables, then the file's
    defaults (cache_dir, workers, engine), then the built-in ones."""
    if base.local_dir is not None:
        raise InvalidInput("--local-dir does not apply to a models file: give the model its own `local_dir` in it")
    return dataclasses.replace(
        base,
        cache_dir=base.cache_dir_for(mf.cache_dir)[0],
        revision=spec.revision,
        include=spec.include,
        exclude=spec.exclude,
        repo_id=spec.repo_id or base.repo_id,
        engine=spec.engine or (base.engine if "engine" in base.explicit else mf.engine or base.engine),
        workers=base.workers if "workers" in base.explicit else mf.workers or base.workers,
        local_dir=spec.local_dir,
    )


@dataclass(frozen=True)
class Declared:
    """One model of the models file, with the names the metrics, the log and the round result use."""

    spec: ModelSpec
    ref: SourceRef
    model: str  # the `model` label, the same on every series: the repo id, `repo_id` for a bucket
    entry: str  # what readiness and the round's results are keyed by: model@revision

    @staticmethod
    def all(mf: ModelsFile, base: Settings) -> list[Declared]:
        out: list[Declared] = []
        for spec in mf.models:
            ref = parse_source(spec.source).known_as(spec.repo_id or base.repo_id)
            revision = spec.revision or ref.revision
            entry = f"{ref.model_id()}@{revision}" if revision else ref.model_id()
            taken = {d.entry for d in out}
            if entry in taken:  # the same repo and revision twice (other globs): still two entries
                entry = next(f"{entry}#{n}" for n in range(2, len(out) + 2) if f"{entry}#{n}" not in taken)
            out.append(Declared(spec, ref, ref.model_id(), entry))
        return out


@dataclass(frozen=True)
class Identity:
    """Where an entry's snapshots live in the cache, the revision it asks for, and the commit its last
    successful pull made ready (kept until a newer one is ready, as a Hub ref flips only then)."""

    repo_type: str
    repo_id: str
    revision: str
    commit: str | None = None


def ask_identity(d: Declared, base: Settings, mf: ModelsFile) -> Identity | None:
    """What the entry's source says it is, without pulling: a Hub repo its own name (no request); a
    bucket or path its `repo_id`, or the repo a published lockfile there names, with the revision and
    commit it holds now (one listing). None: it cannot say (unreachable, not published yet)."""
    try:
        settings = settings_for(d.spec, base, mf)
        source = open_source(d.ref, settings)
        try:
            repo_type, repo_id = source.layout_repo()
            revision = settings.revision or source.default_revision()
            # A bucket's default revision is the one its lockfile names; a listing that failed raises here.
            commit = None if d.ref.scheme == "hf" else source.resolve(revision)
            return Identity(repo_type, repo_id, revision, commit)
        finally:
            source.close()
    except (AgentError, OSError):
        return None


_ASK = object()  # not pulled yet in this process: ask the source


def keep_for(mf: ModelsFile, base: Settings, learned: dict[ModelSpec, Identity | None] | None = None) -> gc.Keep:
    """What GC keeps for this models file, by the identity each entry's last good pull used (`learned`,
    the sync daemon's memory; None there: its pulls failed, so its bucket is not asked again), else the
    one its source states now. A published mirror declared without `repo_id` is known only that way,
    and even with one, only its lockfile names the revision its ref is under. An entry whose identity
    is unknown could be any snapshot in the cache: it goes to `Keep.unknown`, and GC removes nothing
    while one is there. A Hub repo's identity is its name, so it is never unknown."""
    revisions: dict[tuple[str, str], set[str]] = {}
    pinned: set[tuple[str, str]] = set()
    unknown: list[str] = []
    for d in Declared.all(mf, base):
        if d.spec.local_dir is not None:
            continue  # flat files outside the cache: no snapshot in it is this entry's
        ident = (learned or {}).get(d.spec, _ASK)
        if ident is _ASK or (ident is None and d.ref.scheme == "hf"):
            ident = ask_identity(d, base, mf)
        if ident is None:
            unknown.append(d.model)
            continue
        key = (ident.repo_type, ident.repo_id)
        revisions.setdefault(key, set()).update(r for r in (ident.revision, ident.commit) if r)
        if d.spec.pin:
            pinned.add(key)
    return gc.Keep(revisions, pinned, unknown=tuple(unknown))


class Syncer:
    def __init__(self, config_path: Path, settings: Settings, logger: Logger, metrics: Metrics, *,
                 collect_garbage: bool = True):
        self.config_path = config_path
        self.settings = settings
        self.logger = logger
        self.metrics = metrics
        self.collect_garbage = collect_garbage
        self.lease_watches: dict = {}  # kept across rounds: a dead writer's lease is seen to stay unchanged
        self.identities: dict[ModelSpec, Identity | None] = {}  # what each entry's pulls used (keep_for)
        self.stop = threading.Event()
        self.interval = 600.0
        self._cache_choice: tuple | None = None

    def cache_dir(self, mf: ModelsFile) -> Path:
        """Where this models file's models go; logged when the choice changes, with what it overrode
        (an image's HF_HOME must never silently beat the file's cache_dir, nor the file a flag)."""
        path, decided_by, ignored = self.settings.cache_dir_for(mf.cache_dir)
        if (path, decided_by) != self._cache_choice:
            self._cache_choice = (path, decided_by)
            note = f"; ignored {', '.join(ignored)}" if ignored else ""
            self.logger.info("cache_dir", f"cache_dir {path} (from {decided_by}{note})" if self.logger.fmt != "json" else "",
                             cache_dir=str(path), **{"from": decided_by}, ignored=ignored)
        return path

    def _pull(self, d: Declared, mf: ModelsFile) -> PullResult:
        settings, ref = settings_for(d.spec, self.settings, mf), d.ref
        try:
            try:
                pull = Pull(ref, settings, self.logger, listeners=[self.metrics])
                result = pull.run()
            except OSError as exc:
                raise from_oserror(exc, ref.display()) from exc
        except Exception:
            # The last good pull's identity (and commit) stays; without one, the entry is unknown to GC.
            self.identities.setdefault(d.spec, None)
            raise
        if isinstance(pull.layout, HubCacheLayout):  # the source's own word: a mirror's lockfile names it
            self.identities[d.spec] = Identity(pull.layout.repo_type, pull.layout.repo_id, result.revision, result.commit)
        record_use(pull.layout, result.commit)  # declared and ready this round: in use
        return result

    def _pull_with_gc(self, d: Declared, mf: ModelsFile, round_: RoundResult) -> PullResult:
        try:
            return self._pull(d, mf)
        except DiskFull as exc:
            if not self.collect_garbage:
                raise
            # Make room for this pull now, whatever the high watermark says, then try once more.
            victims, freed, _ = self._collect(mf, need=max(exc.need - exc.free, 1), force_need=True)
            round_.freed += freed
            if not victims:
                raise DiskFull(f"{exc} (and garbage collection found nothing it may remove)", need=exc.need, free=exc.free) from None
            return self._pull(d, mf)

    def _collect(self, mf: ModelsFile, need: int = 0, force_need: bool = False):
        cache = self.cache_dir(mf)
        if not cache.is_dir():  # not created yet (each pull creates what it needs): nothing to collect
            return [], 0, 0
        high, low, by_volume = mf.limits(cache)
        if force_need:
            used = gc.usage(cache, gc.scan(cache), by_volume)[0]
            high = min(high, used)  # over the mark by definition: we need `need` bytes now
        keep = keep_for(mf, self.settings, self.identities)
        outcome = gc.collect(cache, keep, high=high, low=low, by_volume=by_volume,
                             lease_ttl=self.settings.lease_ttl, need=need, watches=self.lease_watches)
        victims, freed = outcome.victims, outcome.freed
        for repo_id, why in outcome.skipped:
            log = self.logger.warn if repo_id in keep.unknown else self.logger.info
            log("gc_skipped", f"gc left {repo_id} alone: {why}" if self.logger.fmt != "json" else "", model=repo_id, reason=why)
        for v in victims:
            self.logger.info("gc", f"removed {v.repo.repo_id}@{v.snapshot.commit[:12]} ({v.reason}), freed {v.frees} bytes"
                             if self.logger.fmt != "json" else "", model=v.repo.repo_id, commit=v.snapshot.commit,
                             reason=v.reason, bytes=v.frees)
        if victims:
            self.metrics.gc_freed.inc(freed)
            self.metrics.gc_removed.inc(len(victims))
        return victims, freed, outcome.used

    def _failed(self, result: RoundResult, d: Declared, exc: AgentError) -> None:
        result.errors[d.entry] = exc
        self.metrics.finished(d.model, d.spec.revision or "main", "", 0.0, exc.kind, entry=d.entry)
        self.logger.error(exc.kind, f"{d.entry}: {exc}", model=d.model, entry=d.entry, exit_code=exc.exit_code)

    def _collect_after_round(self, mf: ModelsFile) -> int:
        if not self.collect_garbage:
            return 0
        try:
            return self._collect(mf)[1]
        except OSError as exc:  # the models are pulled; a GC that could not finish is retried next round
            err = from_oserror(exc, "garbage collection after the round")
            self.logger.error(err.kind, str(err), exit_code=err.exit_code)
            return 0

    def round(self) -> RoundResult:
        started = time.monotonic()
        mf = load(self.config_path)
        self.cache_dir(mf)  # logs which cache_dir won, when that changes
        self.interval = mf.interval
        declared = Declared.all(mf, self.settings)
        self.metrics.declare({d.entry: d.model for d in declared})
        result = RoundResult()
        for d in declared:
            if self.stop.is_set():
                break
            self.metrics.set_source(d.model, d.ref.scheme)
            try:
                result.results[d.entry] = r = self._pull_with_gc(d, mf, result)
                self.metrics.finished(d.model, r.revision, r.commit, r.seconds, "success", entry=d.entry)
            except AgentError as exc:
                self._failed(result, d, exc)
            except OSError as exc:  # outside a pull (e.g. the GC that makes room): still this model's failure
                self._failed(result, d, from_oserror(exc, "garbage collection making room"))
        result.freed += self._collect_after_round(mf)
        ready = sum(1 for d in declared if self.metrics.is_ready(d.entry))
        self.metrics.models_ready.set(ready)
        outcome = "success" if not result.errors else ("failed" if not result.results else "partial")
        self.metrics.sync_rounds.labels(outcome).inc()
        self.metrics.sync_duration.observe(time.monotonic() - started)
        self.logger.info("sync_round", f"sync round: {ready}/{len(declared)} models ready, {len(result.errors)} failed, "
                         f"{result.freed} bytes freed" if self.logger.fmt != "json" else "",
                         ready=ready, declared=len(declared), failed=sorted(result.errors), freed_bytes=result.freed,
                         seconds=round(time.monotonic() - started, 3))
        return result

    def _config_stamp(self) -> tuple:
        try:
            real = os.path.realpath(self.config_path)
            st = os.stat(real)
            return real, st.st_ino, st.st_mtime_ns, st.st_size
        except OSError:
            return ()

    def run_forever(self, interval: float | None, watch_every: float = 1.0) -> None:
        """Converge every `interval` seconds (None: the models file's own `interval`) until stopped."""
        while not self.stop.is_set():
            stamp = self._config_stamp()
            try:
                self.round()
            except (AgentError, OSError) as exc:  # e.g. the models file is broken: keep the last good cache, retry
                err = from_oserror(exc, str(self.config_path)) if isinstance(exc, OSError) else exc
                self.logger.error(err.kind, f"sync round failed: {err}", exit_code=err.exit_code)
                self.metrics.sync_rounds.labels("failed").inc()
            deadline = time.monotonic() + (interval or self.interval)
            while not self.stop.is_set() and time.monotonic() < deadline:
                if self._config_stamp() != stamp:
                    self.logger.info("config_changed", f"{self.config_path} changed: converging now")
                    break
                self.stop.wait(min(watch_every, max(deadline - time.monotonic(), 0.01)))
