"""The sub-commands: each turns parsed settings into calls of the pipeline and one summary line."""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from .cache_index import record_use
from .config import Settings
from .token import Credential
from .inspect_cache import verify_snapshot, wait_ready
from .log import Logger
from .pipeline import Pull, PullResult, make_layout
from .progress import human_bytes
from .sources.base import open_source, parse_source


def _summary(logger: Logger, r: PullResult) -> None:
    from .memory import peak_rss

    rate = r.bytes_fetched / r.seconds if r.seconds > 0 else 0
    # The process's high-water mark so far (a models file's later summaries include the earlier pulls),
    # and hf_transfer's child's, which the pod's limit counts too.
    own, child = peak_rss()
    peak = f"peak RSS {human_bytes(own)}" + (f" (+ {human_bytes(child)} in a child)" if child else "")
    if r.already_ready:
        text = f"{r.model}@{r.revision}: already present and verified at {r.commit} ({r.path}); {peak}"
    else:
        resumed = f" ({human_bytes(r.bytes_resumed)} resumed from disk)" if r.bytes_resumed else ""
        text = (f"{r.model}@{r.revision} -> {r.commit}: {r.files} files, {human_bytes(r.bytes_total)}, "
                f"fetched {human_bytes(r.bytes_fetched)}{resumed} in {r.seconds:.1f}s ({human_bytes(rate)}/s) "
                f"with {r.engine}, {peak}; ready at {r.path}")
    # The rate is the network's: bytes resumed from disk were not transferred.
    logger.info("summary", text if logger.fmt != "json" else "", model=r.model, revision=r.revision, commit=r.commit,
                files=r.files, bytes=r.bytes_total, bytes_fetched=r.bytes_fetched, bytes_resumed=r.bytes_resumed,
                seconds=round(r.seconds, 3), engine=r.engine, avg_rate_bps=int(rate), already_ready=r.already_ready,
                path=str(r.path), peak_rss_bytes=own, **({"peak_rss_child_bytes": child} if child else {}))


def cmd_pull(args, settings: Settings, logger: Logger, env) -> int:
    from .errors import AgentError, InvalidInput

    if bool(settings.config) == bool(args.source):
        raise InvalidInput("pull: give either SOURCE or --config models.yaml (or MODEL_AGENT_CONFIG)")
    if settings.config:
        return _pull_config(args, settings, logger)
    ref = parse_source(args.source).known_as(settings.repo_id)
    model = ref.model_id()

    def go(metrics) -> PullResult:
        metrics.expect(model)
        pull = Pull(ref, settings, logger, tty=sys.stderr.isatty(), listeners=[metrics])
        try:
            result = pull.run()
        except AgentError as exc:
            metrics.finished(model, pull.revision, "", time.monotonic() - pull.started, exc.kind)
            raise
        metrics.finished(model, result.revision, result.commit, result.seconds, "success")
        record_use(pull.layout, result.commit)  # LRU's last use (cache_index.py)
        return result

    result = _with_metrics(settings, logger, model, go, source_label=ref.scheme)
    _summary(logger, result)
    return 0


def _layout_for(args, settings: Settings):
    ref = parse_source(args.source)
    source = open_source(ref, settings)
    return ref, make_layout(settings, source), settings.revision or source.default_revision()


def cmd_wait(args, settings: Settings, logger: Logger, env) -> int:
    from .metrics import Metrics

    ref, layout, revision = _layout_for(args, settings)
    model = ref.model_id()
    metrics = Metrics(source_label=ref.scheme)
    metrics.expect(model)
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_port)
    try:
        commit = wait_ready(layout, revision, timeout=settings.wait_timeout, poll=settings.poll_interval,
                            logger=logger, model=model)
        metrics.mark_ready(model, revision, commit)
        record_use(layout, commit)  # LRU's last use; ignored on a read-only mount
    finally:
        metrics.close()
    return 0


def cmd_verify(args, settings: Settings, logger: Logger, env) -> int:
    ref, layout, revision = _layout_for(args, settings)
    commit, files, total = verify_snapshot(layout, revision, ref.model_id())
    logger.info("verified", f"{ref.model_id()}@{revision} ({commit}): {files} files, {human_bytes(total)}, all checksums match",
                model=ref.model_id(), commit=commit, files=files, bytes=total)
    return 0


def cmd_demo(args, settings: Settings, logger: Logger, env) -> int:
    from .devhub import HubServer, make_demo_model

    cache_dir = Path(args.cache_dir or "model-cache").absolute()
    with tempfile.TemporaryDirectory(prefix="model-agent-demo-") as tmp:
        files = make_demo_model(Path(tmp) / "model")
        # Like the real Hub, the embedded one stores large files in Xet, so `auto` shows its choice.
        with HubServer(Path(tmp) / "hub", xet="http" if settings.engine in ("auto", "xet") else False) as hub:
            hub.add_repo("demo-org/tiny-llm", files)
            logger.info("demo", f"embedded Hub serving demo-org/tiny-llm at {hub.url} (no network needed)")
            demo_settings = dataclasses.replace(settings, cache_dir=cache_dir, hf_endpoint=hub.url, credential=Credential(None),
                                                offline=False, xet_disabled=False, local_dir=None)
            ref = parse_source("demo-org/tiny-llm")
            result = Pull(ref, demo_settings, logger, tty=sys.stderr.isatty()).run()
            _summary(logger, result)
    print(f"""
Snapshot ready: {result.path}
Ready marker:   {cache_dir}/models--demo-org--tiny-llm/.model-agent/{result.commit}.ready

A consumer mounts {cache_dir} (read-only) and loads offline:
  HF_HUB_CACHE={cache_dir} HF_HUB_OFFLINE=1 vllm serve demo-org/tiny-llm --revision {result.commit}
  python -c "from huggingface_hub import snapshot_download as s; print(s('demo-org/tiny-llm', cache_dir='{cache_dir}', local_files_only=True))"
Run it again: nothing is downloaded, the marker says it is all there.""")
    return 0


