"""Fault injection: make chosen requests fail the way real networks and CDNs fail.

Two phases are checked per request:
- request faults ("status", "429", "redirect") answer instead of the normal response; they apply
  to any request (API, resolve, CDN; GET or HEAD) whose path matches. A "429" sends the IETF
  `RateLimit` / `RateLimit-Policy` headers as the Hub does, plus `Retry-After` unless told not to;
  with `window` > 0 it answers every matching request until that many seconds after its first one,
  like a real quota window. A "redirect" answers 307 to the same path and query under `location`;
- body faults ("reset", "truncate", "stall", "corrupt", "slow") alter a file body being sent,
  so they only apply to responses that carry file bytes (resolve, CDN, Xet xorbs). "corrupt"
  inverts every byte after `after_bytes`, or only `span` of them: bytes inside a stored Xet chunk
  then still decode, to wrong data;
- "latency" holds a CAS request `seconds` before it is answered as usual: a CAS a round trip away,
  as the Hub's is from a cluster (the dev Hub on 127.0.0.1 answers in microseconds);
- range faults ("ignore_range") answer a ranged request with 200 and the whole body, as servers
  and Hub mirrors that do not implement Range do (olah, some proxies).
The Xet CAS host ("cas", agent/devhub/cas.py) takes request faults on its paths ("/v2/reconstructions/*",
"/xorbs/*": a 401 there is the CAS refusing the token, a 403 on a xorb a stale presigned URL) and body
faults on xorb bodies. A fault is used up after `count` matching requests.
"""

from __future__ import annotations

import fnmatch
import math
import threading
import time
from dataclasses import dataclass

REQUEST_KINDS = frozenset({"status", "429", "redirect"})
BODY_KINDS = frozenset({"reset", "truncate", "stall", "corrupt", "slow"})
RANGE_KINDS = frozenset({"ignore_range"})
LATENCY_KINDS = frozenset({"latency"})
HOSTS = frozenset({"api", "cdn", "cas", "any"})
METHODS = frozenset({"GET", "HEAD", "POST", "any"})


@dataclass
class Fault:
    kind: str
    path_glob: str = "*"
    count: int = 1
    after_bytes: int = 0  # body faults act after this many bytes of the response body
    status: int = 503
    retry_after: int = 1
    seconds: float = 5.0
    rate: int = 0  # bytes per second for "slow"
    host: str = "any"
    method: str = "any"
    send_retry_after: bool = True  # "429": False sends only RateLimit / RateLimit-Policy
    window: float = 0.0  # "429": seconds of refusals from the first hit on (count is then ignored)
    location: str = ""  # "redirect": base URL (scheme://host[:port]) to send the client to
    span: int = 0  # "corrupt": how many bytes to invert (0: all the rest of the body)
    hits: int = 0  # how many requests this fault has been applied to
    started: float | None = None  # monotonic time of the first hit, for `window`

    @property
    def remaining(self) -> int:
        if self.window > 0:
            return 1 if self.started is None or time.monotonic() < self.started + self.window else 0
        return self.count - self.hits

    def reset_seconds(self) -> int:
        """What a "429" asks the client to wait: the rest of its window, else `retry_after`."""
        if self.window > 0 and self.started is not None:
            return max(1, math.ceil(self.started + self.window - time.monotonic()))
        return self.retry_after

    def matches(self, host: str, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and self.host in ("any", host)
            and self.method in ("any", method)
            and fnmatch.fnmatchcase(path, self.path_glob)
        )


class FaultSet:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(
        self,
        kind: str,
        *,
        path_glob: str = "*",
        count: int = 1,
        after_bytes: int = 0,
        status: int = 503,
        retry_after: int = 1,
        seconds: float = 5.0,
        rate: int = 0,
        host: str = "any",
        method: str = "any",
        send_retry_after: bool = True,
        window: float = 0.0,
        location: str = "",
        span: int = 0,
    ) -> Fault:
        if kind not in REQUEST_KINDS | BODY_KINDS | RANGE_KINDS | LATENCY_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        if host not in HOSTS:
            raise ValueError(f"host must be one of {sorted(HOSTS)}")
        method = method if method == "any" else method.upper()
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}")
        if kind == "slow" and rate <= 0:
            raise ValueError("a 'slow' fault needs rate > 0 (bytes per second)")
        if kind == "redirect" and not location:
            raise ValueError("a 'redirect' fault needs location (a base URL)")
        fault = Fault(kind, path_glob, count, after_bytes, status, retry_after, seconds, rate, host, method,
                      send_retry_after, window, location.rstrip("/"), span)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def list(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def take(self, kinds: frozenset[str], host: str, method: str, path: str) -> Fault | None:
        """First live fault of `kinds` matching the request; consumes one of its uses."""
        with self._lock:
            for fault in self._faults:
                if fault.kind in kinds and fault.matches(host, method, path):
                    fault.hits += 1
                    if fault.started is None:
                        fault.started = time.monotonic()
                    return fault
        return None

    def take_request_fault(self, host: str, method: str, path: str) -> Fault | None:
        return self.take(REQUEST_KINDS, host, method, path)

    def take_body_fault(self, host: str, method: str, path: str) -> Fault | None:
        return self.take(BODY_KINDS, host, method, path)

    def take_range_fault(self, host: str, method: str, path: str) -> Fault | None:
        return self.take(RANGE_KINDS, host, method, path)

    def take_latency(self, host: str, method: str, path: str) -> float:
        """Seconds to hold this request before answering it (0: none)."""
        fault = self.take(LATENCY_KINDS, host, method, path)
        return fault.seconds if fault is not None else 0.0
