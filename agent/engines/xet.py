"""Xet-backed Hub files through hf_xet, as ordered byte-range streams.

Ranges are what make Xet downloads resumable here: hf_xet's own file download truncates its
target and restarts from zero (huggingface_hub#4306), while `download_stream(start=...)` lets the
shared transfer code continue a partial file from the bytes already on disk. hf_xet's
HF_XET_HIGH_PERFORMANCE mode (which can take tens of GB of RAM) is left to the environment:
set it only when asked for.

The first Xet token is fetched here, in Python, as huggingface_hub 2.4 does before it hands over to
hf_xet: hf_xet reports the token route's 401/403 as a ConnectionError, so a gated repo (403
GatedRepo) would be retried as transient (exit 7) instead of refused (exit 3).
"""

from __future__ import annotations

import queue
import re
import threading
from typing import Iterator

from .. import httpio
from ..ahead import AheadBudget
from ..errors import AgentError, AuthError, NotFound, Retryable
from ..sources.base import RangeReader, RemoteFile

XET_RANGE = 8 * 2**20  # bytes per hf_xet stream (range_size says why)
# Xet ranges in flight per --workers: each range is a reconstruction request, then a xorb fetch, then
# one ~8 MiB item, so a stream waits on two round trips per range. 1 GiB over the HTTP CAS, medians of
# 4 alternating runs: 8 streams 2.47 s, 16 streams 2.12 s (hf download 1.63 s); a kill and re-run
# 1.05-1.09x either way. `--workers` stays the number of plain HTTP connections.
XET_STREAMS_PER_WORKER = 2
KILL_LOSS = 0.1  # of a pull's Xet bytes, the most its streams in flight may hold (streams() says why)


class StreamStalled(Exception):
    """No answer from hf_xet's stream for the stall timeout."""


class StreamPuller:
    """Takes the items of an hf_xet stream in a thread of its own, one when asked, so that the caller
    can stop waiting after `timeout` seconds. hf_xet blocks inside Rust and cannot be interrupted
    there (hf_xet 1.8.0, measured over the dev Hub's HTTP CAS): `stream.cancel()` from another thread
    raises "RuntimeError: Already borrowed" while the stream is in `__next__`, and `group.abort()`
    leaves an in-flight xorb fetch hanging until the server answers. An abandoned stream is dropped
    when its fetch ends (hf_xet's read timeout at the latest). Asking for one item at a time keeps
    what is held in memory what a plain `for chunk in stream` holds."""

    def __init__(self, stream):
        self._stream = stream
        self._asks: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="xet-stream", daemon=True).start()

    def _run(self) -> None:
        stream = self._stream
        self._stream = None
        while self._asks.get():
            try:
                answer: tuple[str, object] = ("chunk", next(stream))
            except StopIteration:
                answer = ("end", None)
            except Exception as exc:  # noqa: BLE001 - handed to the caller's thread
                answer = ("error", exc)
            self._answers.put(answer)
            if answer[0] != "chunk":
                return

    def next(self, timeout: float):
        """The next item, None at the end; raises the stream's error, or StreamStalled."""
        self._asks.put(True)
        try:
            kind, value = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise StreamStalled from None
        if kind == "error":
            raise value  # type: ignore[misc]
        return value

    def abandon(self) -> None:
        self._asks.put(False)  # the thread ends once its current call (if any) returns


class TokenRefused(AuthError):
    """The Xet CAS answered 401 to the Xet token. hf_xet reports it as a ConnectionError whose text
    names the status, and does not ask the token route again (hf_xet 1.8.0)."""


# hf_xet 1.8.0 raises the CAS's final HTTP answers as a ConnectionError whose text carries the status
# and URL: "... HTTP status client error (401 Unauthorized), domain: http://cas/v2/reconstructions/..."
_HTTP_STATUS = re.compile(r"\((\d{3})[^)]*\), domain: (\S+)")


def http_status(exc: Exception) -> int:
    """The CAS's HTTP status in an hf_xet error's text, 0 if it names none."""
    found = _HTTP_STATUS.search(str(exc))
    return int(found.group(1)) if found else 0


