"""HTTP details shared by the resolve and CDN endpoints: ranges, validators, signed URLs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from email.utils import formatdate
from urllib.parse import quote, urlencode

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
TEXT_EXTENSIONS = (".json", ".txt", ".md", ".py", ".yaml", ".yml", ".csv", ".tsv", ".jsonl", ".gitattributes")


class Unsatisfiable(Exception):
    """The Range header is valid but selects no byte of the file: answer 416."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end_inclusive) to serve, or None to serve the whole file.

    Like S3/CloudFront: malformed or multi-range headers are ignored (full 200 body),
    ranges starting past the end are unsatisfiable.
    """
    if not header:
        return None
    m = _RANGE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable
        return max(size - n, 0), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # syntactically invalid per RFC 9110: ignore the header
    if start >= size:
        raise Unsatisfiable
    return start, min(int(last), size - 1) if last else size - 1


def if_range_allows(if_range: str | None, etag_quoted: str, last_modified: str) -> bool:
    """RFC 9110 If-Range: the range applies only if the validator still matches (strong compare)."""
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith('"') or value.startswith("W/"):
        return not value.startswith("W/") and value == etag_quoted
    return value == last_modified


def etag_matches(if_none_match: str | None, etag_quoted: str) -> bool:
    """If-None-Match uses the weak comparison: W/ prefixes are ignored."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag_quoted in tags


def http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def content_disposition(filename: str, disposition: str = "inline") -> str:
    """Same shape as the Hub's: RFC 5987 filename* plus an ASCII fallback."""
    name = filename.rsplit("/", 1)[-1]
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "")
    return f"{disposition}; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\";"


def is_text_file(path: str) -> bool:
    return path.lower().endswith(TEXT_EXTENSIONS)


def content_type(path: str) -> str:
    return "text/plain; charset=utf-8" if is_text_file(path) else "application/octet-stream"


def cdn_etag(sha256: str, size: int) -> str:
    """The CDN's own ETag, S3 multipart style ("<md5>-<parts>").

    It deliberately differs from the sha256 the Hub reports in X-Linked-Etag, as on the real
    CDN: a client must use the ETag the CDN returned for If-Range, not the LFS oid.
    """
    parts = max(1, -(-size // (16 * 1024 * 1024)))
    return '"%s-%d"' % (hashlib.md5(sha256.encode(), usedforsecurity=False).hexdigest(), parts)


class UrlSigner:
    """CloudFront-style presigned URLs (Expires/Policy/Signature/Key-Pair-Id) for the CDN."""

    def __init__(self, secret: bytes):
        self._secret = secret

    def _signature(self, path: str, params: dict[str, str]) -> str:
        payload = path + "?" + urlencode(sorted(params.items()))
        digest = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def sign(self, path: str, params: dict[str, str], ttl: int) -> str:
        """Query string for `path`; the params themselves are covered by the signature."""
        expires = str(int(time.time()) + ttl)
        policy = json.dumps({"Statement": [{"Resource": path, "Condition": {"DateLessThan": expires}}]})
        signed = dict(params, Expires=expires)
        signed["Policy"] = base64.urlsafe_b64encode(policy.encode()).decode().rstrip("=")
        signed["Signature"] = self._signature(path, signed)
        signed["Key-Pair-Id"] = "KDEVHUB0000000"
        return urlencode(signed)

    def verify(self, path: str, params: dict[str, str]) -> str | None:
        """None when the URL is valid, else the reason the CDN refuses it."""
        if "Signature" not in params or "Expires" not in params:
            return "Missing Key-Pair-Id query parameter or cookie value"
        unsigned = {k: v for k, v in params.items() if k not in ("Signature", "Key-Pair-Id")}
        if not hmac.compare_digest(self._signature(path, unsigned), params["Signature"]):
            return "Invalid signature"
        if not params["Expires"].isdigit() or int(params["Expires"]) < time.time():
            return "Access denied: the URL has expired"
        return None
