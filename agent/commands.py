"""The sub-commands: each turns parsed settings into calls of the pipeline and one summary line."""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from .config import Settings
from .inspect_cache import verify_snapshot, wait_ready
from .log import Logger
from .pipeline import Pull, PullResult, make_layout
from .progress import human_bytes
from .sources.base import open_source, parse_source


def _summary(logger: Logger, r: PullResult) -> None:
    rate = r.bytes_fetched / r.seconds if r.seconds > 0 else 0
    if r.already_ready:
        text = f"{r.model}@{r.revision}: already present and verified at {r.commit} ({r.path})"
    else:
        text = (f"{r.model}@{r.revision} -> {r.commit}: {r.files} files, {human_bytes(r.bytes_total)}, "
                f"fetched {human_bytes(r.bytes_fetched)} in {r.seconds:.1f}s ({human_bytes(rate)}/s) with {r.engine}; "
                f"ready at {r.path}")
    logger.info("summary", text if logger.fmt != "json" else "", model=r.model, revision=r.revision, commit=r.commit,
                files=r.files, bytes=r.bytes_total, bytes_fetched=r.bytes_fetched, seconds=round(r.seconds, 3),
                engine=r.engine, avg_rate_bps=int(rate), already_ready=r.already_ready, path=str(r.path))


def cmd_pull(args, settings: Settings, logger: Logger, env) -> int:
    from .errors import AgentError
    from .metrics import Exporter, Metrics

    ref = parse_source(args.source)
    model = ref.model_id()
    metrics = Metrics(source_label=ref.scheme)
    metrics.expect(model)
    if settings.metrics_port is not None:
        port = metrics.serve(settings.metrics_port)
        logger.info("metrics", f"serving /metrics, /healthz, /readyz on port {port}", port=port)
    pull = Pull(ref, settings, logger, tty=sys.stderr.isatty(), listeners=[metrics])
    try:
        with Exporter(metrics, textfile=settings.metrics_textfile, pushgateway=settings.pushgateway, model=model,
                      logger=logger):
            try:
                result = pull.run()
            except AgentError as exc:
                metrics.finished(model, pull.revision, "", time.monotonic() - pull.started, exc.kind)
                raise
            metrics.finished(model, result.revision, result.commit, result.seconds, "success")
    finally:
        metrics.close()
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
        with HubServer(Path(tmp) / "hub") as hub:
            hub.add_repo("demo-org/tiny-llm", files)
            logger.info("demo", f"embedded Hub serving demo-org/tiny-llm at {hub.url} (no network needed)")
            demo_settings = dataclasses.replace(settings, cache_dir=cache_dir, hf_endpoint=hub.url, token=None,
                                                offline=False, local_dir=None)
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
