"""Prometheus metrics with the contract's names, on a registry of their own.

The same object serves `/metrics`, `/healthz` and `/readyz` (`--metrics-port`), rewrites a
node-exporter textfile atomically (`--metrics-textfile`) and pushes to a Pushgateway
(`--pushgateway`). Labels are bounded: `model` is the normalized source id, never a file path or
a URL with a query string.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST, push_to_gateway

from .layout import atomic_write
from .memory import peak_rss

PHASES = ("resolve", "waiting", "plan", "transfer", "commit", "publish", "done", "failed")
# A 600 GB pull over a slow link takes hours: buckets reach well past that.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)


class Metrics:
    def __init__(self, source_label: str = "hf"):
        self.registry = CollectorRegistry()
        self.source_label = source_label
        r = self.registry
        self.bytes_expected = Gauge("model_agent_bytes_expected", "Bytes in the requested snapshot", ["model"], registry=r)
        self.bytes_downloaded = Counter("model_agent_bytes_downloaded", "Bytes fetched over the network",
                                        ["model", "source"], registry=r)
        self.files_expected = Gauge("model_agent_files_expected", "Files in the requested snapshot", ["model"], registry=r)
        self.files_completed = Counter("model_agent_files_completed", "Files verified and promoted", ["model"], registry=r)
        self.retries = Counter("model_agent_retries", "Retried failures by reason", ["model", "reason"], registry=r)
        self.pulls = Counter("model_agent_pulls", "Finished pulls by result", ["model", "result"], registry=r)
        self.duration = Histogram("model_agent_pull_duration_seconds", "Wall time of a pull", ["model"],
                                  buckets=DURATION_BUCKETS, registry=r)
        self.ready = Gauge("model_agent_snapshot_ready", "1 when the snapshot has its ready marker", ["model"], registry=r)
        self.info = Gauge("model_agent_snapshot_info", "The commit a ready revision resolves to",
                          ["model", "revision", "commit"], registry=r)
        self.phase = Gauge("model_agent_phase", "Current phase, one-hot", ["model", "phase"], registry=r)
        self.sync_rounds = Counter("model_agent_sync_rounds", "Sync rounds by result", ["result"], registry=r)
        self.sync_duration = Histogram("model_agent_sync_round_duration_seconds", "Wall time of a sync round",
                                       buckets=DURATION_BUCKETS, registry=r)
        self.models_declared = Gauge("model_agent_models_declared", "Models in the models file", registry=r)
        self.models_ready = Gauge("model_agent_models_ready", "Declared models whose snapshot is ready", registry=r)
        self.gc_freed = Counter("model_agent_gc_freed_bytes", "Bytes freed by garbage collection", registry=r)
        self.gc_removed = Counter("model_agent_gc_snapshots_removed", "Snapshots removed by garbage collection",
                                  registry=r)
        self.bytes_resumed = Counter("model_agent_bytes_resumed", "Bytes a pull found already on disk (resumed partials)",
                                     ["model", "source"], registry=r)
        self.bytes_uploaded = Counter("model_agent_bytes_uploaded", "Bytes `push` sent to its destination",
                                      ["model", "destination"], registry=r)
        # The pod's memory: process_resident_memory_bytes (and CPU, fds) from prometheus_client's own
        # collector, read from /proc at each scrape; the peak is the kernel's high-water mark (ru_maxrss),
        # the number to hold against the pod's limit (agent/memory.py).
        ProcessCollector(registry=r)
        self.peak_rss = Gauge("model_agent_peak_resident_memory_bytes",
                              "Peak RSS of this process (or of its largest finished child, hf_transfer's)", registry=r)
        self.peak_rss.set_function(lambda: max(peak_rss()))
        self._lock = threading.Lock()
        # Readiness is kept per declared entry (one repo may be declared at several revisions); the
        # `ready` gauge of a model is 1 only when every entry of that model is.
        self._entries: dict[str, str] = {}  # entry -> model label
        self._entry_ready: dict[str, bool] = {}
        self._info: dict[str, tuple[str, str, str]] = {}  # entry -> the labels of its snapshot_info series
        self._sources: dict[str, str] = {}  # model -> source label, when one process pulls from several
        self._server: ThreadingHTTPServer | None = None

    # -- listener interface (see agent.progress.Listener) -------------------------------------------
    def on_start(self, model: str, commit: str, total_bytes: int, files: int) -> None:
        self.bytes_expected.labels(model).set(total_bytes)
        self.files_expected.labels(model).set(files)

    def on_bytes(self, model: str, n: int) -> None:
        if n > 0:  # a Prometheus counter never goes down; bytes thrown away show up as retries
            self.bytes_downloaded.labels(model, self.source_of(model)).inc(n)

    def on_resumed(self, model: str, n: int) -> None:
        if n > 0:
            self.bytes_resumed.labels(model, self.source_of(model)).inc(n)

    def source_of(self, model: str) -> str:
        return self._sources.get(model, self.source_label)

    def set_source(self, model: str, scheme: str) -> None:
        self._sources[model] = scheme

    def on_file_done(self, model: str) -> None:
        self.files_completed.labels(model).inc()

    def on_retry(self, model: str, reason: str) -> None:
        self.retries.labels(model, reason).inc()

    def on_phase(self, model: str, phase: str) -> None:
        for p in PHASES:
            self.phase.labels(model, p).set(1 if p == phase else 0)

    def upload_listener(self, destination: str) -> "UploadListener":
        return UploadListener(self, destination)

    # -- pull lifecycle -------------------------------------------------------------------------
    # `entry` names what was declared (sync: the model and its revision); a single pull's is its model.
    def expect(self, model: str, entry: str | None = None) -> None:
        with self._lock:
            self._entries[entry or model] = model
        self._set_ready(entry or model, False)

    def finished(self, model: str, revision: str, commit: str, seconds: float, result: str,
                 entry: str | None = None) -> None:
        self.pulls.labels(model, result).inc()
        self.duration.labels(model).observe(seconds)
        if result == "success":
            self.mark_ready(model, revision, commit, entry)
        else:
            self._set_ready(entry or model, False)
            self.on_phase(model, "failed")

    def mark_ready(self, model: str, revision: str, commit: str, entry: str | None = None) -> None:
        self._set_ready(entry or model, True)
        self._set_info(entry or model, (model, revision, commit))
        self.on_phase(model, "done")

    def declare(self, entries: dict[str, str]) -> None:
        """Sync mode: exactly these entries (entry -> model) are expected. A dropped entry stops counting
        and its info series goes, so a long-running daemon's series stay bounded by the models file."""
        with self._lock:
            self._entries = dict(entries)
            self._entry_ready = {e: ok for e, ok in self._entry_ready.items() if e in entries}
        for entry in [e for e in list(self._info) if e not in entries]:
            self._set_info(entry, None)
        self.models_declared.set(len(entries))
        for model in set(entries.values()):
            self._refresh_model(model)

    def _set_info(self, entry: str, labels: tuple[str, str, str] | None) -> None:
        """One `snapshot_info` series per entry: a moved ref replaces the old commit's series."""
        with self._lock:
            old = self._info.pop(entry, None)
            if labels is not None:
                self._info[entry] = labels
            shared = old in self._info.values()  # the same repo and revision declared twice
        if old is not None and old != labels and not shared:
            self.info.remove(*old)
        if labels is not None:
            self.info.labels(*labels).set(1)

    def _set_ready(self, entry: str, ok: bool) -> None:
        with self._lock:
            self._entry_ready[entry] = ok
            model = self._entries.setdefault(entry, entry)
        self._refresh_model(model)

    def _refresh_model(self, model: str) -> None:
        with self._lock:
            ok = all(self._entry_ready.get(e, False) for e, m in self._entries.items() if m == model)
        self.ready.labels(model).set(1 if ok else 0)

    def is_ready(self, entry: str) -> bool:
        with self._lock:
            return self._entry_ready.get(entry, False)

    def ready_count(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries if self._entry_ready.get(e, False))

    def all_ready(self) -> bool:
        with self._lock:
            return bool(self._entries) and all(self._entry_ready.get(e, False) for e in self._entries)

    # -- exposition -----------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok = metrics.all_ready()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every 15 s would drown the pull's log
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        return self._server.server_address[1]

    def write_textfile(self, path: Path) -> None:
        atomic_write(path, self.render())

    def push(self, gateway: str, job: str, grouping: dict[str, str]) -> None:
        push_to_gateway(gateway, job=job, registry=self.registry, grouping_key=grouping, timeout=10)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class Exporter:
    """Keeps the textfile and the Pushgateway current during a pull, and once more at the end.

    Short-lived Jobs and init containers end before a scrape would find them: these two paths are
    how their metrics outlive the pod. A failed push is logged, never fatal.
    """

    def __init__(self, metrics: Metrics, *, textfile: Path | None, pushgateway: str | None, model: str,
                 logger, interval: float = 10.0, job: str = "model-agent", node: str | None = None):
        self.metrics, self.textfile, self.pushgateway = metrics, textfile, pushgateway
        self.model, self.logger, self.interval, self.job = model, logger, interval, job
        # One Job pulls one model: group by it, so a retried pod replaces its predecessor's metrics.
        # A sync DaemonSet runs on every node: group by node, or the nodes would overwrite each other.
        # The node's name, not the host name: in a pod that is the pod's name, new at every rollout,
        # and each old group would keep its stale `snapshot_ready` forever.
        self.grouping = {"instance": node or socket.gethostname()} if model == "sync" else {"model": model}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-export", daemon=True)

    def __enter__(self) -> "Exporter":
        if self.textfile or self.pushgateway:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.export()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.export()

    def export(self) -> None:
        if self.textfile:
            try:
                self.metrics.write_textfile(self.textfile)
            except OSError as exc:
                self.logger.warn("metrics_textfile", f"cannot write {self.textfile}: {exc.strerror}")
        if self.pushgateway:
            try:
                self.metrics.push(self.pushgateway, self.job, self.grouping)
            except Exception as exc:  # noqa: BLE001 - metrics must never fail a pull
                self.logger.warn("metrics_push", f"push to the Pushgateway failed: {type(exc).__name__}")


class UploadListener:
    """The progress events of `push`'s upload phase: bytes go to model_agent_bytes_uploaded_total (never
    to the download counter), phases and retries as for a pull."""

    def __init__(self, metrics: Metrics, destination: str):
        self.metrics, self.destination = metrics, destination

    def on_start(self, model: str, commit: str, total_bytes: int, files: int) -> None:
        return None  # the snapshot's size is the pull's gauge already

    def on_bytes(self, model: str, n: int) -> None:
        if n > 0:
            self.metrics.bytes_uploaded.labels(model, self.destination).inc(n)

    def on_resumed(self, model: str, n: int) -> None:
        return None

    def on_file_done(self, model: str) -> None:
        return None

    def on_retry(self, model: str, reason: str) -> None:
        self.metrics.on_retry(model, reason)

    def on_phase(self, model: str, phase: str) -> None:
        self.metrics.on_phase(model, phase)