def _with_metrics(settings: Settings, logger: Logger, model: str, fn, source_label: str = "hf", node: str | None = None):
    """Run `fn(metrics)` with the metrics endpoints, textfile and Pushgateway export around it."""
    from .metrics import Exporter, Metrics

    metrics = Metrics(source_label=source_label)
    if settings.metrics_port is not None:
        port = metrics.serve(settings.metrics_port)
        logger.info("metrics", f"serving /metrics, /healthz, /readyz on port {port}", port=port)
    try:
        with Exporter(metrics, textfile=settings.metrics_textfile, pushgateway=settings.pushgateway, model=model,
                      logger=logger, node=node):
            return fn(metrics)
    finally:
        metrics.close()


def _pull_config(args, settings: Settings, logger: Logger) -> int:
    """Several models, one process: each is pulled even if another fails; exit code of the first failure."""
    from .sync import Syncer

    def go(metrics) -> int:
        # Never GC: the volume may hold other teams' snapshots this file knows nothing about.
        syncer = Syncer(settings.config, settings, logger, metrics, collect_garbage=False)
        result = syncer.round()
        for r in result.results.values():
            _summary(logger, r)
        return result.exit_code

    return _with_metrics(settings, logger, "models-file", go)


def cmd_sync(args, settings: Settings, logger: Logger, env) -> int:
    from .sync import Syncer

    from .errors import InvalidInput

    if settings.config is None:
        raise InvalidInput("sync: --config models.yaml (or MODEL_AGENT_CONFIG) is required")

    def go(metrics) -> int:
        syncer = Syncer(settings.config, settings, logger, metrics)
        if settings.once:
            return syncer.round().exit_code
        syncer.run_forever(settings.interval)
        return 0

    # The DaemonSet sets it from the downward API's spec.nodeName: a pod's host name is the pod's name.
    return _with_metrics(settings, logger, "sync", go, node=env.get("MODEL_AGENT_NODE_NAME") or None)


def _keep_and_budget(args, settings: Settings):
    from . import gc
    from .modelsfile import load
    from .sync import keep_for

    mf = load(settings.config) if settings.config else None
    cache = settings.cache_dir_for(mf.cache_dir if mf is not None else None)[0]
    # No declared list: each snapshot's lockfile says whether it is still wanted (gc.py, `Keep.listed`).
    keep = keep_for(mf, settings) if mf is not None else gc.Keep({}, set(), listed=False)
    return cache, keep, mf


def cmd_gc(args, settings: Settings, logger: Logger, env) -> int:
    from . import gc

    cache, keep, mf = _keep_and_budget(args, settings)
    if settings.max_bytes is not None:
        limit = settings.max_bytes
        budget = dict(high=limit, low=limit, by_volume=False)
    elif mf is not None and cache.is_dir():
        high, low, by_volume = mf.limits(cache)
        budget = dict(high=high, low=low, by_volume=by_volume)
    else:
        budget = dict(high=0, low=0, by_volume=False, force=True)
    out = gc.collect(cache, keep, lease_ttl=settings.lease_ttl, dry_run=settings.dry_run, **budget)
    verb = "would remove" if settings.dry_run else "removed"
    for repo_id, why in out.skipped:  # on stderr, like every log line: stdout lists what goes
        logger.info("gc_skipped", f"left {repo_id} alone: {why}" if logger.fmt != "json" else "", model=repo_id, reason=why)
    for v in out.victims:
        print(f"{verb} {v.repo.repo_id}@{v.snapshot.commit} ({v.reason}; last used "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(v.snapshot.last_used))}): {human_bytes(v.frees)}")
    print(f"{verb} {len(out.victims)} snapshots, {human_bytes(out.freed)} (cache was {human_bytes(out.used)})")
    return 0


def cmd_list(args, settings: Settings, logger: Logger, env) -> int:
    import json

    from .cache_index import scan

    cache, keep, mf = _keep_and_budget(args, settings)
    rows = []
    for repo in scan(cache):
        declared = (repo.repo_type, repo.repo_id) in keep.revisions if mf is not None else None
        for commit, snap in repo.snapshots.items():
            rows.append({
                "repo_id": repo.repo_id, "repo_type": repo.repo_type, "commit": commit,
                "revisions": repo.revisions_of(commit), "size": snap.size, "ready": snap.ready,
                "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.last_used)) if snap.last_used else None,
                "declared": declared, "pinned": (repo.repo_type, repo.repo_id) in keep.pinned,
            })
    if args.json:
        print(json.dumps({"cache_dir": str(cache), "snapshots": rows}, indent=2))
        return 0
    print(f"{'MODEL':40} {'COMMIT':12} {'REVISIONS':16} {'SIZE':>10} {'READY':5} {'DECLARED':8} LAST USED")
    for r in rows:
        declared = "-" if r["declared"] is None else ("pinned" if r["pinned"] else ("yes" if r["declared"] else "no"))
        print(f"{r['repo_id']:40} {r['commit'][:12]:12} {','.join(r['revisions']) or '-':16} {human_bytes(r['size']):>10} "
              f"{'yes' if r['ready'] else 'no':5} {declared:8} {r['last_used'] or '-'}")
    return 0


def cmd_push(args, settings: Settings, logger: Logger, env) -> int:
    from .push import run_push

    return run_push(args, settings, logger)
