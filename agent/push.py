"""`model-agent push SOURCE DEST`: the normal pull into a staging cache, then `publish.Publisher`.

The staging cache is `--cache-dir` (a snapshot already ready there is reused: a re-run, or a Job
that publishes what a node already holds, downloads nothing). Exit codes, logs, progress and
metrics are the pull's; the upload adds model_agent_bytes_uploaded_total and the `publish` phase.
"""

from __future__ import annotations

import sys
import time

from .cache_index import record_use
from .commands import _summary, _with_metrics
from .config import Settings
from .destinations.base import open_destination, parse_destination
from .errors import AgentError, InvalidInput
from .log import Logger
from .pipeline import Pull
from .progress import human_bytes
from .publish import Publisher, PushResult, staged_lock
from .sources.base import parse_source


def run_push(args, settings: Settings, logger: Logger) -> int:
    if settings.local_dir is not None:
        raise InvalidInput("push: the staging area is a Hugging Face cache (--cache-dir); --local-dir does not apply")
    ref = parse_source(args.source).known_as(settings.repo_id)
    dest_ref = parse_destination(args.dest)
    if dest_ref.display() == ref.display():
        raise InvalidInput(f"push: SOURCE and DEST are the same place ({ref.display()})")
    model = ref.model_id()

    def go(metrics) -> PushResult:
        metrics.expect(model)
        tty = sys.stderr.isatty()
        pull = Pull(ref, settings, logger, tty=tty, listeners=[metrics])
        try:
            staged = pull.run()
        except AgentError as exc:
            metrics.finished(model, pull.revision, "", time.monotonic() - pull.started, exc.kind)
            raise
        record_use(pull.layout, staged.commit)
        _summary(logger, staged)
        lock = staged_lock(pull.layout, staged.commit, staged.revision, ref.display())
        dest = open_destination(dest_ref, settings)
        try:
            publisher = Publisher(dest, lock, staged.path, settings, logger, overwrite=settings.overwrite, model=model,
                                  listeners=[metrics.upload_listener(dest_ref.scheme)], tty=tty)
            result = publisher.run()
        except AgentError as exc:
            metrics.finished(model, staged.revision, "", time.monotonic() - pull.started, exc.kind)
            raise
        finally:
            dest.close()
        metrics.finished(model, staged.revision, staged.commit, time.monotonic() - pull.started, "success")
        return result

    result = _with_metrics(settings, logger, model, go, source_label=ref.scheme)
    _push_summary(logger, model, result)
    return 0


def _push_summary(logger: Logger, model: str, r: PushResult) -> None:
    rate = r.uploaded_bytes / r.seconds if r.seconds > 0 else 0
    if r.already_published:
        text = f"{model}@{r.commit[:12]}: already published at {r.dest}, every file in place"
    else:
        text = (f"{model}@{r.commit[:12]} published at {r.dest}: {r.files} files, uploaded {r.uploaded_files} "
                f"({human_bytes(r.uploaded_bytes)}) in {r.seconds:.1f}s ({human_bytes(rate)}/s), "
                f"{r.skipped_files} already there; {r.last} written last")
    logger.info("published", text if logger.fmt != "json" else "", model=model, dest=r.dest, commit=r.commit,
                files=r.files, uploaded_files=r.uploaded_files, uploaded_bytes=r.uploaded_bytes,
                skipped_files=r.skipped_files, seconds=round(r.seconds, 3), already_published=r.already_published)
