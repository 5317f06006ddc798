"""The one retry policy: a plain loop, jittered exponential backoff, a budget that resets on progress.

Only `Retryable` is retried; everything else propagates at once. Clock and sleep are injectable
so tests can run the policy without waiting.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from .errors import Retryable, TransientError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_failures: int = 8  # consecutive failed attempts with no new bytes in between
    base_delay: float = 0.5
    max_delay: float = 30.0
    # A server asking for longer than this is treated as this. The Hub's quota windows are 5 minutes
    # and huggingface_hub waits a window out in full (t+1 s): so do we, one window in one wait.
    max_retry_after: float = 301.0

    def delay(self, failures: int, retry_after: float | None, rng: Callable[[], float]) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        ceiling = min(self.max_delay, self.base_delay * (2 ** (failures - 1)))
        # "Full jitter": spreads many workers (or many pods) that failed together.
        return ceiling * (0.5 + rng() / 2)


def call_with_retry(
    attempt: Callable[[], T],
    *,
    policy: RetryPolicy,
    what: str,
    progress_mark: Callable[[], int] = lambda: 0,
    on_retry: Callable[[str, float, Exception], None] = lambda reason, delay, exc: None,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> T:
    """Run `attempt` until it returns, retrying `Retryable` failures within the policy's budget.

    `progress_mark` returns a number that grows when bytes arrive (for example bytes written):
    when it moved since the previous failure, the failure count starts again, so a long download
    over a flaky link keeps going as long as it keeps making progress.
    """
    failures = 0
    last_mark = progress_mark()
    while True:
        try:
            return attempt()
        except Retryable as exc:
            mark = progress_mark()
            if mark != last_mark:
                failures, last_mark = 0, mark
            failures += 1
            if failures >= policy.max_failures:
                raise TransientError(
                    f"{what}: gave up after {failures} attempts without progress, last: {exc}"
                ) from exc
            delay = policy.delay(failures, exc.retry_after, rng)
            on_retry(exc.reason, delay, exc)
            sleep(delay)