def map_xet_error(exc: Exception, what: str, last_status: int = 0) -> Exception:
    """The agent's error for an hf_xet one. `last_status`: the CAS's last HTTP answer seen in this pull,
    named when hf_xet's error names no cause (see XetReader._failed)."""
    import hf_xet

    if isinstance(exc, hf_xet.XetAuthenticationError):
        return AuthError(f"{what}: Xet storage refused the token")
    if isinstance(exc, hf_xet.XetObjectNotFoundError):
        return NotFound(f"{what}: Xet storage has no such file")
    found = _HTTP_STATUS.search(str(exc))
    status, url = (int(found.group(1)), found.group(2)) if found else (0, "")
    if status == 401:
        return TokenRefused(f"{what}: the Xet CAS refused the Xet token (401)")
    if status == 403 and "/reconstructions/" in url:
        return AuthError(f"{what}: the Xet CAS refused the Xet token access to this file (403)")
    if status == 404 and "/reconstructions/" in url:
        return NotFound(f"{what}: the Xet CAS has no such file (404)")
    cause = f" {status}" if status else f", after the CAS answered {last_status}" if last_status else ""
    return Retryable("xet", f"{what}: xet transfer failed ({type(exc).__name__}{cause})")


class XetReader(RangeReader):
    name = "xet"
    # Bumped each time the group is replaced (after an error, or for a fresh token): an error from an
    # older group says nothing about the current one, and every group after the first was made with a
    # fresh token. Class defaults, shadowed per reader.
    _generation = 0
    _ended_early_at = -1  # the generation whose stream last ended early without an error
    # hf_xet 1.8.0 reports a failed xorb fetch either as a ConnectionError naming the status or, racing
    # with it, as "RuntimeError: ... Data sender was dropped before sending data" (about 1 attempt in
    # 15 for a 404): the status of the last one that named it goes into the message of the others.
    _last_status = 0

    def __init__(self, source, commit: str):
        self.source = source
        self.commit = commit
        self.settings = source.settings
        self._group = None
        self._refused: AgentError | None = None  # the token route's final answer: not asked again
        self._lock = threading.Lock()
        # Xet ranges streamed at once: each holds its ~8 MiB item while it lands (memory.py sizes them)
        self._streams = threading.BoundedSemaphore(self.streams(self.settings.workers))
        self._sized = None  # hf_xet's config, sized once: a replaced group (fresh token) reuses it
        # hf_xet hands each range over as one `bytes` of its own: a range that lands ahead of its file's
        # hashing frontier waits in memory (one per stream, counted in memory.TERM), not on disk
        self.ahead_budget = AheadBudget()

    def sized_config(self, hf_xet):
        """hf_xet's config with its buffers and connections bounded to the pod's memory (agent/memory.py),
        said once in a `memory` log line: a warning when HF_XET_HIGH_PERFORMANCE does not fit."""
        from .. import memory

        if self._sized is not None:
            return self._sized
        config = hf_xet.XetConfig().with_config("telemetry.enabled", False)
        # hf_xet's own read timeout is 300 s: a stalled xorb fetch would keep its connection and buffer
        # that long after our watchdog gave up on its stream. With --stall-timeout it recovers inside
        # hf_xet (measured: 4.4 s instead of 30 s for a stalled body at --stall-timeout 3).
        config = config.with_config("client.read_timeout", f"{max(1, int(self.settings.stall_timeout))}s")
        limit = memory.detect(self.settings.memory_limit, self.settings.memory_limit_from)
        plan = memory.plan_xet(limit.bytes, {key: int(config.get(key)) for key in memory.KEYS},
                               workers=self.streams(self.settings.workers),
                               high_performance=self.settings.xet_high_performance,
                               operator_set=self.settings.xet_env)
        for key, value in plan.overrides.items():
            config = config.with_config(key, value)
        start = self.first_connections(plan)
        if start != plan.settings[memory.INITIAL_CONNECTIONS]:
            config = config.with_config(memory.INITIAL_CONNECTIONS, start)
        self._streams = threading.BoundedSemaphore(plan.streams)
        self.ahead_budget.cap = plan.streams * XET_RANGE
        self._say_plan(limit, plan, start)
        self._sized = config
        return config

    def first_connections(self, plan) -> int:
        """Where hf_xet's adaptive download concurrency starts: one connection per stream. hf_xet starts
        at 4 and grows it as fetches succeed, so our streams queued inside it, each waiting on a xorb
        fetch. The bytes alone of 1 GiB in 129 ranges from a CAS 50 ms away: 16 streams 1.71-1.73 s
        starting at 4, 1.34-1.36 s at 16; 12 streams 1.85-2.01 s against 1.80 s; no change at 0 ms.
        Never above the plan's connections (64 MiB each in agent/memory.py); an operator's own
        setting is theirs."""
        from ..memory import INITIAL_CONNECTIONS, MAX_CONNECTIONS, env_names

        own = plan.settings[INITIAL_CONNECTIONS]
        if any(name in self.settings.xet_env for name in env_names(INITIAL_CONNECTIONS)):
            return own
        return max(own, min(plan.settings[MAX_CONNECTIONS], plan.streams))

    def _say_plan(self, limit, plan, first_connections: int) -> None:
        """The `memory` line: the limit, where it came from, and what hf_xet was given."""
        from ..memory import MAX_CONNECTIONS, MiB

        logger = getattr(self.source, "logger", None)
        if logger is None:
            return
        mib = {k.rpartition(".")[2]: v // MiB for k, v in plan.settings.items() if "buffer" in k}
        fields = dict(limit_bytes=limit.bytes, limit_from=limit.source, bounded=plan.bounded,
                      planned_peak_bytes=plan.planned, xet_streams=plan.streams,
                      xet_connections=plan.settings[MAX_CONNECTIONS], xet_first_connections=first_connections,
                      **{f"xet_{k}_mib": v for k, v in mib.items()})
        if plan.warning:
            logger.warn("memory", f"{plan.warning} (limit from {limit.source})", **fields)
            return
        text = (f"memory limit {limit.bytes / MiB:.0f} MiB ({limit.source}): Xet with {plan.settings[MAX_CONNECTIONS]} "
                f"connections, {plan.streams} streams, a {mib['download_buffer_limit']} MiB buffer"
                f"{' (bounded)' if plan.bounded else ''}")
        logger.info("memory", text if logger.fmt != "json" else "", **fields)

    def range_size(self, default: int) -> int:
        # XET_RANGE-sized ranges, each its own ordered stream: what hf_xet has fetched but we have not
        # written is at most one range per stream slot, lost at a SIGKILL. One stream per file had
        # fetched the whole model by the time half of it was on disk (1 GiB over the HTTP CAS: 1.63x
        # after a kill and a re-run; 1.14-1.18x in 8 MiB ranges), held a ~64 MiB term per file
        # (peak RSS 1,027 MiB against 291 MiB) and was not faster (0.81x its time, 5 paired runs).
        # 4 MiB ranges were slower; 16 MiB lost more at a kill. bench/xet.py measures it.
        return min(default, XET_RANGE)

    def streams(self, workers: int, nbytes: int | None = None) -> int:
        most = XET_STREAMS_PER_WORKER * workers
        if nbytes is None:
            return most
        # A SIGKILL loses what the streams in flight had fetched (up to a range each): keep that under
        # KILL_LOSS of the bytes to move, but never below --workers streams. A 768 MiB pull with 16
        # streams re-fetched 1.16-1.18x after a kill; a 60 GB one never comes near the cap.
        return max(workers, min(most, int(nbytes * KILL_LOSS) // XET_RANGE))

    def what(self, file: RemoteFile) -> str:
        return f"{self.source.ref.display()}@{self.commit[:12]} {file.path}"

    def hub_headers(self) -> dict[str, str]:
        auth = {"Authorization": f"Bearer {self.settings.token}"} if self.settings.token else {}
        return {"User-Agent": "model-agent", **auth}

    def first_token(self) -> tuple[str, str, int]:
        """(CAS endpoint, token, expiry) from the Hub's token route, its refusal mapped like any Hub
        answer (403 GatedRepo is exit 3). A transient failure is raised as Retryable for the caller."""
        what = f"{self.source.ref.display()}@{self.commit[:12]} (Xet token)"
        pools = httpio.Pools(1, self.settings.stall_timeout)
        try:
            resp = httpio.request(pools, "GET", self.source.xet_token_url(self.commit), self.hub_headers(), what)
            httpio.drain(resp)
        finally:
            pools.clear()
        if resp.status != 200:
            raise httpio.classify_status(resp.status, resp.headers, what)
        cas, token = resp.headers.get("X-Xet-Cas-Url"), resp.headers.get("X-Xet-Access-Token")
        try:
            expires = int(resp.headers.get("X-Xet-Token-Expiration", ""))
        except ValueError:
            expires = 0
        if not (cas and token and expires):
            raise Retryable("xet", f"{what}: the Hub's token route answered without the Xet headers")
        return cas, token, expires

    def group(self):
        with self._lock:
            if self._refused is not None:
                raise self._refused
            if self._group is None:
                import hf_xet

                try:
                    cas, token, expires = self.first_token()
                except Retryable:
                    raise
                except AgentError as exc:
                    self._refused = exc  # every worker gets the same answer, with one request
                    raise
                config = self.sized_config(hf_xet)
                # Only the Hub's token route sees the Hub token; CAS requests carry the short-lived
                # Xet token that this route hands out (hf_xet refreshes it there before it expires).
                try:
                    self._group = hf_xet.XetSession(config).new_download_stream_group(
                        endpoint=cas, token=token, token_expiry_unix_secs=expires,
                        token_refresh_url=self.source.xet_token_url(self.commit),
                        token_refresh_headers=self.hub_headers(),
                    )
                except Exception as exc:  # noqa: BLE001 - mapped to a meaning
                    raise map_xet_error(exc, f"{self.source.ref.display()}@{self.commit[:12]}") from None
            return self._group

    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        self.group()  # sizes the stream slots on first use; raises the agent's own errors
        with self._streams:  # at most plan.streams terms held at once (agent/memory.py)
            yield from self._stream_range(file, start, end)

    def _stream_range(self, file: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        import hf_xet

        what = self.what(file)
        group = self.group()  # raises the agent's own errors: not hf_xet's to map
        with self._lock:
            generation = self._generation if self._group is group else -1
        try:
            stream = group.download_stream(hf_xet.XetFileInfo(file.xet_hash, file.size), start=start, end=end)
        except Exception as exc:  # noqa: BLE001 - mapped to a meaning
            raise self._failed(exc, what, generation) from None
        puller, got = StreamPuller(stream), 0
        try:
            while True:
                try:
                    chunk = puller.next(self.settings.stall_timeout)
                except StreamStalled:
                    raise Retryable("stall", f"{what}: no byte received for the stall timeout") from None
                except Exception as exc:  # noqa: BLE001 - mapped to a meaning
                    raise self._failed(exc, what, generation) from None
                if chunk is None:
                    break
                got += len(chunk)
                yield chunk
        finally:
            puller.abandon()
        if got < end - start:
            raise self._ended_early(what, start + got, end, generation)

    def _failed(self, exc: Exception, what: str, generation: int) -> Exception:
        """The agent's error for an hf_xet failure: a 401 from the CAS on the first group gets a fresh
        token (a new group) and one more try; a 401 on a later group, made with a fresh token whatever
        replaced the first (this, or streams that ended early when the 401 hit the first group), is
        final (exit 3). hf_xet refreshes a token before it expires, so a fresh one refused is a
        refusal. Other failures keep the group: hf_xet retries inside it, and replacing it would ask
        the token route again."""
        self._last_status = http_status(exc) or self._last_status
        error = map_xet_error(exc, what, self._last_status)
        if isinstance(error, TokenRefused):
            with self._lock:
                if generation != self._generation:
                    return Retryable("xet", f"{error}; a fresh token is already in use")
                if generation > 0:
                    self._refused = AuthError(f"{error}, and again with a fresh token")
                    return self._refused
            self._replace_group(generation)
            return Retryable("xet", f"{error}; trying once more with a fresh token")
        return error

    def _ended_early(self, what: str, at: int, end: int, generation: int) -> Exception:
        """hf_xet 1.8.0 ends a group's later streams early, without an error, once the group has failed.
        The failure itself reaches another worker, which decides (a 401 may be final): only a second
        early end on the same group replaces it here."""
        with self._lock:
            if self._refused is not None:
                return self._refused
            again, self._ended_early_at = self._ended_early_at == generation, generation
        if again:
            self._replace_group(generation)
        return Retryable("xet", f"{what}: hf_xet's stream ended at byte {at} of {end} without an error")

    def _replace_group(self, generation: int) -> None:
        """Next streams use a new group, with a fresh token from the Hub (group() makes it)."""
        with self._lock:
            if generation == self._generation:
                self._group = None
                self._generation += 1

    def close(self) -> None:
        with self._lock:
            if self._group is not None:
                try:
                    self._group.finish()
                except Exception:  # noqa: BLE001 - closing only
                    pass
                self._group = None
