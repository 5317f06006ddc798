"""Errors by meaning. Each class carries the exit code of the public contract.

Only `agent.__main__` turns an error into an exit code; everything else raises one of these
with a one-line message that names the source, revision and path involved, never a secret.
"""

from __future__ import annotations

import errno
import re
import ssl


class AgentError(Exception):
    """Base class: an unexpected internal error unless a subclass says otherwise."""

    exit_code = 1
    kind = "internal"


class InvalidInput(AgentError):
    """Bad URI, repo id, glob, option or config file."""

    exit_code = 2
    kind = "invalid_input"


class AuthError(AgentError):
    """Authentication or authorization refused (401/403, gated repo, denied bucket)."""

    exit_code = 3
    kind = "auth"


class CertificateError(AuthError):
    """The store's (or the proxy's) TLS certificate is not trusted: the server could not prove who it
    is. A retry never cures it; trusting the right CA (AWS_CA_BUNDLE, REQUESTS_CA_BUNDLE...) does."""

    kind = "tls_certificate"

    @classmethod
    def untrusted(cls, what: str, peer: str, reason: str, hint: str, bundle: str | None) -> CertificateError:
        trusted_by = f"the CA bundle {bundle}" if bundle else "the default CAs"
        return cls(f"{what}: the TLS certificate of {peer} is not trusted by {trusted_by} ({reason}); "
                   f"if a private CA signs it, point {hint} at that CA's bundle")


_VERIFY_FAILED = re.compile(r"certificate verify failed: ([^()]+?) \(_ssl")


def untrusted_reason(exc: BaseException | None) -> str | None:
    """Why a certificate was refused, if `exc` (or what it wraps: SDKs wrap urllib3 wrapping ssl)
    is a failed certificate verification; else None."""
    for _ in range(8):
        if exc is None:
            return None
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc.verify_message or "certificate verify failed"
        found = _VERIFY_FAILED.search(str(exc))
        if found:
            return found.group(1).strip()
        exc = exc.__cause__ or exc.__context__
    return None


class NotFound(AgentError):
    """Repo, revision, bucket, or a prefix with no objects."""

    exit_code = 4
    kind = "not_found"


class IntegrityError(AgentError):
    """Size or checksum mismatch that a fresh download did not cure."""

    exit_code = 5
    kind = "integrity"


class DiskFull(AgentError):
    """Not enough free space, found before the first byte or on ENOSPC."""

    exit_code = 6
    kind = "disk_full"

    def __init__(self, message: str, *, need: int = 0, free: int = 0):
        super().__init__(message)
        self.need, self.free = need, free  # bytes, so sync mode can ask GC for the difference


class TransientError(AgentError):
    """Network trouble, 5xx, 429 or stalls that outlasted the retry budget."""

    exit_code = 7
    kind = "transient"


class TimedOut(AgentError):
    """`wait` ran out of time, or another writer's lease outlasted --lock-timeout."""

    exit_code = 8
    kind = "timeout"


class Retryable(Exception):
    """Raised inside a transfer attempt for a failure worth another try.

    `reason` is a short label (``connection``, ``timeout``, ``http_503``, ``stall``, ...) used in
    logs and the retries metric; `retry_after` is the server's Retry-After in seconds, if any.
    """

    def __init__(self, reason: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


def from_oserror(exc: OSError, what: str) -> AgentError:
    """The contract's meaning of a file-system error met outside a transfer (records, links, leases):
    no space is exit 6; a volume we may not write is exit 2, a mount or permission to fix, not
    something a retry cures; anything else is unexpected, exit 1."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{what}: no space left on the cache volume{where}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InvalidInput(f"{what}: cannot write to the cache volume{where}: {exc.strerror}")
    return AgentError(f"{what}: {type(exc).__name__}: {exc.strerror or exc}{where}")
