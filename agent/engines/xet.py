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

import threading
from typing import Iterator

from .. import httpio
from ..errors import AgentError, AuthError, NotFound, Retryable
from ..sources.base import RangeReader, RemoteFile


class StallWatch:
    """Cancels a stream that yields nothing for `timeout` seconds (hf_xet blocks inside Rust)."""

    def __init__(self, timeout: float, cancel):
        self.timeout, self.cancel = timeout, cancel
        self.fired = False
        self._kick = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xet-stall-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            if not self._kick.wait(self.timeout):
                if not self._done.is_set():
                    self.fired = True
                    self.cancel()
                return
            self._kick.clear()

    def alive(self) -> None:
        self._kick.set()

    def stop(self) -> None:
        self._done.set()
        self._kick.set()


def map_xet_error(exc: Exception, what: str) -> Exception:
    import hf_xet

    if isinstance(exc, hf_xet.XetAuthenticationError):
        return AuthError(f"{what}: Xet storage refused the token")
    if isinstance(exc, hf_xet.XetObjectNotFoundError):
        return NotFound(f"{what}: Xet storage has no such file")
    return Retryable("xet", f"{what}: xet transfer failed ({type(exc).__name__})")


class XetReader(RangeReader):
    name = "xet"

    def __init__(self, source, commit: str):
        self.source = source
        self.commit = commit
        self.settings = source.settings
        self._group = None
        self._refused: AgentError | None = None  # the token route's final answer: not asked again
        self._lock = threading.Lock()

    def range_size(self, default: int) -> int:
        # One ordered stream per file: hf_xet already fetches a file's terms in parallel, and
        # measured here several streams over one file were slower (512 MiB: 1 stream 0.6 s,
        # 4 streams 1.1-1.9 s), as fast as its own whole-file download. Resume is unchanged: the
        # stream restarts at the first byte not on disk.
        return 1 << 62

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
                config = hf_xet.XetConfig().with_config("telemetry.enabled", False)
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
        import hf_xet

        what = self.what(file)
        group = self.group()  # raises the agent's own errors: not hf_xet's to map
        try:
            stream = group.download_stream(hf_xet.XetFileInfo(file.xet_hash, file.size), start=start, end=end)
        except Exception as exc:  # noqa: BLE001 - mapped to a meaning
            raise map_xet_error(exc, what) from None
        watch = StallWatch(self.settings.stall_timeout, stream.cancel)
        try:
            for chunk in stream:
                watch.alive()
                yield chunk
        except Exception as exc:  # noqa: BLE001
            if watch.fired:
                raise Retryable("stall", f"{what}: no byte received for the stall timeout") from None
            raise map_xet_error(exc, what) from None
        finally:
            watch.stop()
        if watch.fired:
            raise Retryable("stall", f"{what}: no byte received for the stall timeout")

    def close(self) -> None:
        with self._lock:
            if self._group is not None:
                try:
                    self._group.finish()
                except Exception:  # noqa: BLE001 - closing only
                    pass
                self._group = None
