"""Command line: `model-agent` and `python -m agent`. The only place that maps errors to exit codes."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Sequence

from .config import Settings, build_settings
from .errors import AgentError, from_oserror
from .log import Logger, add_secret, redact
from .versions import version_report

EPILOG = """exit codes: 0 done, 1 internal error, 2 invalid input, 3 auth refused, 4 not found,
5 integrity, 6 disk full, 7 transient failures outlasted retries, 8 timed out.
Every option also reads from MODEL_AGENT_<OPTION>, e.g. MODEL_AGENT_CACHE_DIR, MODEL_AGENT_ONCE=1.
The cache: --cache-dir, else a models file's cache_dir, else HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE,
HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""


def _common(p: argparse.ArgumentParser) -> None:
    # default=None everywhere: build_settings tells "not given" from a value, then tries the env.
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cache-dir", help="HF cache (default: HF_HUB_CACHE, HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub)")
    where.add_argument("--local-dir", help="put the files flat under this folder instead")
    p.add_argument("--repo-id", help="ORG/NAME to store an object-store source under in the HF layout")
    p.add_argument("--log-format", choices=("text", "json"), help="default: text on a terminal, json otherwise")
    p.add_argument("--token-file", help="file holding the Hub token, re-read when it changes (else HF_TOKEN, HF_TOKEN_PATH)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    _registry_options(p)


def _registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry-auth-file", help="docker config file with registry credentials (else REGISTRY_AUTH_FILE, "
                                                "DOCKER_CONFIG/config.json, ~/.docker/config.json)")
    p.add_argument("--plain-http", action="store_true", default=None, help="talk to an oci:// registry over plain HTTP")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model-agent", description="Put model weights on a cache volume, once, correctly.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_report())
    sub = parser.add_subparsers(dest="command", required=True)

    pull = sub.add_parser("pull", help="download a snapshot to the cache, crash-safe", epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    pull.add_argument("source", nargs="?", help="ORG/NAME, hf://ORG/NAME@REV, hf://datasets/ORG/NAME, ...")
    pull.add_argument("--config", help="models file (YAML): pull every model in it, in one process")
    _common(pull)
    pull.add_argument("--include", action="append", help="glob of files to fetch (repeatable)")
    pull.add_argument("--exclude", action="append", help="glob of files to skip (repeatable)")
    pull.add_argument("--engine", choices=("auto", "xet", "hf_transfer", "http"))
    pull.add_argument("--workers", type=int, help="parallel connections (default 8)")
    pull.add_argument("--stall-timeout", help="give up on a connection silent this long, then retry (default 60s)")
    pull.add_argument("--chunk-size", help="size of the parallel ranges of a large file (default 64Mi)")
    pull.add_argument("--direct-io", choices=("auto", "on", "off"),
                      help="write large files past the page cache (O_DIRECT); auto: on ext4, xfs, btrfs; on: any file system")
    pull.add_argument("--disk-margin", help="free space to keep beyond the download (default 256Mi)")
    pull.add_argument("--lock-timeout", help="give up (exit 8) if another writer holds the model this long (default: wait)")
    pull.add_argument("--lease-ttl", help="a writer silent this long is presumed dead (default 60s)")
    pull.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz on this port")
    pull.add_argument("--metrics-textfile", help="write metrics here for node-exporter's textfile collector")
    pull.add_argument("--pushgateway", help="push metrics to this Prometheus Pushgateway URL")
    pull.add_argument("--progress-interval", help="seconds between JSON progress lines (default 10s)")
    pull.add_argument("--memory-limit",
                      help="memory to plan buffers for, e.g. 2Gi (default: the cgroup memory limit, else the host RAM)")

    wait = sub.add_parser("wait", help="block until a snapshot is ready (exit 8 on timeout)")
    wait.add_argument("source")
    _common(wait)
    wait.add_argument("--timeout", help="default 30m")
    wait.add_argument("--poll-interval", help="default 2s")
    wait.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz while waiting")

    verify = sub.add_parser("verify", help="re-hash every file of a snapshot against its lockfile")
    verify.add_argument("source")
    _common(verify)

    sync = sub.add_parser("sync", help="keep the cache equal to a models file, within a disk budget")
    sync.add_argument("--config", help="models file (YAML), e.g. a mounted ConfigMap (required)")
    # default=None, not False: "not given" must let MODEL_AGENT_ONCE decide (an init container's env)
    sync.add_argument("--once", action="store_true", default=None, help="converge once and exit (init containers)")
    sync.add_argument("--interval", help="time between rounds (default: the file's `interval`, else 10m)")
    sync.add_argument("--cache-dir")
    sync.add_argument("--engine", choices=("auto", "xet", "hf_transfer", "http"))
    sync.add_argument("--workers", type=int)
    sync.add_argument("--token-file")
    sync.add_argument("--endpoint-url")
    _registry_options(sync)
    sync.add_argument("--metrics-port", type=int)
    sync.add_argument("--metrics-textfile")
    sync.add_argument("--pushgateway")
    sync.add_argument("--log-format", choices=("text", "json"))
    sync.add_argument("--lease-ttl")
    sync.add_argument("--progress-interval")
    sync.add_argument("--memory-limit")

    lst = sub.add_parser("list", help="every model in the cache: revisions, commits, size, ready, last use")
    lst.add_argument("--cache-dir")
    lst.add_argument("--config", help="models file: also say which models are declared")
    lst.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    lst.add_argument("--log-format", choices=("text", "json"))

    gcp = sub.add_parser("gc", help="remove snapshots nobody wants, least recently used first")
    gcp.add_argument("--cache-dir")
    gcp.add_argument("--config", help="models file: its models (and pins) are kept, others may go")
    gcp.add_argument("--max-bytes", help="shrink the cache to at most this size (e.g. 500Gi)")
    gcp.add_argument("--dry-run", action="store_true", default=None, help="print what would go and why, remove nothing")
    gcp.add_argument("--log-format", choices=("text", "json"))
    gcp.add_argument("--lease-ttl")

    push = sub.add_parser("push", help="pull a snapshot into a staging cache, then publish it to a bucket or a path",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    push.add_argument("source", help="ORG/NAME, hf://ORG/NAME@REV, s3://..., a path: anything `pull` reads")
    push.add_argument("dest", help="s3://BUCKET/PREFIX/, gs://..., az://..., or a path (an NFS export)")
    _common(push)
    push.add_argument("--include", action="append", help="glob of files to publish (repeatable)")
    push.add_argument("--exclude", action="append", help="glob of files to leave out (repeatable)")
    push.add_argument("--engine", choices=("auto", "xet", "hf_transfer", "http"))
    push.add_argument("--workers", type=int, help="parallel connections, for the pull and the upload (default 8)")
    push.add_argument("--chunk-size", help="size of the parallel ranges and upload parts of a large file (default 64Mi)")
    push.add_argument("--stall-timeout", help="give up on a connection silent this long, then retry (default 60s)")
    push.add_argument("--overwrite", action="store_true", default=None,
                      help="replace DEST even if it holds another model's published lockfile")
    push.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz on this port")
    push.add_argument("--metrics-textfile", help="write metrics here for node-exporter's textfile collector")
    push.add_argument("--pushgateway", help="push metrics to this Prometheus Pushgateway URL")
    push.add_argument("--progress-interval", help="seconds between JSON progress lines (default 10s)")
    push.add_argument("--memory-limit",
                      help="memory to plan buffers for, e.g. 2Gi (default: the cgroup memory limit, else the host RAM)")

    demo = sub.add_parser("demo", help="serve a generated model from an embedded Hub and pull it (no network)")
    demo.add_argument("--cache-dir", default=None, help="default ./model-cache")
    demo.add_argument("--engine", choices=("auto", "xet", "hf_transfer", "http"))
    demo.add_argument("--log-format", choices=("text", "json"))
    return parser


def make_logger(settings: Settings) -> Logger:
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    return Logger(fmt)


class Terminated(BaseException):
    """SIGTERM (pod deletion, node drain): unwind so the lease is released and resume records flushed."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated()


def _early_log_format(args, env: dict[str, str]) -> str:
    fmt = getattr(args, "log_format", None) or env.get("MODEL_AGENT_LOG_FORMAT") or "auto"
    if fmt not in ("text", "json"):
        fmt = "text" if sys.stderr.isatty() else "json"
    return fmt


def _export_expanded_paths(env: dict[str, str]) -> None:
    """hf_xet reads HF_HOME itself (its logs, its cache) and does not expand `$VAR` or `~`: give the
    libraries in this process the path the agent resolved, not a literal `$VOLUME` folder in cwd."""
    from .config import expand

    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_XET_CACHE", "XDG_CACHE_HOME"):
        value = env.get(name)
        if value and ("$" in value or value.startswith("~")):
            os.environ[name] = str(expand(value, env))


def run(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> int:
    own_env = env is None
    env = dict(os.environ if env is None else env)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    args = build_parser().parse_args(argv)
    # Until the settings are built (they may be what is wrong), log in the format asked for.
    logger = Logger(_early_log_format(args, env))
    try:
        settings = build_settings(vars(args), env)
        if own_env:
            _export_expanded_paths(env)
        add_secret(settings.token)
        for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN",
                     "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET"):
            add_secret(env.get(name))
        logger = make_logger(settings)
        from . import commands

        return getattr(commands, f"cmd_{args.command}")(args, settings, logger, env)
    except AgentError as exc:
        logger.error(exc.kind, redact(str(exc)), exit_code=exc.exit_code)
        return exc.exit_code
    except OSError as exc:
        # File-system trouble outside a transfer (records, links, sidecars) still has a meaning.
        err = from_oserror(exc, f"model-agent {args.command}")
        logger.error(err.kind, redact(str(err)), exit_code=err.exit_code)
        return err.exit_code
    except KeyboardInterrupt:
        logger.error("interrupted", "interrupted; partial files are kept and the next pull resumes them")
        return 130
    except Terminated:
        if args.command == "sync":  # the normal way a long-running sync container stops
            logger.info("stopped", "SIGTERM: sync stopped; partial files are kept and the next round resumes them")
            return 0
        logger.error("terminated", "SIGTERM; partial files are kept and the next pull resumes them")
        return 143
    except Exception as exc:  # noqa: BLE001 - the one place that turns the unexpected into exit 1
        logger.error("internal", redact(f"internal error: {type(exc).__name__}: {exc}"), exit_code=1)
        if env.get("MODEL_AGENT_DEBUG"):
            raise
        return 1


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
